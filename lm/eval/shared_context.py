"""Scoring several continuations of one context with the context run through the model once.

A multiple-choice document asks for log p(choice | context) for 2-5 choices of one context. Run
separately, the context is recomputed per choice (and padded with it). Here each context goes
through the model once (prefill into the KV cache of lm/decode/decoding.py), its cache rows are copied
to one row per choice, and only the choices' tokens are run on top: the same numbers as the full
forward pass (tests/test_harness.py checks), for a fraction of the work when contexts are long
(few-shot prompts) or choices many.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import mesh
from core.batches import padded_length, round_up
from lm.decode import decoding


CONTINUATION_GRANULE = 8  # continuations padded to multiples of 8 tokens (or 25%)


def _padded_continuation(n: int) -> int:
    return padded_length(n, CONTINUATION_GRANULE)


def summed_logp_and_greedy(logits_BKV, targets_BK, scored_BK) -> tuple[jax.Array, jax.Array]:
    """(summed log-prob [B], all greedy [B]) of the scored targets under float32 logits."""
    logits_BKV = logits_BKV.astype(jnp.float32)
    target_logit_BK = jnp.take_along_axis(logits_BKV, targets_BK[..., None], axis=-1)[..., 0]
    logp_BK = target_logit_BK - jax.nn.logsumexp(logits_BKV, axis=-1)
    greedy_BK = jnp.argmax(logits_BKV, axis=-1) == targets_BK
    return (jnp.sum(jnp.where(scored_BK, logp_BK, 0.0), axis=1),
            jnp.all(greedy_BK | ~scored_BK, axis=1))


def _prefill_contexts(model, params, contexts_BP, context_lengths_B, cache_length: int):
    """(logits after each context's last token [B, V], KV cache of the contexts)."""
    B, P = contexts_BP.shape
    segments_BP = (jnp.arange(P)[None] < context_lengths_B[:, None]).astype(jnp.int32)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    return decoding.prefill(model, params, (contexts_BP, segments_BP, positions_BP,
                                            context_lengths_B), cache_length)


def _score_continuations(model, params, cache, last_logits_BV, context_lengths_B, rows_R,
                         continuations_RC, continuation_lengths_R):
    """(summed log-prob [R], all greedy [R]) of each row's continuation after context rows_R."""
    C = continuations_RC.shape[1]
    cache = decoding.take_cache_rows(model, cache, rows_R)
    real_RC = jnp.arange(C)[None] < continuation_lengths_R[:, None]
    positions_RC = context_lengths_B[rows_R][:, None] + jnp.arange(C, dtype=jnp.int32)[None]
    # Continuation token j is predicted by the context's last token (j = 0) or by token j - 1,
    # so the last continuation token needs no logits.
    block_logits_RCV, _ = decoding.forward_with_cache(
        model, params, cache, continuations_RC, positions_RC, real_RC.astype(jnp.int32),
        logits_at_BK=jnp.broadcast_to(jnp.arange(C - 1), (len(rows_R), C - 1)))
    logits_RCV = jnp.concatenate([last_logits_BV[rows_R][:, None], block_logits_RCV], axis=1)
    return summed_logp_and_greedy(logits_RCV, continuations_RC, real_RC)


_prefill_jit = jax.jit(_prefill_contexts, static_argnums=(0, 4))
_score_continuations_jit = jax.jit(_score_continuations, static_argnums=0)


def score_groups(model, params, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                 batch_size: int, logits_budget: int,
                 progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids ...]): (summed log-prob, all greedy) per
    continuation. Contexts must be non-empty and context + continuation fit the model.

    Up to batch_size contexts are prefilled together, longest first and, among contexts of one
    padded length, those with the longest continuations first, so that a batch's continuations
    are alike. Its continuations then run in calls of up to batch_size rows sorted by length, so
    each call pads only to its own longest continuation (in steps of CONTINUATION_GRANULE: answers
    are often a few tokens) and holds at most logits_budget bytes of logits. Each batch's KV cache
    fits its own continuations: one sized for the task's longest compiles fewer shapes but made
    PIQA slower (docs/performance.md)."""
    vocab = model.cfg.vocab_size
    rows_sharding, replicated = mesh.data_parallel()
    params = jax.device_put(params, replicated)
    multiple = math.lcm(8, jax.device_count())  # few distinct shapes; rows split over devices
    put = lambda *arrays: [jax.device_put(a, rows_sharding) for a in arrays]
    longest = [max(map(len, continuations)) for _, continuations in groups]
    order = sorted(range(len(groups)), key=lambda i: (-padded_length(len(groups[i][0])),
                                                      -longest[i]))
    results: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        P = padded_length(max(len(groups[index][0]) for index in chunk))
        B = round_up(len(chunk), multiple)
        contexts_BP = np.zeros((B, P), np.int32)
        context_lengths_B = np.ones((B,), np.int32)
        for b, index in enumerate(chunk):
            contexts_BP[b, :len(groups[index][0])] = groups[index][0]
            context_lengths_B[b] = len(groups[index][0])
        rows = sorted(((b, k) for b, index in enumerate(chunk)
                       for k in range(len(groups[index][1]))),
                      key=lambda bk: -len(groups[chunk[bk[0]]][1][bk[1]]))
        continuation = lambda bk: groups[chunk[bk[0]]][1][bk[1]]
        cache_length = P + _padded_continuation(len(continuation(rows[0])))
        context_lengths_B, = put(context_lengths_B)
        last_logits_BV, cache = _prefill_jit(model, params, *put(contexts_BP), context_lengths_B,
                                             cache_length)
        scores = {}
        at = 0
        while at < len(rows):
            C = _padded_continuation(len(continuation(rows[at])))
            fits = max(1, logits_budget // (C * vocab * 4))
            call = rows[at:at + min(batch_size, fits)]
            R = round_up(len(call), multiple)
            rows_R = np.zeros((R,), np.int32)
            continuations_RC = np.zeros((R, C), np.int32)
            continuation_lengths_R = np.zeros((R,), np.int32)
            for r, bk in enumerate(call):
                rows_R[r] = bk[0]
                continuations_RC[r, :len(continuation(bk))] = continuation(bk)
                continuation_lengths_R[r] = len(continuation(bk))
            logp_R, greedy_R = jax.device_get(_score_continuations_jit(
                model, params, cache, last_logits_BV, context_lengths_B,
                *put(rows_R, continuations_RC, continuation_lengths_R)))
            for r, bk in enumerate(call):
                scores[bk] = (float(logp_R[r]), bool(greedy_R[r]))
            if progress is not None:
                progress(len(call))
            at += len(call)
        for b, index in enumerate(chunk):
            results[index] = [scores[b, k] for k in range(len(groups[index][1]))]
    return results
