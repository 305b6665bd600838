"""Attention as pure functions: masks from segment ids, and grouped-query dot-product attention.

Kept apart from the Flax layers (lm/models/layers.py) so that the long-sequence variants
(lm/models/efficient_attention.py) and the layers both build on them without importing each other.
Shape suffixes as in lm/models/layers.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from core.config import ConfigError

Array = jax.Array

# Logits of masked (query, key) pairs. Finite on purpose: a row with every key masked gives a
# uniform softmax instead of NaN. jnp.where (not addition) is used, so it cannot overflow.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


# Shared contexts (lm/eval/shared_context.py), several documents to a row: document d's context
# carries segment -d (shared_segment) and its continuations d * CHOICES_PER_CONTEXT + m for
# 0 < m < CHOICES_PER_CONTEXT (continuation_segment); a continuation sees itself and its own
# document's context. Packed documents use ids > 0, padding 0.
CHOICES_PER_CONTEXT = 64


def shared_segment(document: int) -> int:
    return -document


def continuation_segment(document: int, choice: int) -> int:
    return document * CHOICES_PER_CONTEXT + choice


def attention_mask(segment_ids_BT: Array | None, T: int, causal: bool = True) -> Array:
    """Boolean mask (B or 1, T, S): query i sees key j iff j <= i (if causal) and seg[i] == seg[j]
    or seg[j] is the shared context of seg[i]'s document.

    Padding (segment 0) follows the same rule, so it attends to earlier padding; its outputs are
    finite and meant to be ignored by the loss. The diagonal is always allowed, so no row is empty.
    """
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    if not causal:
        causal_TS = jnp.ones_like(causal_TS)
    if segment_ids_BT is None:
        return causal_TS[None]
    return causal_TS[None] & segments_see(segment_ids_BT, segment_ids_BT)


def segments_see(query_segment_ids_BT: Array, key_segment_ids_BS: Array) -> Array:
    """(B, T, S): whether each query's segment lets it see each key's (the same segment, or the
    shared context of the query's document), order aside."""
    query_BT1, key_B1S = query_segment_ids_BT[:, :, None], key_segment_ids_BS[:, None, :]
    return (query_BT1 == key_B1S) | ((key_B1S < 0) & (query_BT1 // CHOICES_PER_CONTEXT == -key_B1S))


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


def grouped_queries(q_BTNH: Array, K: int) -> Array:
    """Queries scaled by 1/sqrt(H) and grouped [B, T, K, G, H] by the kv head they use (query
    head n uses kv head n // G, Hugging Face's repeat_kv). Scaling q (T x H values) rather than
    the scores (T x S) saves a pass over the scores in both directions: 25% of the CPU
    attention's forward and backward at T=256."""
    B, T, N, H = q_BTNH.shape
    return (q_BTNH * jnp.asarray(1 / math.sqrt(H), q_BTNH.dtype)).reshape(B, T, K, N // K, H)


def dot_product_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array,
                          bias_BNTS: Array | None = None) -> Array:
    """Plain grouped-query attention with float32 scores and softmax; bias (e.g. T5's relative
    positions) is added to the scaled scores.

    Query head n uses kv head n // G (the grouping of Hugging Face's repeat_kv). One query per
    row (a decode step) goes to single_query_attention.
    """
    B, T, N, H = q_BTNH.shape
    if T == 1 and bias_BNTS is None:
        return single_query_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    K = k_BSKH.shape[2]
    q_BTKGH = grouped_queries(q_BTNH, K)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32)
    if bias_BNTS is not None:
        scores_BKGTS += bias_BNTS.reshape(bias_BNTS.shape[0], K, N // K, T, -1)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def single_query_attention(q_B1NH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1S: Array) -> Array:
    """Attention for one query per row (a decode step), as multiplies and sums in
    float32 that read the cache where it lies: as matmuls, XLA first copied each layer's whole
    key and value cache into the layouts its matmuls want, on every step."""
    B, _, N, H = q_B1NH.shape
    f32 = jnp.float32
    q_BKGH = grouped_queries(q_B1NH, k_BSKH.shape[2])[:, 0]
    scores_BSKG = jnp.sum(q_BKGH[:, None].astype(f32) * k_BSKH[:, :, :, None].astype(f32),
                          axis=-1)
    scores_BSKG = jnp.where(mask_B1S[:, 0, :, None, None], scores_BSKG, MASK_VALUE)
    probs_BSKG = jax.nn.softmax(scores_BSKG, axis=1)
    out_BKGH = jnp.sum(probs_BSKG[..., None] * v_BSKH[:, :, :, None].astype(f32), axis=1)
    return out_BKGH.astype(v_BSKH.dtype).reshape(B, 1, N, H)


# Query rows per block of causal_block_attention, and the most blocks it unrolls.
QUERY_BLOCK = 64
MAX_BLOCKS = 16


def causal_blocks(T: int) -> int:
    """How many query blocks causal_block_attention cuts T into by default (1: not worth it)."""
    blocks = min(T // QUERY_BLOCK, MAX_BLOCKS)
    return blocks if blocks > 1 and T % blocks == 0 else 1


def causal_block_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask_BTT: Array,
                           blocks: int | None = None) -> Array:
    """Causal self-attention by blocks of queries: block i scores only the keys of blocks 0..i,
    so most of the masked half of the scores is never computed (with 4 blocks, 10 of 16
    tiles). The result is dot_product_attention's with the same mask, which must be causal
    (packed and padded rows are fine).

    Why: XLA materialises the scores, so it cannot skip masked tiles as a flash kernel does;
    on a 2-core CPU at T=256 this halves the attention's forward and backward time.
    """
    T = q_BTNH.shape[1]
    blocks = causal_blocks(T) if blocks is None else blocks
    if T % blocks:
        raise ValueError(f"{blocks} query blocks do not divide the length {T}")
    if blocks == 1:
        return dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTT)
    rows = T // blocks
    out_BRNH = [dot_product_attention(q_BTNH[:, i * rows:(i + 1) * rows],
                                      k_BTKH[:, :(i + 1) * rows], v_BTKH[:, :(i + 1) * rows],
                                      mask_BTT[:, i * rows:(i + 1) * rows, :(i + 1) * rows])
                for i in range(blocks)]
    return jnp.concatenate(out_BRNH, axis=1)


def packed_segments(segment_ids_BT: Array) -> tuple[Array, Array]:
    """A packed row as cuDNN's segments: (lengths [B, T], starts [B, T + 1]), one entry per run
    of equal segment ids (a padding run is a segment too, as in attention_mask), -1 after the
    row's last. T entries always suffice, so no row can have more segments than are kept."""
    B, T = segment_ids_BT.shape
    starts_BT = jnp.concatenate([jnp.ones((B, 1), bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    count_B1 = jnp.sum(starts_BT, axis=1, keepdims=True)
    start_BT = jnp.sort(jnp.where(starts_BT, jnp.arange(T), T), axis=1)  # T past the last
    next_BT = jnp.concatenate([start_BT[:, 1:], jnp.full((B, 1), T)], axis=1)
    used_BT = jnp.arange(T) < count_B1
    lengths_BT = jnp.where(used_BT, next_BT - start_BT, -1).astype(jnp.int32)
    starts_BT1 = jnp.concatenate([jnp.where(used_BT, start_BT, -1), jnp.full((B, 1), -1)], axis=1)
    return lengths_BT, starts_BT1.astype(jnp.int32)


def cudnn_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array,
                    segment_ids_BT: Array | None, causal: bool) -> Array:
    """cuDNN's fused flash attention (NVIDIA GPUs only): no T x S scores in memory. Packed rows
    reach the kernel as segments (packed_segments), not as a dense mask, which would turn the
    flash kernel off."""
    # jax.nn does not take cuDNN's segment offsets; its own cuDNN module does.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    try:
        if segment_ids_BT is None:
            return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=causal,
                                                implementation="cudnn")
        lengths_BM, starts_BM1 = packed_segments(segment_ids_BT)
        mask = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
        return cudnn.dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, q_seqlen=lengths_BM, kv_seqlen=lengths_BM,
            q_offsets=starts_BM1, kv_offsets=starts_BM1, scale=1 / math.sqrt(q_BTNH.shape[-1]),
            mask_type=mask)
    except NotImplementedError as error:  # e.g. packed rows before Hopper, a head width
        raise ConfigError(f"cuDNN attention cannot run this step: {error} Use "
                          "--config.data.document_masking=false (no packed segments) or "
                          "--config.model.attention_impl=dot_product_attention") from None
    except RuntimeError as error:  # (after NotImplementedError, which is one)
        if "cuDNN" not in str(error):
            raise
        raise ConfigError(f"attention_impl='cudnn' needs an NVIDIA GPU with cuDNN ({error}); "
                          "use --config.model.attention_impl=xla here") from None
