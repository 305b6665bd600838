"""BERT-style masking and the masked-LM task (BERT, RoBERTa, SpanBERT) on the packed windows; the
objective module that builds it is lm/objectives/masked_lm.py (ELECTRA, distillation and the
sentence-pair tasks build on it too).

The encoder is lm/models/transformer.py with causal=False; attention and positions stay inside each document
of a packed window (segment ids). Masking is drawn inside the jitted loss from the step's RNG,
so every epoch sees a new mask: RoBERTa's dynamic masking (BERT's static masks were a data-
pipeline artefact, not a choice). Of the chosen tokens 80% become [MASK], 10% a random token
and 10% stay; the loss is the cross-entropy on the chosen tokens only. With span_mean > 0 the
chosen tokens are SpanBERT's contiguous spans, lengths ~ Geometric(p) clipped at max_span
(p = 0.2, max 10: mean 3.8), started at a rate that covers `rate` of the tokens.
[MASK] is the first id after the tokenizer's vocabulary (build_task pads the model's
vocabulary to a multiple of 128 past it, so it shards; the padding ids are never inputs or targets).
Evaluation draws its masks from a fixed key, so validation losses compare across steps.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from core.task import LossSums
from lm.models import transformer as model_lib
from lm.objectives.window_task import WindowTask, positions_from_segments, prediction_metrics


def mean_span_length(p: float, max_span: int) -> float:
    """Mean of Geometric(p) on 1, 2, ... truncated to at most max_span."""
    weights = [p * (1 - p) ** (k - 1) for k in range(1, max_span + 1)]
    return sum(k * w for k, w in enumerate(weights, 1)) / sum(weights)


def span_lengths(rng, shape, p: float, max_span: int) -> jax.Array:
    """Geometric(p) lengths truncated to 1..max_span, by inverting the truncated CDF."""
    q = 1.0 - p
    u_ = jax.random.uniform(rng, shape)
    lengths = jnp.ceil(jnp.log1p(-u_ * (1.0 - q ** max_span)) / math.log(q))
    return jnp.clip(lengths, 1, max_span).astype(jnp.int32)


def choose_positions(rng, real_BT, rate: float, span_p: float = 0.0,
                     max_span: int = 10) -> jax.Array:
    """[B, T] bool: the tokens to predict, about `rate` of the real ones (span_p = 0: each token
    independently; > 0: SpanBERT spans, which stop at padding but may cross documents)."""
    if not span_p:
        return jax.random.bernoulli(rng, rate, real_BT.shape) & real_BT
    start_rng, length_rng = jax.random.split(rng)
    start_rate = rate / mean_span_length(span_p, max_span)
    starts_BT = jax.random.bernoulli(start_rng, start_rate, real_BT.shape) & real_BT
    index_BT = jnp.broadcast_to(jnp.arange(real_BT.shape[1]), real_BT.shape)
    ends_BT = jnp.where(starts_BT, index_BT + span_lengths(length_rng, real_BT.shape, span_p,
                                                           max_span), 0)
    covered_BT = index_BT < jax.lax.cummax(ends_BT, axis=1)  # inside some span started earlier
    return covered_BT & real_BT


def corrupt(rng, tokens_BT, chosen_BT, mask_id: int, vocab_size: int) -> jax.Array:
    """BERT's 80/10/10: chosen tokens become [MASK], a random ordinary token, or stay."""
    kind_rng, token_rng = jax.random.split(rng)
    u_BT = jax.random.uniform(kind_rng, tokens_BT.shape)
    random_BT = jax.random.randint(token_rng, tokens_BT.shape, 0, vocab_size)
    replaced_BT = jnp.where(u_BT < 0.8, mask_id, jnp.where(u_BT < 0.9, random_BT, tokens_BT))
    return jnp.where(chosen_BT, replaced_BT, tokens_BT)


class MaskedLMTask(WindowTask):
    """An encoder on the packed windows: BERT's masking and loss on the chosen tokens."""
    name = "masked_lm"

    def __init__(self, model_cfg: model_lib.TransformerConfig, seq_len: int, mask_id: int,
                 rate: float = 0.15, span_p: float = 0.0, max_span: int = 10):
        if model_cfg.causal:
            raise ValueError("the masked-LM task needs an encoder: set model.causal=False")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"masking.rate must be in (0, 1), got {rate}")
        if span_p and not (0.0 < span_p < 1.0 and max_span >= 1):
            raise ValueError(f"masking.span_p must be in (0, 1) and max_span >= 1, got "
                             f"{span_p}, {max_span}")
        if not 0 < mask_id < model_cfg.vocab_size:
            raise ValueError(f"mask_id {mask_id} must be an id of the model's vocabulary "
                             f"({model_cfg.vocab_size}) past every ordinary token")
        super().__init__(model_cfg, seq_len)
        self.rate, self.span_p, self.max_span = rate, span_p, max_span
        self.mask_id = mask_id  # ordinary tokens are 0 .. mask_id - 1

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        # The pipeline's windows hold seq_len + 1 tokens (for next-token targets); use seq_len.
        tokens_BT = batch["tokens"][:, :self.seq_len]
        segments_BT = batch["segment_ids"][:, :self.seq_len]
        choose_rng, corrupt_rng, dropout_rng = jax.random.split(rng, 3)
        chosen_BT = choose_positions(choose_rng, segments_BT > 0, self.rate, self.span_p,
                                     self.max_span)
        inputs_BT = corrupt(corrupt_rng, tokens_BT, chosen_BT, self.mask_id, self.mask_id)
        logits_BTV = self.model.apply(
            {"params": params}, inputs_BT, positions_from_segments(segments_BT), segments_BT,
            deterministic=not train, rngs={"dropout": dropout_rng} if train else None)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(
            logits_BTV.astype(jnp.float32), tokens_BT)
        weight_BT = chosen_BT.astype(jnp.float32)
        correct_BT = (jnp.argmax(logits_BTV, axis=-1) == tokens_BT).astype(jnp.float32)
        return LossSums(loss=jnp.sum(nll_BT * weight_BT), weight=jnp.sum(weight_BT),
                        extra={"accuracy": jnp.sum(correct_BT * weight_BT)})

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float) -> dict[str, float]:
        """Loss per masked token, its perplexity and the masked tokens' accuracy."""
        return prediction_metrics(sums, "masked_tokens")
