"""BART's and PEGASUS's noise functions on one packed window, as pure jittable JAX.

Every function takes one row, `tokens_T` and `segments_T` (0 = padding, only ever at the row's
end, as lm/data/windows.py packs), plus a key, and returns arrays of static length, so that the noise
runs inside the jitted loss and is redrawn each step from the step's key: the key is
fold_in(seed, step) (core/step.py), which makes the noise a pure function of (seed, step, row)
and keeps a resumed run bit-exact. Variable-length edits (deletion, infilling, gap sentences)
are scatters to cumsum slots, as lm/objectives/span_corruption.py builds its inputs: a shorter row is padded
with segment 0, and (infilling only) slots past the static length are dropped.

Documents: sentence permutation and rotation stay inside each document; masking, deletion and
infilling are drawn over the window's real tokens, and an infilled span that runs across a
document boundary takes the segment of its first token (the next document's share of it goes
without a mask, as span corruption's carried spans do).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _doc_starts(segments_T):
    return jnp.concatenate([jnp.ones(1, bool), segments_T[1:] != segments_T[:-1]])


def _scatter(length: int, slot_T, values_T):
    """values_T written at slot_T of a zero row of `length` (slots >= length dropped)."""
    return jnp.zeros(length, jnp.int32).at[slot_T].set(values_T, mode="drop")


def compact(keep_T, tokens_T, segments_T):
    """The kept tokens moved to the front in order, the row padded with segment 0."""
    T = tokens_T.shape[0]
    slot_T = jnp.where(keep_T, jnp.cumsum(keep_T) - 1, T)
    return _scatter(T, slot_T, tokens_T), _scatter(T, slot_T, segments_T)


@functools.partial(jax.jit, static_argnames=("rate", "mask_id"))
def token_masking(rng, tokens_T, segments_T, rate: float, mask_id: int):
    """Each real token becomes mask_id with probability `rate` (BART's token masking)."""
    chosen_T = jax.random.bernoulli(rng, rate, tokens_T.shape) & (segments_T > 0)
    return jnp.where(chosen_T, mask_id, tokens_T), segments_T


@functools.partial(jax.jit, static_argnames=("rate",))
def token_deletion(rng, tokens_T, segments_T, rate: float):
    """Each real token is dropped with probability `rate`; the row is padded at its end."""
    drop_T = jax.random.bernoulli(rng, rate, tokens_T.shape) & (segments_T > 0)
    return compact(~drop_T, tokens_T, segments_T)


@functools.partial(jax.jit, static_argnames=("length", "ratio", "poisson_lambda"))
def infilling_spans(rng, num_real, length: int, ratio: float, poisson_lambda: float):
    """BART's text-infilling spans over the first `num_real` of `length` tokens.

    As fairseq draws them: M = ceil(ratio * num_real) tokens to mask; span lengths are drawn from
    Poisson(lambda) until they reach M, the last one cut so that they sum to M; a zero-length
    span is an inserted mask. Unlike fairseq's random (possibly overlapping) starts, the spans
    are placed without overlap, each before a uniformly drawn one of the num_real - M + 1 gaps of
    the unmasked tokens (spans in one gap follow each other), so each span is exactly one mask.
    Returns (start_K, length_K, used_K, drawn_K), sorted by start, K = ceil(ratio * length) + 8
    slots: start in the original row, the span's length, whether the slot is a span, and the
    Poisson draw before the cut."""
    num_slots = math.ceil(ratio * length) + 8
    length_rng, gap_rng = jax.random.split(rng)
    budget = jnp.minimum(jnp.ceil(ratio * num_real).astype(jnp.int32), num_real)
    drawn_K = jax.random.poisson(length_rng, poisson_lambda, (num_slots,)).astype(jnp.int32)
    before_K = jnp.cumsum(drawn_K) - drawn_K
    used_K = before_K < budget
    span_K = jnp.where(used_K, jnp.clip(budget - before_K, 0, drawn_K), 0)
    gaps = num_real - jnp.sum(span_K) + 1
    gap_K = jnp.floor(jax.random.uniform(gap_rng, (num_slots,)) * gaps).astype(jnp.int32)
    gap_K = jnp.where(used_K, jnp.minimum(gap_K, gaps - 1), length + 1)  # unused: last
    order_K = jnp.lexsort((jnp.arange(num_slots), gap_K))
    gap_K, span_K, used_K, drawn_K = gap_K[order_K], span_K[order_K], used_K[order_K], \
        drawn_K[order_K]
    start_K = gap_K + jnp.cumsum(span_K) - span_K
    return jnp.where(used_K, start_K, length), span_K, used_K, drawn_K


@functools.partial(jax.jit, static_argnames=("ratio", "poisson_lambda", "mask_id"))
def text_infilling(rng, tokens_T, segments_T, ratio: float, poisson_lambda: float,
                   mask_id: int):
    """Spans of Poisson(lambda) lengths (ratio of the real tokens in all) each replaced by one
    mask_id; a zero-length span inserts one. A row that would grow past its length (many
    zero-length spans, almost never at ratio 0.3 and lambda 3) loses its last slots."""
    T = tokens_T.shape[0]
    num_real = jnp.sum(segments_T > 0)
    start_K, span_K, used_K, _ = infilling_spans(rng, num_real, T, ratio, poisson_lambda)
    K = start_K.shape[0]
    coverage_T = jnp.cumsum(jnp.zeros(T + 1, jnp.int32).at[start_K].add(
        (span_K > 0).astype(jnp.int32), mode="drop").at[start_K + span_K].add(
        -(span_K > 0).astype(jnp.int32), mode="drop"))[:T]
    noise_T = coverage_T > 0
    # Output slot of the k-th span's mask: its gap (kept tokens before it) + spans before it.
    noise_before_K = start_K - (jnp.cumsum(span_K) - span_K)
    mask_slot_K = jnp.where(used_K, noise_before_K + jnp.arange(K), T)
    # Output slot of a kept token: kept tokens before it + spans starting at or before it.
    spans_upto_T = jnp.cumsum(jnp.zeros(T, jnp.int32).at[start_K].add(
        used_K.astype(jnp.int32), mode="drop"))
    keep_T = ~noise_T & (segments_T > 0)
    token_slot_T = jnp.where(keep_T, jnp.cumsum(keep_T) - 1 + spans_upto_T, T)
    mask_segment_K = segments_T[jnp.clip(jnp.minimum(start_K, num_real - 1), 0, T - 1)]
    out_tokens = _scatter(T, token_slot_T, tokens_T).at[mask_slot_K].set(mask_id, mode="drop")
    out_segments = _scatter(T, token_slot_T, segments_T).at[mask_slot_K].set(mask_segment_K,
                                                                            mode="drop")
    return out_tokens, out_segments


@jax.jit
def sentence_ids(tokens_T, segments_T, sentence_end_V):
    """(T,) index of each token's sentence in the row: a sentence ends at a token whose id is
    marked in sentence_end_V (sentence-final punctuation) or at its document's end."""
    ends_T = sentence_end_V[tokens_T]
    starts_T = _doc_starts(segments_T) | jnp.concatenate([jnp.zeros(1, bool), ends_T[:-1]])
    return jnp.cumsum(starts_T) - 1


def _reorder(order_T, tokens_T, segments_T):
    return tokens_T[order_T], segments_T[order_T]


@functools.partial(jax.jit, static_argnames=("bos_id",))
def sentence_permutation(rng, tokens_T, segments_T, sentence_end_V, bos_id: int):
    """The sentences of each document shuffled (a document's opening BOS stays first)."""
    T = tokens_T.shape[0]
    sentence_T = sentence_ids(tokens_T, segments_T, sentence_end_V)
    key_T = jax.random.uniform(rng, (T,))[sentence_T]
    doc_T = jnp.cumsum(_doc_starts(segments_T))
    lead_T = _doc_starts(segments_T) & (tokens_T == bos_id)
    order_T = jnp.lexsort((jnp.arange(T), key_T, ~lead_T, doc_T))
    return _reorder(order_T, tokens_T, segments_T)


@functools.partial(jax.jit, static_argnames=("bos_id",))
def document_rotation(rng, tokens_T, segments_T, bos_id: int):
    """Each document rotated to start at a uniformly chosen token (its BOS stays first)."""
    T = tokens_T.shape[0]
    index_T = jnp.arange(T)
    doc_T = jnp.cumsum(_doc_starts(segments_T))
    lead_T = _doc_starts(segments_T) & (tokens_T == bos_id)
    body_T = ~lead_T  # the rotated part of each document
    start_T = jax.lax.cummax(jnp.where(_doc_starts(segments_T), index_T, 0))
    body_start_T = start_T + lead_T[start_T]
    size_T = jnp.zeros(T + 1, jnp.int32).at[doc_T].add(body_T.astype(jnp.int32))[doc_T]
    shift_T = jnp.floor(jax.random.uniform(rng, (T + 1,))[doc_T] * size_T).astype(jnp.int32)
    rotated_T = jnp.where(body_T, (index_T - body_start_T - shift_T) % jnp.maximum(size_T, 1),
                          -1)
    order_T = jnp.lexsort((rotated_T, doc_T))
    return _reorder(order_T, tokens_T, segments_T)


# ---------------------------------------------------------------------------------------------
# PEGASUS: gap sentences
# ---------------------------------------------------------------------------------------------

@jax.jit
def sentence_rouge1(tokens_T, segments_T, sentence_T):
    """(T,) ROUGE-1 F1 of each token's sentence against the rest of its document, on token
    ids: overlap = sum over ids of min(count in sentence, count in rest),
    F1 = 2 overlap / (|sentence| + |rest|)."""
    real_T = segments_T > 0
    same_id_TT = (tokens_T[:, None] == tokens_T[None, :]) & real_T[None, :] & real_T[:, None]
    same_doc_TT = segments_T[:, None] == segments_T[None, :]
    same_sentence_TT = sentence_T[:, None] == sentence_T[None, :]
    in_sentence_T = jnp.sum(same_id_TT & same_sentence_TT, axis=1)
    in_rest_T = jnp.sum(same_id_TT & same_doc_TT & ~same_sentence_TT, axis=1)
    # Each id of a sentence appears in_sentence times in it: weigh each 1/in_sentence.
    share_T = jnp.minimum(in_sentence_T, in_rest_T) / jnp.maximum(in_sentence_T, 1)
    overlap_T = jnp.sum(jnp.where(same_sentence_TT & real_T[None, :], share_T[None, :], 0.0),
                        axis=1)
    sentence_len_T = jnp.sum(same_sentence_TT & real_T[None, :], axis=1)
    doc_len_T = jnp.sum(same_doc_TT & real_T[None, :], axis=1)
    total_T = doc_len_T  # |sentence| + |rest|
    return jnp.where(real_T, 2.0 * overlap_T / jnp.maximum(total_T, 1), 0.0), sentence_len_T


def gap_sentences(tokens_T, segments_T, sentence_end_V, ratio: float):
    """(T,) bool, True on the tokens of the gap sentences: in each document the
    max(1, round(ratio * sentences)) sentences of highest ROUGE-1 F1 against the rest of the
    document, each scored once (PEGASUS's Ind-Orig); ties go to the earlier sentence."""
    T = tokens_T.shape[0]
    sentence_T = sentence_ids(tokens_T, segments_T, sentence_end_V)
    score_T, _ = sentence_rouge1(tokens_T, segments_T, sentence_T)
    first_T = jnp.concatenate([jnp.ones(1, bool), sentence_T[1:] != sentence_T[:-1]])
    real_T = segments_T > 0
    # Per sentence (indexed by sentence id): its score, document, and whether it exists.
    score_S = jnp.zeros(T).at[sentence_T].max(score_T)
    doc_S = jnp.zeros(T, jnp.int32).at[sentence_T].max(segments_T)
    exists_S = jnp.zeros(T, bool).at[sentence_T].max(first_T & real_T)
    index_S = jnp.arange(T)
    same_doc_SS = (doc_S[:, None] == doc_S[None, :]) & exists_S[None, :]
    better_SS = (score_S[None, :] > score_S[:, None]) | (
        (score_S[None, :] == score_S[:, None]) & (index_S[None, :] < index_S[:, None]))
    rank_S = jnp.sum(same_doc_SS & better_SS, axis=1)
    count_S = jnp.sum(same_doc_SS, axis=1)
    chosen_S = exists_S & (rank_S < jnp.maximum(1, jnp.round(ratio * count_S)))
    return chosen_S[sentence_T] & real_T, first_T


@functools.partial(jax.jit, static_argnames=("ratio", "mask_id"))
def gap_sentence_generation(tokens_T, segments_T, sentence_end_V, ratio: float,
                            mask_id: int):
    """PEGASUS's GSG: (inputs, input segments) with each gap sentence replaced by one mask_id,
    and (targets, target segments): the gap sentences in document order, padded."""
    T = tokens_T.shape[0]
    gap_T, first_T = gap_sentences(tokens_T, segments_T, sentence_end_V, ratio)
    emit_T = (~gap_T | first_T) & (segments_T > 0)
    slot_T = jnp.where(emit_T, jnp.cumsum(emit_T) - 1, T)
    inputs = _scatter(T, slot_T, jnp.where(gap_T, mask_id, tokens_T))
    input_segments = _scatter(T, slot_T, segments_T)
    targets, target_segments = compact(gap_T, tokens_T, segments_T)
    return inputs, input_segments, targets, target_segments, gap_T
