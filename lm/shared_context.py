"""Scoring several continuations of one context with the context run through the model once.

A multiple-choice document asks for log p(choice | context) for 2-5 choices of one context. Run
separately, the context is recomputed per choice (and padded with it). Here each context goes
through the model once (prefill into the KV cache of lm/decoding.py), its cache rows are copied
to one row per choice, and only the choices' tokens are run on top: the same numbers as the full
forward pass (tests/test_harness.py checks), for a fraction of the work when contexts are long
(few-shot prompts) or choices many.
"""
from __future__ import annotations

from typing import Callable, Sequence

import math

import jax
import jax.numpy as jnp
import numpy as np

from core import mesh
from lm import decoding

CONTEXT_BUCKET = 64  # padded lengths: contexts to multiples of 64, continuations of 16
CONTINUATION_BUCKET = 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _score_block(model, params, contexts_BP, context_lengths_B, rows_R, continuations_RC,
                 continuation_lengths_R):
    """(summed log-prob [R], all greedy [R]) of each row's continuation after its context."""
    B, P = contexts_BP.shape
    R, C = continuations_RC.shape
    segments_BP = (jnp.arange(P)[None] < context_lengths_B[:, None]).astype(jnp.int32)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    last_logits_BV, cache = decoding.prefill(
        model, params, (contexts_BP, segments_BP, positions_BP, context_lengths_B), P + C)
    cache = decoding.take_cache_rows(model, cache, rows_R)
    real_RC = jnp.arange(C)[None] < continuation_lengths_R[:, None]
    positions_RC = context_lengths_B[rows_R][:, None] + jnp.arange(C, dtype=jnp.int32)[None]
    block_logits_RCV, _ = decoding.forward_with_cache(model, params, cache, continuations_RC, positions_RC,
                                            real_RC.astype(jnp.int32))
    # Continuation token j is predicted by the context's last token (j = 0) or by token j - 1.
    logits_RCV = jnp.concatenate([last_logits_BV[rows_R][:, None], block_logits_RCV[:, :-1]],
                                 axis=1).astype(jnp.float32)
    target_logit_RC = jnp.take_along_axis(logits_RCV, continuations_RC[..., None], -1)[..., 0]
    logp_RC = target_logit_RC - jax.nn.logsumexp(logits_RCV, axis=-1)
    greedy_RC = jnp.argmax(logits_RCV, axis=-1) == continuations_RC
    return (jnp.sum(jnp.where(real_RC, logp_RC, 0.0), axis=1),
            jnp.all(greedy_RC | ~real_RC, axis=1))


_score_block_jit = jax.jit(_score_block, static_argnums=0)


def score_groups(model, params, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                 batch_size: int, logits_budget: int,
                 progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids ...]): (summed log-prob, all greedy) per
    continuation. Contexts must be non-empty and context + continuation fit the model."""
    vocab = model.cfg.vocab_size
    rows_sharding, replicated = mesh.data_parallel()
    params = jax.device_put(params, replicated)
    multiple = math.lcm(8, jax.device_count())  # few distinct shapes; rows split over devices
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i][0]))
    results: list[list[tuple[float, bool]]] = [[] for _ in groups]
    start = 0
    while start < len(order):
        P = _round_up(len(groups[order[start]][0]), CONTEXT_BUCKET)
        fits = max(1, logits_budget // (P * vocab * 4))
        chunk = order[start:start + min(batch_size, fits)]
        conts = [c for i in chunk for c in groups[i][1]]
        C = _round_up(max(len(c) for c in conts), CONTINUATION_BUCKET)
        B, R = _round_up(len(chunk), multiple), _round_up(len(conts), multiple)
        contexts_BP = np.zeros((B, P), np.int32)
        context_lengths_B = np.ones((B,), np.int32)
        rows_R = np.zeros((R,), np.int32)
        continuations_RC = np.zeros((R, C), np.int32)
        continuation_lengths_R = np.zeros((R,), np.int32)
        row = 0
        for b, index in enumerate(chunk):
            context, continuations = groups[index]
            contexts_BP[b, :len(context)] = context
            context_lengths_B[b] = len(context)
            for continuation in continuations:
                rows_R[row] = b
                continuations_RC[row, :len(continuation)] = continuation
                continuation_lengths_R[row] = len(continuation)
                row += 1
        arrays = [jax.device_put(a, rows_sharding) for a in (
            contexts_BP, context_lengths_B, rows_R, continuations_RC, continuation_lengths_R)]
        logp_R, greedy_R = jax.device_get(_score_block_jit(model, params, *arrays))
        row = 0
        for index in chunk:
            for _ in groups[index][1]:
                results[index].append((float(logp_R[row]), bool(greedy_R[row])))
                row += 1
        if progress is not None:
            progress(len(conts))
        start += len(chunk)
    return results
