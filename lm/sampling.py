"""Plain autoregressive sampling: one full forward pass per new token (no KV cache).

The window is a fixed length (the training sequence length), so one compiled function serves
every step; when the text grows longer the window slides and keeps the most recent tokens.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def pick_token(logits_V: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy at temperature 0; else samples from the temperature-scaled top-k distribution."""
    if temperature <= 0:
        return jnp.argmax(logits_V)
    logits_V = logits_V / temperature
    if top_k:
        kth_largest = jax.lax.top_k(logits_V, top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth_largest, -jnp.inf, logits_V)
    return jax.random.categorical(rng, logits_V)


def make_next_token(task, temperature: float, top_k: int):
    window = task.seq_len

    @jax.jit
    def next_token(params, tokens_1T, length, rng):
        segment_ids_1T = (jnp.arange(window) < length).astype(jnp.int32)[None]
        logits_1TV = task.logits(params, tokens_1T, segment_ids_1T)
        return pick_token(logits_1TV[0, length - 1], rng, temperature, top_k)

    return next_token


def sample_ids(task, params, prompt_ids: list[int], max_new_tokens: int, temperature: float,
               top_k: int, seed: int, stop_id: int | None = None,
               on_token: Callable[[int], None] | None = None) -> list[int]:
    window = task.seq_len
    next_token = make_next_token(task, temperature, top_k)
    ids = list(prompt_ids)
    rng = jax.random.key(seed)
    for index in range(max_new_tokens):
        context = ids[-window:]
        tokens_1T = np.zeros((1, window), np.int32)
        tokens_1T[0, :len(context)] = context
        token = int(next_token(params, tokens_1T, len(context), jax.random.fold_in(rng, index)))
        if stop_id is not None and token == stop_id:
            break
        ids.append(token)
        if on_token is not None:
            on_token(token)
    return ids[len(prompt_ids):]


def sample_text(task, tokenizer, params, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, seed: int, stream: Callable[..., None] | None = None) -> str:
    """A continuation of `prompt`, begun as a new document (BOS first), as in training."""
    prompt_ids = [tokenizer.bos_id] + (tokenizer.encode([prompt])[0] if prompt else [])
    # Decode prompt and continuation together: pieces decoded alone lose their leading space.
    text_ids = prompt_ids[1:]
    emitted = tokenizer.decode(text_ids)

    def on_token(token: int) -> None:
        nonlocal emitted
        text_ids.append(token)
        text = tokenizer.decode(text_ids)
        if stream is not None and text.startswith(emitted):
            stream(text[len(emitted):], end="", flush=True)
            emitted = text

    if stream is not None:
        stream(emitted, end="", flush=True)
    sample_ids(task, params, prompt_ids, max_new_tokens, temperature, top_k, seed,
               stop_id=tokenizer.bos_id, on_token=on_token)
    if stream is not None:
        stream("")
    return tokenizer.decode(text_ids)
