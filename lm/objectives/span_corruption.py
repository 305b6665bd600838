"""T5's span-corruption objective (Raffel et al. 2020) on the causal LM's packed windows.

Each window of T tokens is noised as T5's `random_spans_noise_mask` does: exactly
round(T * noise_density) noise tokens in round(noise / mean_span_length) spans, the span and gap
lengths a random partition of each count, the window opening with a gap. Each noise span becomes
one sentinel in the inputs; the targets are, for every span, its sentinel and then its tokens,
and end with EOS:
    tokens   A B C D E F G H         inputs   A <extra_id_0> D E <extra_id_1> H
    noise      ^ ^       ^ ^         targets  <extra_id_0> B C <extra_id_1> F G </s>
so both lengths are static (T - noise + spans and noise + spans + 1) and the whole corruption runs
inside the jitted loss, redrawn every step from the step's RNG (eval uses a fixed key). Sentinels
come from the top of the model's vocabulary, <extra_id_k> = vocab_size - 1 - k, as in T5;
lm/pipeline.py pads the vocabulary past the tokenizer's to make room for them.

Packing: a window may hold several documents (segment ids). The noise is drawn over the whole
window, but every input and target token keeps its document's segment id, sentinels are numbered
from 0 in each document, the decoder input restarts with the start token (T5: the pad id) at each
document's first target, and attention never crosses documents (cross-attention included). A span
that runs across a document boundary puts the next document's share of it at the start of that
document's targets, with no sentinel of its own. Padding (segment 0, only ever at a window's end,
as lm/data/windows.py packs) is neither input nor target. The loss is the decoder's cross-entropy on every
real target token (sentinels and EOS included).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax

from core.task import LossSums
from lm.data.tokenizer import EOS_ID, PAD_ID
from lm.models import encoder_decoder
from lm.models import transformer as model_lib
from lm.objectives.window_task import WindowTask, positions_from_segments, prediction_metrics


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence, as T5 rounds them (at least one of each)."""
    length = max(length, 2)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, max(round(num_noise / mean_span_length), 1)


