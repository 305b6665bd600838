"""The causal-LM objective: next-token cross-entropy on packed windows, segment-aware.

A batch holds windows of T+1 tokens and their segment ids (0 = padding). Inputs are the first
T tokens, targets the last T. A target counts only if it belongs to the same document as the
token before it, so no loss is taken across a document boundary or on padding, and positions
restart at every document start inside a window. With `document_masking=False` attention and
positions run across the whole window instead (plain causal, as GPT-2 and nanoGPT train), which
lets a fused causal kernel (cuDNN flash attention) run; the loss mask stays the same.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from core.losses import chunked_cross_entropy
from core.task import LossSums
from lm.models import transformer as model_lib
from lm.objectives.window_task import WindowTask


def target_mask(segment_ids_BT1: jax.Array) -> jax.Array:
    """[B, T] True where the target is a real token of the same document as its input."""
    inputs_BT, targets_BT = segment_ids_BT1[:, :-1], segment_ids_BT1[:, 1:]
    return (inputs_BT == targets_BT) & (targets_BT > 0)


class CausalLMTask(WindowTask):
    name = "causal_lm"

    def loss(self, params, batch, rng, train: bool, weight_BT=None) -> LossSums:
        """Summed next-token loss; `weight_BT` (e.g. SFT's assistant-token mask) further
        restricts which targets count."""
        tokens_BT1, segments_BT1 = batch["tokens"], batch["segment_ids"]
        inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        mask_BT = target_mask(segments_BT1).astype(jnp.float32)
        if weight_BT is not None:
            mask_BT = mask_BT * weight_BT
        projection = self.projection_for_loss(params)
        if projection is not None:  # chunks of rows through the vocabulary: no B x T x V logits
            hidden_BTD = self.logits(params, inputs_BT, segments_BT1[:, :-1], rng, train,
                                     return_hidden=True)
            loss, weight, correct = chunked_cross_entropy(
                hidden_BTD.reshape(-1, hidden_BTD.shape[-1]), projection[0],
                targets_BT.reshape(-1), mask_BT.reshape(-1), self.model_cfg.loss_chunk,
                vocab_major=projection[1])
            return LossSums(loss=loss, weight=weight, extra={"accuracy": correct})
        logits_BTV = self.logits(params, inputs_BT, segments_BT1[:, :-1], rng, train)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(
            logits_BTV.astype(jnp.float32), targets_BT)
        correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
        return LossSums(loss=jnp.sum(nll_BT * mask_BT), weight=jnp.sum(mask_BT),
                        extra={"accuracy": jnp.sum(correct_BT * mask_BT)})

    @staticmethod
    def metrics(sums: dict[str, float], num_bytes: float) -> dict[str, float]:
        return lm_metrics(sums, num_bytes)


def lm_metrics(sums: dict[str, float], num_bytes: float) -> dict[str, float]:
    """Validation loss (nats/token), perplexity, accuracy and bits per byte from summed metrics."""
    weight = max(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": sums.get("accuracy", 0.0) / weight,
        "bits_per_byte": sums["loss"] / math.log(2) / max(num_bytes, 1.0),
        "tokens": sums["weight"],
        "bytes": num_bytes,
    }


def build_task(config, vocab_size: int) -> CausalLMTask:
    """The registry's builder (lm/objectives/registry.py): the model takes the tokenizer's ids."""
    return CausalLMTask(model_lib.config_from(config, vocab_size), config.data.seq_len,
                        config.data.get("document_masking", True))

HARNESS = True  # `evaluate --tasks` scores it with lm/eval/harness.py
LORA = True     # trains through LoRA adapters when config.lora.rank > 0
