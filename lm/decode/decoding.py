"""KV-cache autoregressive decoding: batched prompts, one jitted loop, samplers and beam search.

Prompts of different lengths share one batch, padded on the left or the right. Every token keeps
its own position (its index within its prompt), and padding gets segment id 0, which the
attention cache never lets a real token see (lm/models/layers.py `Attention._cached`), so both paddings
give the same tokens as decoding each prompt alone. The cache has a fixed size (longest prompt +
max_new_tokens), so one compiled prefill and one compiled step serve the whole generation, and its
arrays carry the model's logical axis names, so the same rules table shards them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core.batches import padded_length

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    padding: str = "left"  # "left" | "right": where a shorter prompt is padded
    seed: int = 0
    bucket: bool = False   # pad prompts to few lengths (decoding.pad_prompts): fewer compiles

    def __post_init__(self):
        if self.padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {self.padding!r}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_k}, {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


# ---------------------------------------------------------------------------------------------
# Token choice
# ---------------------------------------------------------------------------------------------

def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature-scaled logits with everything outside the top k and the nucleus at -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses top_p is kept), computed after the top-k cut, as Hugging Face does.
    """
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly likelier tokens
        keep_BV = before_BV < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, NEG_INF, logits_BV)
    return logits_BV


def choose_tokens(logits_BV: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Prompts and cache
# ---------------------------------------------------------------------------------------------

def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, padding: str,
                bucket: bool = False):
    """(tokens [B, P], segment_ids [B, P], positions [B, P], lengths [B]) as numpy arrays. P is
    the longest prompt, or with `bucket` that rounded up to core.batches.padded_length, so that
    prompts of many lengths share few compiled shapes."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    B, P = len(prompts), int(lengths_B.max())
    P = padded_length(P) if bucket else P
    tokens_BP = np.full((B, P), pad_id, np.int32)
    segments_BP = np.zeros((B, P), np.int32)
    for b, prompt in enumerate(prompts):
        cols = slice(P - len(prompt), P) if padding == "left" else slice(0, len(prompt))
        tokens_BP[b, cols] = prompt
        segments_BP[b, cols] = 1
    positions_BP = np.maximum(np.cumsum(segments_BP, axis=1) - 1, 0).astype(np.int32)
    return tokens_BP, segments_BP, positions_BP, lengths_B


def init_cache(model: nn.Module, batch: int, length: int) -> Any:
    """A zero cache (boxed with logical axis names) for `batch` rows of `length` slots."""
    def create(tokens_BS):
        return model.init(jax.random.key(0), tokens_BS, decode=True)["cache"]
    shapes = jax.eval_shape(create, jax.ShapeDtypeStruct((batch, length), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_length(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    length = prompt_len + max_new_tokens
    cfg = model.cfg
    if cfg.pos_emb == "learned" and length > cfg.max_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {length} "
                         f"exceeds the model's learned positions (max_len {cfg.max_len}); "
                         "shorten one of them")
    return length


def forward_with_cache(model, params, cache, tokens_BT, positions_BT, segments_BT,
                       logits_at_BK=None):
    logits_BTV, variables = model.apply({"params": params, "cache": cache}, tokens_BT,
                                        positions_BT, segments_BT, decode=True, mutable=["cache"],
                                        logits_at_BK=logits_at_BK)
    return logits_BTV, variables["cache"]


def prefill(model, params, prompts_BP: tuple, length: int):
    """Runs the prompts through an empty cache: (logits of each row's last token [B, V], cache)."""
    tokens_BP, segments_BP, positions_BP, lengths_B = prompts_BP
    cache = init_cache(model, tokens_BP.shape[0], length)
    last_B = jnp.max(jnp.where(segments_BP > 0, jnp.arange(tokens_BP.shape[1]), -1), axis=1)
    logits_B1V, cache = forward_with_cache(model, params, cache, tokens_BP, positions_BP,
                                           segments_BP, logits_at_BK=last_B[:, None])
    return logits_B1V[:, 0], cache


# ---------------------------------------------------------------------------------------------
# Sampling loop
# ---------------------------------------------------------------------------------------------

def _generate(model, params, prompts_BP, sampling: SamplingConfig, rng):
    tokens_BP, _, _, lengths_B = prompts_BP
    B, P = tokens_BP.shape
    N = sampling.max_new_tokens
    logits_BV, cache = prefill(model, params, prompts_BP, P + N)
    stop_S = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

    def step(carry):
        i, logits_BV, cache, out_BN, done_B = carry
        token_B = choose_tokens(logits_BV, jax.random.fold_in(rng, i), sampling)
        token_B = jnp.where(done_B, sampling.pad_id, token_B)
        out_BN = out_BN.at[:, i].set(token_B)
        done_B = done_B | jnp.isin(token_B, stop_S)
        logits_B1V, cache = forward_with_cache(model, params, cache, token_B[:, None],
                                     (lengths_B + i)[:, None], jnp.ones((B, 1), jnp.int32))
        return i + 1, logits_B1V[:, 0], cache, out_BN, done_B

    def more(carry):
        i, _, _, _, done_B = carry
        return (i < N) & ~jnp.all(done_B)

    out_BN = jnp.full((B, N), sampling.pad_id, jnp.int32)
    carry = (jnp.int32(0), logits_BV, cache, out_BN, jnp.zeros((B,), bool))
    return jax.lax.while_loop(more, step, carry)[3]


_generate_jit = jax.jit(_generate, static_argnums=(0, 3))


def generate_padded(model: nn.Module, params, prompts: Sequence[Sequence[int]],
                    sampling: SamplingConfig, rng: jax.Array | None = None):
    """(padded prompts as pad_prompts gives them, new tokens [B, N]): each row's tokens run to
    its first stop token (kept) and then pad_id. `rng` (a traced key: a new one per call
    compiles nothing) defaults to sampling.seed's."""
    prompts_np = pad_prompts(prompts, sampling.pad_id, sampling.padding, sampling.bucket)
    cache_length(model, prompts_np[0].shape[1], sampling.max_new_tokens)
    rng = jax.random.key(sampling.seed) if rng is None else rng
    out_BN = _generate_jit(model, params, tuple(jnp.asarray(a) for a in prompts_np), sampling,
                           rng)
    return prompts_np, np.asarray(out_BN)


def generate(model: nn.Module, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig) -> list[list[int]]:
    """New tokens for each prompt, up to (not including) the first stop token."""
    _, out_BN = generate_padded(model, params, prompts, sampling)
    return [_until_stop(row, sampling.stop_ids) for row in out_BN.tolist()]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _stream_prefill(model, params, prompt_1P, sampling):
    prompts = (prompt_1P, jnp.ones_like(prompt_1P), jnp.arange(prompt_1P.shape[1])[None],
               jnp.array([prompt_1P.shape[1]], jnp.int32))
    logits_1V, cache = prefill(model, params, prompts, prompt_1P.shape[1] + sampling.max_new_tokens)
    return choose_tokens(logits_1V, jax.random.fold_in(jax.random.key(sampling.seed), 0),
                         sampling), cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=2)
