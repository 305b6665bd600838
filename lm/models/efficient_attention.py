"""Attention for long sequences: sliding window + global tokens (Longformer), low-rank sequence
projection (Linformer) and hashing into buckets (Reformer), beside plain full attention.

Every function is pure, has the call style of `attention.dot_product_attention` (self-attention, so
T == S) and takes `segment_ids_BT` (None or int ids, 0 = padding; a token attends only within its
own segment: attention's shared contexts mean nothing here) and `causal`. Integer arguments (window, hashes, chunk)
decide shapes: mark them static under jax.jit (functools.partial or static_argnames).

Shape suffixes follow lm/models/layers.py (B batch, T query length, S key length, N query heads, K kv
heads, G = N // K, H head width), plus:
  W  block length of the sliding window      C  number of blocks (or LSH chunks)
  J  keys one block or chunk sees            M  global tokens (at most max_global per row)
  L  Linformer's projected length            R  hash rounds (n_hashes)
  U  hash buckets (n_buckets; u = U / 2)     Q  queries in one LSH chunk
  P  LSH rows or columns of all chunks, flattened (C*Q or C*J)

Scores and softmax are float32 and masked with jnp.where(..., MASK_VALUE), as in layers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lm.models.attention import MASK_VALUE, attention_mask, dot_product_attention

Array = jax.Array


def _segments(segment_ids_BT: Array | None, B: int, T: int) -> Array:
    """Segment ids with None read as one segment, so every mask can compare ids."""
    if segment_ids_BT is None:
        return jnp.ones((B, T), jnp.int32)
    return segment_ids_BT.astype(jnp.int32)


def full_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                   segment_ids_BT: Array | None = None, causal: bool = True) -> Array:
    """The O(T^2) reference, wrapped so that a benchmark can call every variant alike."""
    mask_BTS = attention_mask(segment_ids_BT, q_BTNH.shape[1], causal)
    return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)


# ---------------------------------------------------------------------------------------------
# Sliding window + global tokens (Longformer, Beltagy et al. 2020)
# ---------------------------------------------------------------------------------------------

def _blocks(x_BT: Array, W: int, C: int, fill) -> Array:
    """(B, T, ...) -> (B, C, W, ...), the time axis padded with `fill` to C*W."""
    pad = [(0, 0), (0, C * W - x_BT.shape[1])] + [(0, 0)] * (x_BT.ndim - 2)
    x = jnp.pad(x_BT, pad, constant_values=fill)
    return x.reshape(x.shape[0], C, W, *x.shape[2:])


def _neighbours(x_BT: Array, W: int, C: int, causal: bool, fill) -> Array:
    """(B, T, ...) -> (B, C, J, ...): for block c, blocks c-1, c (and c+1 unless causal).

    Blocks are as long as the window, so these hold every key within `window` of the block.
    """
    x_BCW = _blocks(x_BT, W, C, fill)
    pad = [(0, 0), (1, 1)] + [(0, 0)] * (x_BCW.ndim - 2)
    x = jnp.pad(x_BCW, pad, constant_values=fill)  # (B, C+2, W, ...)
    parts = [x[:, :C], x[:, 1:C + 1]] + ([] if causal else [x[:, 2:]])
    x_BCJ = jnp.concatenate(parts, axis=2)
    return x_BCJ


def _global_positions(global_BT: Array, max_global: int | None) -> Array:
    """Positions (B, M) of the global tokens, T where a row has fewer than M.

    M must be static; it is read from global_BT when that is concrete, else max_global is needed.
    """
    T = global_BT.shape[1]
    if max_global is None:
        try:
            max_global = int(np.asarray(global_BT).sum(axis=1).max())
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            raise ValueError("global_BT is traced (under jit): pass a static max_global, the "
                             "most global tokens a row may have") from None
    nonzero = lambda g_T: jnp.nonzero(g_T, size=max_global, fill_value=T)[0]
    return jax.vmap(nonzero)(global_BT)


def sliding_window_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                             segment_ids_BT: Array | None = None, causal: bool = True, *,
                             window: int, global_BT: Array | None = None,
                             max_global: int | None = None) -> Array:
    """Each token sees keys at most `window` positions away (only earlier ones when causal), and
    global tokens: a global token sees every key of its segment, every token sees the global
    keys of its segment (when causal, only those at or before it: anything else leaks the future).

    Memory is O(T * (window + M)): queries go in blocks of W = window and each block scores only
    its neighbouring key blocks, never a T x T matrix. Global keys are scored once per query and
    joined to the local scores in one softmax (and masked out of the local ones, so none counts
    twice); the M global query rows are plain full attention over all keys, O(M * T), written over
    their local rows. At most max_global tokens per row are global (those past it are treated as
    local; under jit max_global is required, see _global_positions).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    seg_BT = _segments(segment_ids_BT, B, T)
    W = max(1, min(window, T))
    C = -(-T // W)

    if global_BT is not None:
        idx_BM = _global_positions(global_BT, max_global)
    else:
        idx_BM = jnp.zeros((B, 0), jnp.int32)
    M = idx_BM.shape[1]
    valid_BM = idx_BM < T
    is_global_BT = jnp.zeros((B, T + 1), bool).at[jnp.arange(B)[:, None], idx_BM].set(True)[:, :T]

    q_BCWKGH = _blocks(q_BTNH, W, C, 0).reshape(B, C, W, K, G, H)
    k_BCJKH = _neighbours(k_BSKH, W, C, causal, 0)
    v_BCJKH = _neighbours(v_BSKH, W, C, causal, 0)
    J = k_BCJKH.shape[2]
    qpos_CW = jnp.arange(C * W).reshape(C, W)
    kpos_CJ = jnp.arange(C)[:, None] * W - W + jnp.arange(J)[None, :]
    seg_q_BCW = _blocks(seg_BT, W, C, -1)
    seg_k_BCJ = _neighbours(seg_BT, W, C, causal, -1)
    global_k_BCJ = _neighbours(is_global_BT, W, C, causal, False)

    near_CWJ = ((kpos_CJ[:, None, :] >= 0) & (kpos_CJ[:, None, :] < T)
                & (jnp.abs(qpos_CW[:, :, None] - kpos_CJ[:, None, :]) <= window))
    if causal:
        near_CWJ &= kpos_CJ[:, None, :] <= qpos_CW[:, :, None]
    local_BCWJ = (near_CWJ[None] & (seg_q_BCW[..., None] == seg_k_BCJ[:, :, None, :])
                  & ~global_k_BCJ[:, :, None, :])
    scores_BKGCWJ = jnp.einsum("bcwkgh,bcjkh->bkgcwj", q_BCWKGH, k_BCJKH,
                               preferred_element_type=jnp.float32) / math.sqrt(H)
    scores_BKGCWJ = jnp.where(local_BCWJ[:, None, None], scores_BKGCWJ, MASK_VALUE)
    if M == 0:
        probs_BKGCWJ = jax.nn.softmax(scores_BKGCWJ, axis=-1).astype(v_BSKH.dtype)
        out_BCWKGH = jnp.einsum("bkgcwj,bcjkh->bcwkgh", probs_BKGCWJ, v_BCJKH)
        return out_BCWKGH.reshape(B, C * W, N, H)[:, :T]

    # Local queries also see the global keys: one softmax over [local keys, global keys].
    take = lambda x_BT, idx_BM: jnp.take_along_axis(
        x_BT, jnp.minimum(idx_BM, T - 1).reshape(idx_BM.shape + (1,) * (x_BT.ndim - 2)), axis=1)
    kg_BMKH, vg_BMKH, seg_g_BM = take(k_BSKH, idx_BM), take(v_BSKH, idx_BM), take(seg_BT, idx_BM)
    to_global_BCWM = valid_BM[:, None, None, :] & (seg_q_BCW[..., None] == seg_g_BM[:, None, None])
    if causal:
        to_global_BCWM &= idx_BM[:, None, None, :] <= qpos_CW[None, :, :, None]
    scores_g_BKGCWM = jnp.einsum("bcwkgh,bmkh->bkgcwm", q_BCWKGH, kg_BMKH,
                                 preferred_element_type=jnp.float32) / math.sqrt(H)
    scores_g_BKGCWM = jnp.where(to_global_BCWM[:, None, None], scores_g_BKGCWM, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([scores_BKGCWJ, scores_g_BKGCWM], -1), axis=-1)
    probs = probs.astype(v_BSKH.dtype)
    out_BCWKGH = (jnp.einsum("bkgcwj,bcjkh->bcwkgh", probs[..., :J], v_BCJKH)
                  + jnp.einsum("bkgcwm,bmkh->bcwkgh", probs[..., J:], vg_BMKH))
    out_BTNH = out_BCWKGH.reshape(B, C * W, N, H)[:, :T]

    # Global queries see every key of their segment: full attention for M rows only.
    from_global_BMS = seg_g_BM[:, :, None] == seg_BT[:, None, :]
    if causal:
        from_global_BMS &= jnp.arange(T)[None, None, :] <= idx_BM[:, :, None]
    out_g_BMNH = dot_product_attention(take(q_BTNH, idx_BM), k_BSKH, v_BSKH,
                                              from_global_BMS)
    return out_BTNH.at[jnp.arange(B)[:, None], idx_BM].set(out_g_BMNH, mode="drop")


# ---------------------------------------------------------------------------------------------
# Linformer (Wang et al. 2020)
# ---------------------------------------------------------------------------------------------

def linformer_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                        segment_ids_BT: Array | None = None, causal: bool = False, *,
                        e_SL: Array, f_SL: Array) -> Array:
    """Keys and values projected along the sequence to L rows (k' = E^T k, v' = F^T v), so the
    score matrix is T x L: O(T * L) time and memory.

    E and F are (S_max, L), sliced to this S. Padding (segment 0) keys and values are zeroed
    before the projection. Beyond that segments are not separated: every projected row mixes all
    positions, so pack one document per row.
    """
    if causal:
        raise ValueError("linformer_attention cannot be causal: each projected key/value row is a "
                         "weighted sum over every position, future ones included, so no mask on "
                         "the T x L scores can hide the future. Use it for encoders (causal=False)")
    B, S = k_BSKH.shape[:2]
    if e_SL.shape[0] < S or f_SL.shape[0] < S:
        raise ValueError(f"projections {e_SL.shape}, {f_SL.shape} are shorter than S={S}")
    if segment_ids_BT is not None:
        keep_BS11 = (segment_ids_BT != 0)[:, :, None, None]
        k_BSKH = jnp.where(keep_BS11, k_BSKH, 0)
        v_BSKH = jnp.where(keep_BS11, v_BSKH, 0)
    k_BLKH = jnp.einsum("bskh,sl->blkh", k_BSKH, e_SL[:S].astype(k_BSKH.dtype))
    v_BLKH = jnp.einsum("bskh,sl->blkh", v_BSKH, f_SL[:S].astype(v_BSKH.dtype))
    mask_BTL = jnp.ones((1, q_BTNH.shape[1], k_BLKH.shape[1]), bool)
    return dot_product_attention(q_BTNH, k_BLKH, v_BLKH, mask_BTL)


