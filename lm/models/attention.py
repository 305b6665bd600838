"""Attention as pure functions: masks from segment ids, and grouped-query dot-product attention.

Kept apart from the Flax layers (lm/models/layers.py) so that the long-sequence variants
(lm/models/efficient_attention.py) and the layers both build on them without importing each other.
Shape suffixes as in lm/models/layers.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# Logits of masked (query, key) pairs. Finite on purpose: a row with every key masked gives a
# uniform softmax instead of NaN. jnp.where (not addition) is used, so it cannot overflow.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attention_mask(segment_ids_BT: Array | None, T: int, causal: bool = True) -> Array:
    """Boolean mask (B or 1, T, S): query i sees key j iff j <= i (if causal) and seg[i] == seg[j].

    Padding (segment 0) follows the same rule, so it attends to earlier padding; its outputs are
    finite and meant to be ignored by the loss. The diagonal is always allowed, so no row is empty.
    """
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    if not causal:
        causal_TS = jnp.ones_like(causal_TS)
    if segment_ids_BT is None:
        return causal_TS[None]
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal_TS[None] & same_BTS


def cross_attention_mask(segment_ids_BT: Array | None, memory_segment_ids_BS: Array | None,
                         T: int, S: int) -> Array:
    """Boolean mask (B or 1, T, S) of cross-attention: query i sees memory token j iff they
    belong to the same segment (a packed window's document), whatever their order."""
    if memory_segment_ids_BS is None:
        return jnp.ones((1, T, S), bool)
    if segment_ids_BT is None:
        return jnp.broadcast_to((memory_segment_ids_BS > 0)[:, None, :],
                                (memory_segment_ids_BS.shape[0], T, S))
    return segment_ids_BT[:, :, None] == memory_segment_ids_BS[:, None, :]


def dot_product_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array,
                          bias_BNTS: Array | None = None) -> Array:
    """Plain grouped-query attention with float32 scores and softmax; bias (e.g. T5's relative
    positions) is added to the scaled scores.

    Query head n uses kv head n // G (the grouping of Hugging Face's repeat_kv).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) / math.sqrt(H)
    if bias_BNTS is not None:
        scores_BKGTS += bias_BNTS.reshape(bias_BNTS.shape[0], K, N // K, T, -1)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)
