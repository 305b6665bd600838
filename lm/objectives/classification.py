"""Sequence classification: an encoder plus a head, fine-tuned (or trained from scratch) on the
engine, for transfer-learning measurements.

The encoder is lm/models/transformer.py's transformer with return_hidden; its states are mean-pooled over the
real tokens (or the first token is taken) and a linear head gives class logits. It starts from
  init=scratch      random weights, the architecture and tokenizer of `classify.encoder`
  init=pretrained   that masked-LM run's newest good checkpoint (experiments/configs/lm/bert.py)
  encoder=all-minilm-l6-v2 (or a sentence-transformers directory) with its WordPiece tokenizer
and `optim.freeze` can hold any part fixed (configs build it from freeze_layers / head_only).
Data: the Brown corpus's 500 documents labelled with their 15 genres (cats.txt of the package),
split by document (stratified, seeded) into train and test; each document gives up to
windows_per_doc windows of seq_len tokens, every window labelled with its document's genre.
Test accuracy is reported per window and per document (summed window log-probabilities).
SST-2, RTE and BoolQ come from the evaluation package, which ships only their validation splits:
they are split here into train and test by a seeded hash of the example index (test_fraction),
one example per window, sentence pairs laid out as the encoder's tokenizer pairs them.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import trainer
from core.batches import BatchIterator
from core.config import ConfigError, check_choice, load_run_config
from core.task import BatchField, LossSums
from lm.data import brown_pos
from lm.data import windows as data_lib
from lm.data.labelled import brown_genres, document_split, eval_package_task, labelled_windows
from lm.models import layers
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.objectives import saved_run
from lm.weights import embed

log = logging.getLogger(__name__)
POOLINGS = ("mean", "first")
# Runs whose (main) parameters are a bidirectional encoder of lm/models/transformer.py.
ENCODER_TASKS = ("masked_lm", "electra", "distillation")
DATASETS = ("brown_genres", "sst2", "rte", "boolq", "brown_pos")
TOKEN_DATASETS = ("brown_pos",)  # token classification: a label per word (lm/data/brown_pos.py)


def pair_windows(encoder: "Encoder", texts: list[tuple], labels, seq_len: int) -> data_lib.Windows:
    """One window per example: the encoder's pair layout ([CLS] a [SEP] b [SEP] for BERT), the
    second text cut to fit seq_len (the first one too if it alone is longer)."""
    tokens = np.zeros((len(texts), seq_len), np.int32)
    types, segments = np.zeros_like(tokens), np.zeros_like(tokens)
    columns = [encoder.encode([pair[k] for pair in texts]) for k in range(len(texts[0]))]
    for row in range(len(texts)):
        parts = [column[row] for column in columns]
        budget = seq_len - len(encoder.prefix) - len(encoder.suffix) * len(parts)
        parts[0] = parts[0][:max(budget // 2, budget - sum(len(p) for p in parts[1:]))]
        if len(parts) > 1:
            parts[1] = parts[1][:budget - len(parts[0])]
        ids, type_ids = list(encoder.prefix), [0] * len(encoder.prefix)
        for kind, part in enumerate(parts):
            piece = [*part, *encoder.suffix]
            ids += piece
            type_ids += [kind] * len(piece)
        tokens[row, :len(ids)], types[row, :len(ids)], segments[row, :len(ids)] = ids, type_ids, 1
    return data_lib.Windows(tokens, segments, 0, int(segments.sum()), len(texts),
                            np.array(labels, np.int32), types)


# -------------------------------------------------------------------------------- model

class Classifier(nn.Module):
    """Encoder -> pooled state -> dropout -> linear head: logits (B, C); per_token skips the
    pooling and gives logits (B, T, C) (token classification)."""
    cfg: model_lib.TransformerConfig
    num_classes: int
    pooling: str = "mean"
    dropout: float = 0.1
    per_token: bool = False

    @nn.compact
    def __call__(self, tokens_BT, segment_ids_BT, token_types_BT=None, deterministic: bool = True):
        hidden_BTD = model_lib.Transformer(self.cfg, name="encoder")(
            tokens_BT, None, segment_ids_BT, deterministic=deterministic, return_hidden=True,
            token_types_BT=token_types_BT)
        if self.per_token:
            pooled_BD = hidden_BTD  # (B, T, D): the head below applies to every position
        else:
            pooled_BD = model_lib.pool_hidden(hidden_BTD, segment_ids_BT > 0,
                                              self.pooling == "first")
        pooled_BD = nn.Dropout(self.dropout)(pooled_BD, deterministic=deterministic)
        D, C = self.cfg.d_model, self.num_classes
        w_DC = layers.logical_param(self, "w_head", nn.initializers.normal(0.02), (D, C),
                                    ("embed", None), jnp.float32)
        b_C = layers.logical_param(self, "b_head", nn.initializers.zeros, (C,), (None,),
                                   jnp.float32)
        return pooled_BD.astype(jnp.float32) @ w_DC + b_C


class ClassificationTask:
    name = "classification"

    def __init__(self, model_cfg: model_lib.TransformerConfig, num_classes: int, seq_len: int,
                 pooling: str = "mean", dropout: float = 0.1, encoder_params=None,
                 per_token: bool = False):
        if model_cfg.causal:
            raise ConfigError("classification pools an encoder: the model must have causal=False")
        check_choice("classify.pooling", pooling, POOLINGS)
        self.model_cfg, self.num_classes, self.seq_len = model_cfg, num_classes, seq_len
        self.per_token = per_token
        self.model = Classifier(model_cfg, num_classes, pooling, dropout, per_token)
        self._encoder_params = encoder_params  # host arrays, or None (from scratch)

    def init_params(self, rng):
        tokens_BT = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens_BT, jnp.ones_like(tokens_BT))["params"]

    def pretrained_params(self) -> dict:
        return {} if self._encoder_params is None else {"encoder": self._encoder_params}

    def logits(self, params, batch, rng=None, train: bool = False):
        return self.model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                                batch["token_types"], deterministic=not train,
                                rngs={"dropout": rng} if train and rng is not None else None)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        # B here is every labelled unit: a window, or (per_token) every window position
        logits_BC = self.logits(params, batch, rng, train)
        labels_B = batch["labels"]
        if self.per_token:  # labels < 0: subword continuations and special tokens
            real_B = ((labels_B >= 0) & (batch["segment_ids"] > 0)).astype(jnp.float32)
        else:  # eval batches are padded with all-zero rows
            real_B = (batch["segment_ids"].max(axis=1) > 0).astype(jnp.float32)
        labels_B = jnp.maximum(labels_B, 0)
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
        correct_B = (jnp.argmax(logits_BC, axis=-1) == labels_B).astype(jnp.float32)
        return LossSums(loss=jnp.sum(nll_B * real_B), weight=jnp.sum(real_B),
                        extra={"accuracy": jnp.sum(correct_B * real_B)})

    def batch_fields(self):
        return {"tokens": BatchField((self.seq_len,), jnp.int32, ("batch", "length")),
                "segment_ids": BatchField((self.seq_len,), jnp.int32, ("batch", "length")),
                "token_types": BatchField((self.seq_len,), jnp.int32, ("batch", "length")),
                "labels": (BatchField((self.seq_len,), jnp.int32, ("batch", "length"))
                           if self.per_token else BatchField((), jnp.int32, ("batch",)))}

    def train_flops_per_example(self) -> float:
        """The encoder's (without the vocabulary projection it does not run) plus the head's."""
        cfg = self.model_cfg
        encoder = param_tree.flops_per_token(cfg, self.seq_len) - 6 * cfg.vocab_size * cfg.d_model
        head = 6 * cfg.d_model * self.num_classes * (self.seq_len if self.per_token else 1)
        return encoder * self.seq_len + head

    def units_per_example(self):
        return "examples", 1

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float = 0.0) -> dict[str, float]:
        weight = max(sums["weight"], 1.0)
        return {"loss": sums["loss"] / weight, "accuracy": sums.get("accuracy", 0.0) / weight,
                "examples": sums["weight"]}


# ---------------------------------------------------------------------- encoder sources

@dataclasses.dataclass
class Encoder:
    cfg: model_lib.TransformerConfig
    params: dict | None          # host arrays of the Transformer tree, None for scratch
    encode: object               # texts -> list of token-id lists (no special tokens)
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    fingerprint: str = ""


def load_encoder(spec: str, init: str, cache: str = "") -> Encoder:
    """A packaged / Hugging Face encoder, or a masked-LM run's workdir; init="scratch" keeps its
    architecture and tokenizer and drops its weights (the no-transfer baseline)."""
    if spec in embed.PRETRAINED or (pathlib.Path(spec) / "config.json").is_file() and not (
            pathlib.Path(spec) / "checkpoints").exists():
        sentence = embed.load_sentence_encoder(spec, cache)
        tok = sentence.tokenizer
        tok.no_truncation()  # whole documents; windows are cut here
        return Encoder(dataclasses.replace(sentence.cfg, scan_layers=False),
                       jax.tree_util.tree_map(np.asarray, sentence.params)
                       if init == "pretrained" else None,
                       lambda texts: [e.ids for e in tok.encode_batch(texts,
                                                                      add_special_tokens=False)],
                       (tok.token_to_id("[CLS]"),), (tok.token_to_id("[SEP]"),), spec)
    workdir = pathlib.Path(spec)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"classify.encoder {spec!r}: neither a packaged encoder "
                                f"({sorted(embed.PRETRAINED)}) nor a run directory with "
                                "config.json (train one with experiments/configs/lm/bert.py)")
    run_config = load_run_config(workdir)
    if run_config.task not in ENCODER_TASKS:
        raise ConfigError(f"{workdir} is a {run_config.task!r} run; fine-tuning needs an encoder "
                          f"pretrained by one of {ENCODER_TASKS}")
    run = saved_run.load_run(workdir, run_config, what="classify.encoder")
    params = None
    if init == "pretrained":
        params = run.params
        if run_config.task == "electra":
            params = params["discriminator"]  # the encoder; the generator and RTD head stay
        params = {k: v for k, v in params.items() if k != "sentence_head"}  # NSP/SOP head stays
        log.info("encoder: %s at step %d", workdir, run.step)
    cfg = dataclasses.replace(run.task.model_cfg, scan_layers=False)
    if params is not None and "layers" in params:  # scanned: one subtree per layer here
        params = param_tree.unstack_layers(params)
    tokenizer = run.tokenizer
    return Encoder(cfg, params, lambda texts: tokenizer.encode(list(texts)), (tokenizer.bos_id,),
                   (tokenizer.eos_id,), tokenizer.fingerprint)


# ------------------------------------------------------------------ data and scores

@dataclasses.dataclass
class ClassificationSetup:
    task: ClassificationTask
    data: trainer.TaskData
    test: data_lib.Windows
    test_docs: np.ndarray
    class_names: list[str]
    baseline: dict  # a non-neural baseline on the same split, where the dataset has one


def build_setup(config, workdir=None, need_train: bool = True) -> ClassificationSetup:
    """The encoder, the labelled set's train and test windows, the task and its data."""
    cc = config.classify
    check_choice("classify.dataset", cc.dataset, DATASETS)
    encoder = load_encoder(cc.encoder, cc.init, config.data.cache_dir)
    seq_len = config.data.seq_len
    baseline = None
    if cc.dataset == "brown_pos":
        tagged = brown_pos.tagged_documents(config.data.cache_dir)
        doc_ids = sorted(tagged)
        names = sorted({tag for words in tagged.values() for _, tag in words})
        word_ids = encoder.encode([w for d in doc_ids for w, _ in tagged[d]])
        starts = np.cumsum([0] + [len(tagged[d]) for d in doc_ids])
        make = lambda docs: brown_pos.tag_windows(
            [word_ids[starts[i]:starts[i + 1]] for i in docs],
            [[names.index(t) for _, t in tagged[doc_ids[i]]] for i in docs], seq_len,
            encoder.prefix, encoder.suffix)
        baseline = lambda train, test: brown_pos.most_frequent_tag_accuracy(
            [tagged[doc_ids[i]] for i in train], [tagged[doc_ids[i]] for i in test])
    elif cc.dataset == "brown_genres":
        doc_ids, texts, labels, names = brown_genres(config.data.cache_dir)
        token_ids = encoder.encode(texts)
        make = lambda docs: labelled_windows(
            [token_ids[i] for i in docs], [labels[i] for i in docs], seq_len,
            cc.windows_per_doc, encoder.prefix, encoder.suffix)
    else:  # one window per example; the package has only validation, split here by hash
        doc_ids, texts, labels, names = eval_package_task(cc.dataset, config.data.cache_dir)
        make = lambda docs: (pair_windows(encoder, [texts[i] for i in docs],
                                          [labels[i] for i in docs], seq_len), np.arange(len(docs)))
    train_docs, test_docs = document_split(doc_ids, cc.dataset.split("_")[0],
                                           cc.test_fraction, cc.split_seed)
    windows = {"train": make(train_docs), "test": make(test_docs)}
    log.info("%s: %d train documents (%d windows), %d test documents (%d windows)", cc.dataset,
             len(train_docs), len(windows["train"][0].tokens), len(test_docs),
             len(windows["test"][0].tokens))
    task = ClassificationTask(encoder.cfg, len(names), config.data.seq_len, cc.pooling,
                              cc.dropout, encoder.params, cc.dataset in TOKEN_DATASETS)
    train_iter = BatchIterator(windows["train"][0], config.train.global_batch_size,
                               config.train.seed, jax.process_index(),
                               jax.process_count()) if need_train else None
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)
    data = trainer.TaskData(
        train=train_iter, evaluate=data_lib.evaluator(windows["test"][0], eval_batch,
                                                      task.metrics),
        eval_batch_size=eval_batch, meta={"encoder": encoder.fingerprint, "classes": names})
    return ClassificationSetup(task, data, *windows["test"], names,
                               baseline(train_docs, test_docs) if baseline else {})