def _stream_step(model, params, cache, token_1, position, index, sampling):
    logits_11V, cache = forward_with_cache(model, params, cache, token_1[:, None], position[None, None],
                                 jnp.ones((1, 1), jnp.int32))
    rng = jax.random.fold_in(jax.random.key(sampling.seed), index)  # as `generate` draws
    return choose_tokens(logits_11V[:, 0], rng, sampling), cache


def stream(model: nn.Module, params, prompt: Sequence[int],
           sampling: SamplingConfig) -> Iterator[int]:
    """Yields one prompt's new tokens as they are decoded (one jitted step each), until a stop
    token or max_new_tokens. Fine for a terminal; `generate` is the fast batched path."""
    cache_length(model, len(prompt), sampling.max_new_tokens)
    token_1, cache = _stream_prefill(model, params, jnp.asarray([list(prompt)], jnp.int32),
                                     sampling)
    for i in range(sampling.max_new_tokens):
        token = int(token_1[0])
        if token in sampling.stop_ids:
            return
        yield token
        if i + 1 < sampling.max_new_tokens:
            token_1, cache = _stream_step(model, params, cache, token_1,
                                          jnp.int32(len(prompt) + i), jnp.int32(i + 1), sampling)


def _until_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    for n, token in enumerate(ids):
        if token in stop_ids:
            return ids[:n]
    return ids


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------