def corrupted_lengths(length: int, noise_density: float,
                      mean_span_length: float) -> tuple[int, int]:
    """(inputs length, targets length) after corrupting `length` tokens."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans, num_noise + num_spans + 1


def _random_segmentation(uniform_N: jax.Array, num_items: int, num_segments: int) -> jax.Array:
    """(num_segments,) positive lengths summing to num_items, uniformly over such partitions:
    the segments start after a uniformly random set of num_segments - 1 of the num_items - 1
    gaps, the top k of iid uniform draws (T5 shuffles a 0/1 vector: the same law)."""
    if num_segments == 1:
        return jnp.full((1,), num_items, jnp.int32)
    _, cuts = jax.lax.top_k(uniform_N[:num_items - 1], num_segments - 1)
    first_in_segment = jnp.zeros(num_items, jnp.int32).at[cuts + 1].set(1)
    return jnp.zeros(num_segments, jnp.int32).at[jnp.cumsum(first_in_segment)].add(1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_spans_noise_mask(rng, length: int, noise_density: float,
                            mean_span_length: float) -> jax.Array:
    """(length,) bool, True on noise: T5's random_spans_noise_mask (random_roll=False)."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
    padded = max(length, 2)
    uniform_2N = jax.random.uniform(rng, (2, padded))  # one draw for both partitions
    noise_lengths = _random_segmentation(uniform_2N[0], num_noise, num_spans)
    gap_lengths = _random_segmentation(uniform_2N[1], padded - num_noise, num_spans)
    interleaved = jnp.stack([gap_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = jnp.cumsum(interleaved)[:-1]
    span_number = jnp.cumsum(jnp.zeros(padded, jnp.int32).at[span_starts].add(1))
    return (span_number % 2 == 1)[:length]


def _corrupt_row(rng, tokens_T, segments_T, noise_density, mean_span_length, vocab_size,
                 eos_id, start_id):
    T = tokens_T.shape[0]
    inputs_len, targets_len = corrupted_lengths(T, noise_density, mean_span_length)
    noise_T = random_spans_noise_mask(rng, T, noise_density, mean_span_length)
    span_start_T = noise_T & ~jnp.concatenate([jnp.zeros(1, bool), noise_T[:-1]])
    spans_before_T = jnp.cumsum(span_start_T) - span_start_T
    doc_start_T = jnp.concatenate([jnp.ones(1, bool), segments_T[1:] != segments_T[:-1]])
    first_span_T = jax.lax.cummax(jnp.where(doc_start_T, spans_before_T, 0))
    sentinel_T = vocab_size - 1 - (spans_before_T - first_span_T)
    put = lambda n, slot_T, values_T: jnp.zeros(n, jnp.int32).at[slot_T].set(values_T,
                                                                              mode="drop")
    # Inputs: the kept tokens, and a span's sentinel in place of its first token.
    kept_T = ~noise_T | span_start_T
    slot_T = jnp.where(kept_T, jnp.cumsum(kept_T) - 1, inputs_len)  # inputs_len: dropped
    inputs_S = put(inputs_len, slot_T, jnp.where(span_start_T, sentinel_T, tokens_T))
    input_segments_S = put(inputs_len, slot_T, segments_T)
    # Targets: each noise token, after as many sentinels as spans have started up to it.
    slot_T = jnp.cumsum(noise_T) - 1 + jnp.cumsum(span_start_T)
    token_slot_T = jnp.where(noise_T, slot_T, targets_len)
    sentinel_slot_T = jnp.where(span_start_T, slot_T - 1, targets_len)
    targets_L = put(targets_len, token_slot_T, tokens_T).at[sentinel_slot_T].set(
        sentinel_T, mode="drop")
    target_segments_L = put(targets_len, token_slot_T, segments_T).at[sentinel_slot_T].set(
        segments_T, mode="drop")
    # EOS right after the last real target, in its segment (padding targets come after it).
    real = jnp.sum(target_segments_L > 0)
    targets_L = targets_L.at[real].set(eos_id)
    target_segments_L = target_segments_L.at[real].set(
        jnp.where(real > 0, target_segments_L[real - 1], 0))
    new_doc_L = jnp.concatenate([jnp.ones(1, bool),
                                 target_segments_L[1:] != target_segments_L[:-1]])
    decoder_inputs_L = jnp.where(new_doc_L, start_id,
                                 jnp.concatenate([targets_L[:1], targets_L[:-1]]))
    return {"inputs": inputs_S, "input_segment_ids": input_segments_S, "targets": targets_L,
            "target_segment_ids": target_segments_L, "decoder_inputs": decoder_inputs_L}


@functools.partial(jax.jit, static_argnames=("noise_density", "mean_span_length", "vocab_size",
                                             "eos_id", "start_id"))
def span_corrupt(rng, tokens_BT, segment_ids_BT, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, vocab_size: int = 32128, eos_id: int = EOS_ID,
                 start_id: int = PAD_ID) -> dict[str, jax.Array]:
    """Corrupts every row with its own key: inputs and input_segment_ids (B, S); targets,
    target_segment_ids and decoder_inputs (targets shifted right, start_id at each document's
    first target) (B, L). Sentinel k is vocab_size - 1 - k."""
    row = functools.partial(_corrupt_row, noise_density=noise_density,
                            mean_span_length=mean_span_length, vocab_size=vocab_size,
                            eos_id=eos_id, start_id=start_id)
    rngs = jax.random.split(rng, tokens_BT.shape[0])
    return jax.vmap(row)(rngs, tokens_BT.astype(jnp.int32), segment_ids_BT.astype(jnp.int32))


class SpanCorruptionTask(WindowTask):
    """The packed windows, corrupted on device into T5's inputs and targets for an
    encoder-decoder."""
    name = "span_corruption"

    def __init__(self, model_cfg: model_lib.TransformerConfig, seq_len: int,
                 ordinary_vocab: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 num_sentinels: int = 100, document_masking: bool = True,
                 eos_id: int = EOS_ID, start_id: int = PAD_ID):
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"span_corruption.noise_density must be in (0, 1), got "
                             f"{noise_density}")
        if mean_span_length < 1.0:
            raise ValueError(f"span_corruption.mean_span_length must be >= 1, got "
                             f"{mean_span_length}")
        if seq_len < 2:
            raise ValueError(f"span corruption needs windows of at least 2 tokens, got {seq_len}")
        num_noise, num_spans = noise_counts(seq_len, noise_density, mean_span_length)
        if num_spans > seq_len - num_noise:
            raise ValueError(f"{num_spans} noise spans need as many gaps between them, but only "
                             f"{seq_len - num_noise} of {seq_len} tokens are not noise: lower "
                             "noise_density or raise mean_span_length")
        if num_sentinels < num_spans:
            raise ValueError(f"a window of {seq_len} tokens has {num_spans} noise spans but "
                             f"span_corruption.num_sentinels is {num_sentinels}; raise it")
        if model_cfg.vocab_size - num_sentinels < ordinary_vocab:
            raise ValueError(f"model.vocab_size {model_cfg.vocab_size} leaves no room for "
                             f"{num_sentinels} sentinels above the tokenizer's {ordinary_vocab} "
                             "ids; set model.vocab_size=0 to size it automatically")
        super().__init__(model_cfg, seq_len, document_masking,
                         model=encoder_decoder.EncoderDecoder(model_cfg))
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.num_sentinels, self.eos_id, self.start_id = num_sentinels, eos_id, start_id
        self.ordinary_vocab = ordinary_vocab
        self.inputs_len, self.targets_len = corrupted_lengths(seq_len, noise_density,
                                                              mean_span_length)

    def sentinel(self, k: int) -> int:
        """The id of <extra_id_k>."""
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"<extra_id_{k}>: this model has sentinels 0 .. "
                             f"{self.num_sentinels - 1}")
        return self.model_cfg.vocab_size - 1 - k

    def init_params(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, self.inputs_len), jnp.int32),
                               jnp.zeros((1, self.targets_len), jnp.int32))["params"]

    def corrupt(self, rng, batch) -> dict[str, jax.Array]:
        """The corrupted pairs of a batch of windows (their first seq_len tokens)."""
        segments_BT = batch["segment_ids"][:, :self.seq_len]
        if not self.document_masking:  # the window's real tokens as one document
            segments_BT = (segments_BT > 0).astype(jnp.int32)
        return span_corrupt(rng, batch["tokens"][:, :self.seq_len], segments_BT,
                            self.noise_density, self.mean_span_length,
                            self.model_cfg.vocab_size, self.eos_id, self.start_id)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        corrupt_rng, dropout_rng = jax.random.split(rng)
        pair = self.corrupt(corrupt_rng, batch)
        logits_BLV = self.model.apply(
            {"params": params}, pair["inputs"], pair["decoder_inputs"],
            pair["input_segment_ids"], pair["target_segment_ids"],
            positions_from_segments(pair["input_segment_ids"]),
            positions_from_segments(pair["target_segment_ids"]), deterministic=not train,
            rngs={"dropout": dropout_rng} if train else None)
        nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, pair["targets"])
        weight_BL = (pair["target_segment_ids"] > 0).astype(jnp.float32)
        correct_BL = (jnp.argmax(logits_BLV, axis=-1) == pair["targets"]).astype(jnp.float32)
        return LossSums(loss=jnp.sum(nll_BL * weight_BL), weight=jnp.sum(weight_BL),
                        extra={"accuracy": jnp.sum(correct_BL * weight_BL)})

    def train_flops_per_example(self) -> float:
        return encoder_decoder.flops_per_example(self.model_cfg, self.inputs_len,
                                                 self.targets_len)

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float) -> dict[str, float]:
        """Loss per target token (sentinels and EOS included), its perplexity and accuracy."""
        return prediction_metrics(sums, "target_tokens")


