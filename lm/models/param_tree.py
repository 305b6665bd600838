"""Parameter trees of the transformer: scanned <-> unrolled layers, a grown vocabulary, parameter
and FLOP counts.

What trainers, weights import and export, evaluation and benchmarks do with a transformer's
parameters, kept apart from its definition (lm/models/transformer.py) so that one stays the model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models.transformer import Transformer, TransformerConfig


def _inner(params):
    """Accepts either the full variables {"params": {...}} or the params dict itself."""
    return params["params"] if set(params) == {"params"} else params


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-layer params (layers_0 ... layers_{L-1}, scan_layers=False) -> stacked ("layers").
    Boxed params (model.init's, with logical axis names) come back unboxed: a box names the axes
    of one layer, not of the stack."""
    params = dict(nn.meta.unbox(_inner(params)))
    per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return params


def unstack_layers(params: dict) -> dict:
    """Stacked params (scan_layers=True) -> per-layer subtrees layers_0 ... layers_{L-1}."""
    params = dict(_inner(params))
    stacked = params.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return params


def grow_vocab(params: dict, vocab_size: int, seed: int = 0) -> dict:
    """The parameters with token_embed (V, E) and an untied unembed (D, V) grown to vocab_size.
    New rows start at the mean row plus a little noise of its spread, so that the new tokens
    begin as an average token rather than as outliers the softmax favours or never picks."""
    params, rng = dict(params), np.random.default_rng(seed)
    for name, axis in (("token_embed", 0), ("unembed", 1)):
        if name not in params or params[name].shape[axis] >= vocab_size:
            continue
        table = np.asarray(params[name])
        mean = table.mean(axis=axis, keepdims=True)
        shape = list(table.shape)
        shape[axis] = vocab_size - table.shape[axis]
        noise = rng.normal(0.0, 1.0, shape) * table.std(axis=axis, keepdims=True) * 0.1
        params[name] = np.concatenate([table, (mean + noise).astype(table.dtype)], axis=axis)
    return params


def with_scanned_layers(model, params):
    """The same transformer with its layers scanned (parameters stacked), for scoring.

    A whole task compiles tens of shapes: XLA then compiles one layer per shape instead of all
    of them (SmolLM2's 30 layers: 14 s instead of 36 s for 48 HellaSwag documents, 2.5x less),
    and warm scoring runs as fast (17.6 vs 18.1 s, alternating; docs/performance.md)."""
    if (type(model) is not Transformer or model.cfg.scan_layers
            or "layers_0" not in params):
        return model, params
    return (Transformer(dataclasses.replace(model.cfg, scan_layers=True)),
            stack_layers(params, model.cfg.num_layers))


_EMBEDDING_PARAMS = ("token_embed", "pos_embed", "type_embed", "unembed")


def count_params(params: Any, exclude_embeddings: bool = False) -> int:
    """Number of parameters. Works on arrays, boxed params or jax.eval_shape's ShapeDtypeStructs.

    exclude_embeddings drops every vocabulary- or position-sized table (token_embed, pos_embed,
    unembed): Kaplan et al.'s "non-embedding" count.
    """
    params = nn.meta.unbox(_inner(params))
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if exclude_embeddings and getattr(path[0], "key", None) in _EMBEDDING_PARAMS:
            continue
        total += math.prod(leaf.shape)
    return total


def _param_shapes(cfg: TransformerConfig):
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"]


def num_params(cfg: TransformerConfig, exclude_embeddings: bool = False) -> int:
    """Parameter count of a config, without allocating the parameters."""
    return count_params(_param_shapes(cfg), exclude_embeddings)


def flops_per_token(cfg: TransformerConfig, seq_len: int, causal_halved: bool = False) -> float:
    """Training FLOPs per token: 6 N + 12 L d_attn T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts the parameters that take part in a matmul for every token: every non-embedding
    parameter plus the output projection (V * D, whether tied or not). The input token table and
    the learned position table are lookups, not matmuls, so they are left out. (PaLM writes N for
    all parameters; with tied embeddings the two agree except for the position table, and this
    equals nanoGPT's estimate_mfu, which counts all parameters minus the position table.)
    The attention term 12 L d_attn T counts QK^T and AV over all T keys (forward and backward);
    causal_halved=True halves it, since a causal query sees on average T/2 keys.
    """
    shapes = _param_shapes(cfg)
    n = count_params(shapes, exclude_embeddings=True) + cfg.vocab_size * (cfg.embed_dim or
                                                                            cfg.d_model)
    if cfg.share_layers:  # one block's parameters, run num_layers times
        n += (cfg.num_layers - 1) * count_params(shapes["layers_shared"])
    attn = 12 * cfg.num_layers * cfg.d_attn * seq_len
    return 6.0 * n + (attn / 2 if causal_halved else attn)