# ---------------------------------------------------------------------------------------------
# LSH attention (Reformer, Kitaev et al. 2020), with separate queries and keys
# ---------------------------------------------------------------------------------------------

def _hash(x_BKGTH: Array, rotations_RHu: Array, n_buckets: int) -> Array:
    """Angular LSH: bucket = argmax over [xR, -xR], one random rotation per round -> (B,K,G,R,T)."""
    B, K, G, T, _ = x_BKGTH.shape
    if n_buckets == 1:
        return jnp.zeros((B, K, G, rotations_RHu.shape[0], T), jnp.int32)
    rotated = jnp.einsum("bkgth,rhu->bkgrtu", x_BKGTH, rotations_RHu.astype(x_BKGTH.dtype),
                         preferred_element_type=jnp.float32)
    return jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)


def _gather(x_BKGT: Array, idx_BKGRP: Array) -> Array:
    """x (B,K,G or 1,T[,...]) at positions idx (B,K,G,R,P) -> (B,K,G,R,P[,...]), per round."""
    extra = x_BKGT.ndim - 4
    x = x_BKGT[:, :, :, None]
    idx = idx_BKGRP.reshape(idx_BKGRP.shape + (1,) * extra)
    return jnp.take_along_axis(x, idx, axis=4)


def lsh_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                  segment_ids_BT: Array | None = None, causal: bool = True, *,
                  n_hashes: int, n_buckets: int, rng_key: Array, chunk: int) -> Array:
    """Reformer's LSH attention with separate q and k (not shared-QK), so it drops into any model.

    Shared-QK makes one sorted order serve queries and keys, and chunk c of it attends to chunks
    c-1 and c. Here queries and keys are hashed with the same random rotations and each sorted by
    (bucket, position); a chunk of `chunk` queries attends to the J keys that line up with it in
    that shared order: starting `chunk` keys before where its first query would sort among the
    keys, J = 2*chunk (3*chunk unless causal, as a bucket may continue past the chunk). Masks:
    same bucket, same segment, key position <= query position when causal. Rounds are combined
    by their log-sum-exp, and a pair sharing a bucket in n rounds has its score lowered by log n
    (the paper's duplicate correction), so the result approximates softmax attention over the
    union of keys found. As attention.attention_mask always allows the diagonal, each query also
    always sees its own key (a separate term, counted in n), so no row is empty.

    Cost O(R * T * chunk): scores are (B, N, R, C, chunk, J). Causal masking holds for values
    and gradients, but which earlier keys a query finds can shift with later tokens' hashes
    (they move chunk edges), as in the Reformer. n_buckets must be even (or 1: no hashing).
    """
    if n_buckets != 1 and n_buckets % 2:
        raise ValueError(f"n_buckets={n_buckets} must be even (argmax over [xR, -xR]) or 1")
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G, R = N // K, n_hashes
    Q = min(chunk, T)                       # queries per chunk
    C = -(-T // Q)
    J = min((2 if causal else 3) * Q, T)    # keys per chunk
    seg_BT = _segments(segment_ids_BT, B, T)
    q_BKGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BK1TH = k_BSKH.transpose(0, 2, 1, 3)[:, :, None]
    v_BK1TH = v_BSKH.transpose(0, 2, 1, 3)[:, :, None]
    seg_111T = seg_BT[:, None, None, :]
    pos_T = jnp.arange(T)

    rotations_RHu = jax.random.normal(rng_key, (R, H, max(n_buckets // 2, 1)), jnp.float32)
    bucket_q_BKGRT = _hash(q_BKGTH, rotations_RHu, n_buckets)
    bucket_k_BK1RT = _hash(k_BK1TH, rotations_RHu, n_buckets)
    # One order for both: bucket, then position, a key before the query at its position.
    sort_q_BKGRT = bucket_q_BKGRT * 2 * T + 2 * pos_T + 1
    sort_k_BKGRT = jnp.broadcast_to(bucket_k_BK1RT * 2 * T + 2 * pos_T, sort_q_BKGRT.shape)
    order_q_BKGRT = jnp.argsort(sort_q_BKGRT, axis=-1)
    order_k_BKGRT = jnp.argsort(sort_k_BKGRT, axis=-1)

    # Each chunk's keys: J consecutive sorted keys, from `Q` before its first query's place.
    first_q_BKGRC = jnp.take_along_axis(sort_q_BKGRT, order_q_BKGRT[..., ::Q], axis=-1)
    sorted_k_BKGRT = jnp.take_along_axis(sort_k_BKGRT, order_k_BKGRT, axis=-1)
    place_BKGRC = jax.vmap(jnp.searchsorted)(sorted_k_BKGRT.reshape(-1, T),
                                             first_q_BKGRC.reshape(-1, C)).reshape(B, K, G, R, C)
    start_BKGRC = jnp.clip(place_BKGRC - Q, 0, T - J)
    kidx_BKGRCJ = start_BKGRC[..., None] + jnp.arange(J)
    kpos_BKGRP = jnp.take_along_axis(order_k_BKGRT, kidx_BKGRCJ.reshape(B, K, G, R, C * J), -1)
    qpos_BKGRP = jnp.pad(order_q_BKGRT, [(0, 0)] * 4 + [(0, C * Q - T)])  # padding rows: dropped

    rows = lambda x: _gather(x, qpos_BKGRP).reshape((B, K, G, R, C, Q) + x.shape[4:])
    cols = lambda x: _gather(x, kpos_BKGRP).reshape((B, K, G, R, C, J) + x.shape[4:])
    qpos_r, kpos_c = rows(pos_T[None, None, None]), cols(pos_T[None, None, None])
    rounds_q_BKGTR = jnp.moveaxis(bucket_q_BKGRT, 3, 4)
    rounds_k_BK1TR = jnp.moveaxis(bucket_k_BK1RT, 3, 4)
    rounds_r, rounds_c = rows(rounds_q_BKGTR), cols(rounds_k_BK1TR)  # every round's bucket
    bucket_r = jnp.take_along_axis(bucket_q_BKGRT, qpos_BKGRP, -1).reshape(B, K, G, R, C, Q)
    bucket_c = jnp.take_along_axis(bucket_k_BK1RT, kpos_BKGRP, -1).reshape(B, K, G, R, C, J)

    mask = ((bucket_r[..., :, None] == bucket_c[..., None, :])
            & (rows(seg_111T)[..., :, None] == cols(seg_111T)[..., None, :]))
    if causal:
        mask &= kpos_c[..., None, :] <= qpos_r[..., :, None]
    # Rounds in which each pair shares a bucket, plus 1 for the own-key term.
    shared = jnp.sum(rounds_r[..., :, None, :] == rounds_c[..., None, :, :], axis=-1)
    shared += qpos_r[..., :, None] == kpos_c[..., None, :]
    scores = jnp.einsum("bkgrcqh,bkgrcjh->bkgrcqj", rows(q_BKGTH), cols(k_BK1TH),
                        preferred_element_type=jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask, scores - jnp.log(jnp.maximum(shared, 1).astype(jnp.float32)),
                       MASK_VALUE)
    lse = jax.nn.logsumexp(scores, axis=-1)  # finite even for an empty row: weight 0 below
    probs = jnp.exp(scores - lse[..., None]).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgrcqj,bkgrcjh->bkgrcqh", probs, cols(v_BK1TH))

    # Back to position order.
    unsort_BKGRT = jnp.argsort(order_q_BKGRT, axis=-1)
    out_BKGRTH = jnp.take_along_axis(out.reshape(B, K, G, R, C * Q, H)[:, :, :, :, :T],
                                     unsort_BKGRT[..., None], axis=4)
    lse_BKGRT = jnp.take_along_axis(lse.reshape(B, K, G, R, C * Q)[..., :T], unsort_BKGRT, -1)

    # The own-key term, then log-sum-exp weights over [rounds..., own key].
    own_rounds_BKGT = 1 + jnp.sum(bucket_q_BKGRT == bucket_k_BK1RT, axis=3)
    own_BKGT = (jnp.einsum("bkgth,bkgth->bkgt", q_BKGTH, k_BK1TH,
                           preferred_element_type=jnp.float32) / math.sqrt(H)
                - jnp.log(own_rounds_BKGT.astype(jnp.float32)))
    weights = jax.nn.softmax(jnp.concatenate([lse_BKGRT, own_BKGT[:, :, :, None]], 3), axis=3)
    weights = weights.astype(v_BSKH.dtype)
    out_BKGTH = (jnp.einsum("bkgrt,bkgrth->bkgth", weights[:, :, :, :R], out_BKGRTH)
                 + weights[:, :, :, R, :, None] * v_BK1TH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(v_BSKH.dtype)


ATTENTION_VARIANTS = {
    "full": full_attention,
    "sliding_window": sliding_window_attention,
    "linformer": linformer_attention,
    "lsh": lsh_attention,
}
