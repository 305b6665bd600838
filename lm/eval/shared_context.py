"""Scoring several continuations of one context in one row, the context computed once.

A multiple-choice document asks for log p(choice | context) for 2-5 choices of one context. Run
separately, the context is recomputed per choice (and padded with it). Here a document is its
context, then every choice after it, and short documents share a row (pack_rows). A document's
context carries its shared segment (attention.shared_segment), which the document's choices see;
each choice has a segment of its own (attention.continuation_segment), so it sees its context and
itself but no other choice and no other document, and its positions continue the context's as if
it were alone. One forward pass gives every choice's log-likelihood: the same numbers as separate
passes (tests/test_harness.py checks), with no KV cache, no copies of it and one program per
shape.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import mesh
from core.batches import padded_length, round_up
from lm.models import lora
from lm.models.attention import CHOICES_PER_CONTEXT, continuation_segment, shared_segment


def summed_logp_and_greedy(logits_BKV, targets_BK, scored_BK) -> tuple[jax.Array, jax.Array]:
    """(summed log-prob [B], all greedy [B]) of the scored targets under float32 logits."""
    logp_BK, greedy_BK = _logp_and_greedy(logits_BKV, targets_BK)
    return (jnp.sum(jnp.where(scored_BK, logp_BK, 0.0), axis=1),
            jnp.all(greedy_BK | ~scored_BK, axis=1))


def _logp_and_greedy(logits_BKV, targets_BK) -> tuple[jax.Array, jax.Array]:
    logits_BKV = logits_BKV.astype(jnp.float32)
    target_logit_BK = jnp.take_along_axis(logits_BKV, targets_BK[..., None], axis=-1)[..., 0]
    return (target_logit_BK - jax.nn.logsumexp(logits_BKV, axis=-1),
            jnp.argmax(logits_BKV, axis=-1) == targets_BK)


def _score_rows_of_choices(model, params, tokens_BT, segments_BT, positions_BT, predict_at_BK,
                           targets_BK, choice_BK, num_choices: int):
    """(summed log-prob [B, M], all greedy [B, M]) of each row's M choices. Scored token k is
    targets[k], predicted at row index predict_at[k], and belongs to choice choice[k] (-1: none)."""
    logits_BKV = model.apply({"params": params}, tokens_BT, positions_BT, segments_BT,
                             logits_at_BK=predict_at_BK)
    logp_BK, greedy_BK = _logp_and_greedy(logits_BKV, targets_BK)
    member_BKM = choice_BK[..., None] == jnp.arange(num_choices)
    return (jnp.sum(jnp.where(member_BKM, logp_BK[..., None], 0.0), axis=1),
            jnp.all(greedy_BK[..., None] | ~member_BKM, axis=1))


_score_jit = jax.jit(_score_rows_of_choices, static_argnums=(0, 8))
ROW_TOKENS = 128  # short documents share rows this long: per token, as cheap as shorter rows


def can_share(cfg) -> bool:
    """Whether the model's attention can read the shared rows' mask: long-sequence patterns
    cannot (harness.score_requests scores their choices as separate rows)."""
    return cfg.attention == "full"


def with_mask_attention(model):
    """The model with attention that reads the mask: the cuDNN kernel takes runs of segments,
    which cannot say "the context is shared", so it gives way to XLA's (LoRA wrappers kept)."""
    if model.cfg.attention_impl != "cudnn":
        return model
    if isinstance(model, lora.LoraModel):
        return dataclasses.replace(model, model=with_mask_attention(model.model))
    return model.clone(cfg=dataclasses.replace(model.cfg, attention_impl="xla"))


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Documents (indices into lengths) to rows: each row starts with the longest document left
    and takes the longest others that still fit, within padded_length(max(its first, row_tokens))
    tokens. Short documents share rows instead of each being padded on its own."""
    left = sorted(range(len(lengths)), key=lambda i: lengths[i])  # ascending, as left_lengths
    left_lengths = [lengths[i] for i in left]
    rows = []
    while left:
        row, first = [left.pop()], left_lengths.pop()
        room = padded_length(max(first, row_tokens)) - first
        while left and left_lengths[0] <= room:
            k = bisect.bisect_right(left_lengths, room) - 1
            row.append(left.pop(k))
            room -= left_lengths.pop(k)
        rows.append(row)
    return rows


def score_groups(model, params, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                 batch_size: int, logits_budget: int, row_tokens: int = ROW_TOKENS,
                 progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids ...]): (summed log-prob, all greedy) per
    continuation. Contexts must be non-empty and context + each continuation fit the model.

    Documents are packed into rows (pack_rows), and rows batched longest first (among rows of
    one padded length, those with the most scored tokens first), right-padded to
    core.batches.padded_length; a batch holds at most batch_size rows and at most logits_budget
    bytes of logits."""
    if not groups:
        return []
    if not can_share(model.cfg):
        raise ValueError(f"shared contexts need full attention, not {model.cfg.attention!r}")
    most = max(len(continuations) for _, continuations in groups)
    if most >= CHOICES_PER_CONTEXT:
        raise ValueError(f"a shared context takes at most {CHOICES_PER_CONTEXT - 1} "
                         f"continuations, not {most}; score them as separate rows")
    model = with_mask_attention(model)
    vocab = model.cfg.vocab_size
    rows_sharding, replicated = mesh.data_parallel()
    params = jax.device_put(params, replicated)
    multiple = math.lcm(8, jax.device_count())  # few distinct shapes; rows split over devices
    doc_scored = [sum(map(len, ks)) for _, ks in groups]
    doc_length = [len(c) + n for (c, _), n in zip(groups, doc_scored)]
    rows = pack_rows(doc_length, row_tokens)
    num_choices = round_up(max(sum(len(groups[i][1]) for i in row) for row in rows), 8)
    length = [sum(doc_length[i] for i in row) for row in rows]
    scored = [sum(doc_scored[i] for i in row) for row in rows]
    order = sorted(range(len(rows)), key=lambda r: (-padded_length(length[r]), -scored[r]))
    results: list[list[tuple[float, bool]]] = [[] for _ in groups]
    start = 0
    while start < len(order):
        T = padded_length(length[order[start]])  # the longest: rows are sorted
        K = padded_length(max(scored[r] for r in order[start:start + batch_size]))
        n = max(1, min(batch_size, logits_budget // (K * vocab * 4)))
        n -= n % multiple if n > multiple else 0  # 10 rows would be padded to 16: take 8
        chunk = [rows[r] for r in order[start:start + n]]
        B = round_up(len(chunk), multiple)
        arrays = _layout(groups, chunk, B, T, K)
        logp_BM, greedy_BM = jax.device_get(_score_jit(
            model, params, *(jax.device_put(a, rows_sharding) for a in arrays), num_choices))
        done = 0
        for b, row in enumerate(chunk):
            slot = 0
            for index in row:
                count = len(groups[index][1])
                results[index] = [(float(logp_BM[b, m]), bool(greedy_BM[b, m]))
                                  for m in range(slot, slot + count)]
                slot += count
            done += slot
        if progress is not None:
            progress(done)
        start += len(chunk)
    return results


def _layout(groups, chunk: Sequence[Sequence[int]], B: int, T: int, K: int
            ) -> tuple[np.ndarray, ...]:
    """The rows of `chunk` (each a list of documents): tokens, segments, positions [B, T] and,
    per scored token, where it is predicted, what it is and its choice's slot in the row [B, K].
    Each document's context carries its shared segment, each continuation a segment of its own;
    positions restart at every document, as if it were alone."""
    tokens, segments, positions = (np.zeros((B, T), np.int32) for _ in range(3))
    predict_at, targets = np.zeros((B, K), np.int32), np.zeros((B, K), np.int32)
    choice = np.full((B, K), -1, np.int32)
    for b, row in enumerate(chunk):
        at, k, slot = 0, 0, 0
        for document, index in enumerate(row, start=1):
            context, continuations = groups[index]
            n = len(context)
            tokens[b, at:at + n], positions[b, at:at + n] = context, np.arange(n)
            segments[b, at:at + n] = shared_segment(document)
            last, at = at + n - 1, at + n
            for m, continuation in enumerate(continuations, start=1):
                c = len(continuation)
                tokens[b, at:at + c] = continuation
                segments[b, at:at + c] = continuation_segment(document, m)
                positions[b, at:at + c] = n + np.arange(c)
                # The first token is predicted by the context's last, token j by token j - 1.
                predict_at[b, k:k + c] = [last] + list(range(at, at + c - 1))
                targets[b, k:k + c], choice[b, k:k + c] = continuation, slot
                at, k, slot = at + c, k + c, slot + 1
    return tokens, segments, positions, predict_at, targets, choice