def test_accuracy(setup: ClassificationSetup, params, batch_size: int = 64) -> dict:
    """Accuracy per test window and per test document (window log-probabilities summed)."""
    logits = jax.jit(lambda p, b: setup.task.logits(p, b))
    test = setup.test
    logp = np.concatenate([np.asarray(jax.nn.log_softmax(logits(params, test.rows(
        slice(start, start + batch_size))))) for start in range(0, len(test.tokens), batch_size)])
    if setup.task.per_token:  # a label per word (on its first subword), -1 elsewhere
        labelled = test.labels >= 0
        return {"word_accuracy": float(np.mean(logp.argmax(-1)[labelled] == test.labels[labelled])),
                "test_words": int(labelled.sum()), "test_documents": int(test.num_docs),
                **setup.baseline}
    docs = np.unique(setup.test_docs)
    doc_logp = np.stack([logp[setup.test_docs == d].sum(0) for d in docs])
    doc_label = np.array([test.labels[setup.test_docs == d][0] for d in docs])
    return {"window_accuracy": float(np.mean(logp.argmax(1) == test.labels)),
            "document_accuracy": float(np.mean(doc_logp.argmax(1) == doc_label)),
            "test_windows": int(len(test.tokens)), "test_documents": int(len(docs)),
            "majority_class_accuracy": float(np.bincount(doc_label).max() / len(doc_label))}


SCORES_FILE = "test_accuracy.json"  # lm/commands.py writes scores() here after training


def scores(config, setup: ClassificationSetup, params, step: int) -> dict:
    return {"step": step, **test_accuracy(setup, params)}