CONFIG_RANGES = {"span_corruption": {"noise_density": "(0, 1)", "mean_span_length": ">= 1",
                                     "num_sentinels": ">= 1"}}


def build_task(config, vocab_size: int) -> SpanCorruptionTask:
    """The sentinels take the top ids of the model's vocabulary, above the tokenizer's."""
    spans = config.span_corruption
    model_cfg = model_lib.config_from(config, model_lib.padded_vocab(vocab_size,
                                                                     spans.num_sentinels))
    return SpanCorruptionTask(model_cfg, config.data.seq_len, vocab_size, spans.noise_density,
                              spans.mean_span_length, spans.num_sentinels,
                              config.data.get("document_masking", True))


# ---------------------------------------------------------------------------------------------
# Sample hooks (lm/commands.py): a prompt with <extra_id_k> blanks in, the filled spans out
# ---------------------------------------------------------------------------------------------

_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def encode_prompt(task: SpanCorruptionTask, tokenizer, text: str) -> list[int]:
    """BOS + the text's ids, each <extra_id_k> in it replaced by sentinel k."""
    pieces = _SENTINEL.split(text)
    if len(pieces) == 1:
        raise ValueError("the prompt has no <extra_id_0> (T5's blank marker): write one where "
                         "the model should fill in text, e.g. 'It is a <extra_id_0> that'")
    ids = [tokenizer.bos_id]
    for index, piece in enumerate(pieces):
        if index % 2:
            ids.append(task.sentinel(int(piece)))
        elif piece:
            ids.extend(tokenizer.encode([piece])[0])
    return ids


def render_output(task: SpanCorruptionTask, tokenizer, ids: list[int]) -> str:
    """Targets as text, each sentinel written <extra_id_k> (ids past the tokenizer's that are
    no sentinel, which training never targets, are left out)."""
    first_sentinel = task.model_cfg.vocab_size - task.num_sentinels
    parts, run = [], []
    for token in ids:
        if token >= first_sentinel:
            parts += [tokenizer.decode(run), f"<extra_id_{task.model_cfg.vocab_size - 1 - token}>"]
            run = []
        elif token < task.ordinary_vocab:
            run.append(token)
    return "".join(parts + [tokenizer.decode(run)])