def _beam_search(model, params, prompts_BP, width: int, max_new_tokens: int,
                 stop_ids: tuple[int, ...], pad_id: int, length_penalty: float):
    tokens_BP, segments_BP, positions_BP, lengths_B = prompts_BP
    B, P = tokens_BP.shape
    W, N = width, max_new_tokens
    repeat = lambda x: jnp.repeat(x, W, axis=0)
    logits_XV, cache = prefill(model, params, tuple(map(repeat, prompts_BP)), P + N)
    V = logits_XV.shape[-1]
    stop_S = jnp.asarray(stop_ids or (-1,), jnp.int32)
    # Only the first of each row's identical beams starts alive, so the first step fans out.
    scores_BW = jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, NEG_INF), (B, 1))
    lengths_X = repeat(lengths_B)

    def step(i, carry):
        logits_XV, cache, scores_BW, out_BWN, done_BW, gen_len_BW = carry
        logp_BWV = jax.nn.log_softmax(logits_XV.astype(jnp.float32)).reshape(B, W, V)
        # A finished beam continues only with padding, at no cost, so its score is frozen.
        frozen_V = jnp.where(jnp.arange(V) == pad_id, 0.0, NEG_INF)
        logp_BWV = jnp.where(done_BW[..., None], frozen_V, logp_BWV)
        total_BWV = scores_BW[..., None] + logp_BWV
        scores_BW, flat_BW = jax.lax.top_k(total_BWV.reshape(B, W * V), W)
        parent_BW, token_BW = flat_BW // V, (flat_BW % V).astype(jnp.int32)
        pick = lambda x_BW: jnp.take_along_axis(x_BW, parent_BW, axis=1)
        was_done_BW = pick(done_BW)
        out_BWN = jnp.take_along_axis(out_BWN, parent_BW[..., None], axis=1).at[:, :, i].set(
            token_BW)
        gen_len_BW = pick(gen_len_BW) + (~was_done_BW).astype(jnp.int32)
        done_BW = was_done_BW | jnp.isin(token_BW, stop_S)
        rows_X = (jnp.arange(B)[:, None] * W + parent_BW).reshape(-1)
        cache = take_cache_rows(model, cache, rows_X)
        logits_X1V, cache = forward_with_cache(model, params, cache, token_BW.reshape(-1, 1),
                                     (lengths_X + i)[:, None], jnp.ones((B * W, 1), jnp.int32))
        return logits_X1V[:, 0], cache, scores_BW, out_BWN, done_BW, gen_len_BW

    carry = (logits_XV, cache, scores_BW, jnp.full((B, W, N), pad_id, jnp.int32),
             jnp.zeros((B, W), bool), jnp.zeros((B, W), jnp.int32))
    _, _, scores_BW, out_BWN, _, gen_len_BW = jax.lax.fori_loop(0, N, step, carry)
    normalised_BW = scores_BW / jnp.maximum(gen_len_BW, 1).astype(jnp.float32) ** length_penalty
    best_B = jnp.argmax(normalised_BW, axis=1)
    return out_BWN[jnp.arange(B), best_B], normalised_BW[jnp.arange(B), best_B]


def take_cache_rows(model, cache, rows_X):
    """The cache rows of the chosen parents; the batch axis follows a scanned layer axis."""
    axis = 1 if model.cfg.scan_layers else 0
    take = lambda c: jnp.take(c, rows_X, axis=axis) if c.ndim > axis else c
    return jax.tree.map(take, cache)


_beam_search_jit = jax.jit(_beam_search, static_argnums=(0, 3, 4, 5, 6, 7))


def beam_search(model: nn.Module, params, prompts: Sequence[Sequence[int]], width: int,
                max_new_tokens: int, stop_ids: Sequence[int] = (), pad_id: int = 0,
                padding: str = "left", length_penalty: float = 0.0):
    """The highest-scoring continuation of each prompt among `width` beams.

    Scores are summed log-probabilities divided by (generated length) ** length_penalty (0: no
    normalisation, so width 1 is exactly greedy). Returns (token lists, scores).
    """
    if width < 1:
        raise ValueError(f"beam width must be at least 1, got {width}")
    SamplingConfig(max_new_tokens=max_new_tokens, padding=padding)  # validates the arguments
    prompts_BP = tuple(jnp.asarray(a) for a in pad_prompts(prompts, pad_id, padding))
    cache_length(model, prompts_BP[0].shape[1], max_new_tokens)
    out_BN, scores_B = _beam_search_jit(model, params, prompts_BP, width, max_new_tokens,
                                        tuple(stop_ids), pad_id, length_penalty)
    return ([_until_stop(row, tuple(stop_ids)) for row in np.asarray(out_BN).tolist()],
            np.asarray(scores_B).tolist())
