"""The base of every objective trained on packed token windows (lm/data/windows.py).

A batch holds windows of T+1 tokens and their segment ids (0 = padding); each segment is one
document. The base owns the model, its initialisation, the batch fields, FLOPs and the sizes that
scaling-law fits read; each objective (causal LM, masked LM, ELECTRA, distillation, span
corruption, denoising) adds its loss and metrics. Positions restart at every document start
inside a window unless `document_masking=False`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from core.task import BatchField
from lm.models import param_tree
from lm.models import transformer as model_lib


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token within its segment: 0 at a segment's first token in the window."""
    length = segment_ids_BT.shape[1]
    index_BT = jnp.broadcast_to(jnp.arange(length), segment_ids_BT.shape)
    starts_BT = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool),
         segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_index_BT = jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)
    return index_BT - start_index_BT


class WindowTask:
    """Parameters, logits, batch fields and FLOPs of a model trained on packed windows; the
    subclass gives `name`, `loss` and `metrics`. `model` defaults to the config's Transformer."""

    def __init__(self, model_cfg: model_lib.TransformerConfig, seq_len: int,
                 document_masking: bool = True, model=None):
        if seq_len > model_cfg.max_len:
            raise ValueError(f"data.seq_len {seq_len} exceeds model.max_len {model_cfg.max_len}")
        self.model_cfg = model_cfg
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.model = model if model is not None else model_lib.Transformer(model_cfg)

    def init_params(self, rng):
        tokens_BT = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens_BT)["params"]

    def logits(self, params, tokens_BT, segment_ids_BT, rng=None, train=False, **kwargs):
        """The model's output on packed windows (logits; kwargs such as return_hidden)."""
        if self.document_masking:
            positions_BT = positions_from_segments(segment_ids_BT)
        else:
            positions_BT, segment_ids_BT = jnp.broadcast_to(
                jnp.arange(tokens_BT.shape[1]), tokens_BT.shape), None
        return self.model.apply(
            {"params": params}, tokens_BT, positions_BT,
            segment_ids_BT, deterministic=not train,
            rngs={"dropout": rng} if train and rng is not None else None, **kwargs)

    def projection_for_loss(self, params):
        """(unembedding, vocab_major) when the loss may project hidden states itself, a chunk of
        rows at a time (model.loss_chunk > 0, plain parameters, no factorised embedding); else
        None and the loss reads the model's logits."""
        cfg = self.model_cfg
        if not cfg.loss_chunk or cfg.embed_dim or not isinstance(params, dict):
            return None
        if cfg.tie_embeddings:
            return params["token_embed"], True
        return params["unembed"], False

    def batch_fields(self):
        shape = (self.seq_len + 1,)
        return {"tokens": BatchField(shape, jnp.int32, ("batch", "length")),
                "segment_ids": BatchField(shape, jnp.int32, ("batch", "length"))}

    def train_flops_per_example(self) -> float:
        return param_tree.flops_per_token(self.model_cfg, self.seq_len) * self.seq_len

    def units_per_example(self):
        return "tokens", self.seq_len

    def describe(self) -> dict[str, float]:
        """Sizes a run's summary records for scaling-law fits (both of Kaplan's and PaLM's N)."""
        shapes = jax.eval_shape(self.init_params, jax.random.key(0))
        return {"params_non_embedding": param_tree.count_params(shapes, exclude_embeddings=True),
                "train_flops_per_token": self.train_flops_per_example() / self.seq_len}


def prediction_metrics(sums: dict[str, float], count_name: str) -> dict[str, float]:
    """Loss per predicted token, its perplexity and accuracy, and the count of predicted tokens
    under `count_name` (masked LM: masked tokens; span corruption: target tokens)."""
    weight = max(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": sums.get("accuracy", 0.0) / weight, count_name: sums["weight"]}
