"""Text in, text out: a prompt's continuation from the KV-cache decoder, streamed as it comes."""
from __future__ import annotations

import logging
from typing import Callable

from lm.decode import decoding

log = logging.getLogger(__name__)


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, max_len: int) -> list[int]:
    """Keeps the prompt's most recent tokens so prompt + continuation fit in max_len positions."""
    if max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {max_len} positions; ask for fewer")
    room = max_len - max_new_tokens
    if len(prompt_ids) > room:
        log.warning("prompt of %d tokens cut to its last %d to fit %d positions",
                    len(prompt_ids), room, max_len)
        return prompt_ids[-room:]
    return prompt_ids


def sample_text(task, tokenizer, params, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, seed: int, top_p: float = 1.0,
                stream: Callable[..., None] | None = None) -> str:
    """A continuation of `prompt`, begun as a new document (BOS first), as in training.

    Stops at max_new_tokens or at a BOS (the start of another document)."""
    prompt_ids = [tokenizer.bos_id] + (tokenizer.encode([prompt])[0] if prompt else [])
    prompt_ids = fit_prompt(prompt_ids, max_new_tokens, task.seq_len)
    sampling = decoding.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, stop_ids=(tokenizer.bos_id,),
                                       seed=seed)
    # Decode prompt and continuation together: pieces decoded alone lose their leading space.
    text_ids = [i for i in prompt_ids if i != tokenizer.bos_id]
    if stream is not None:
        stream(tokenizer.decode(text_ids), end="", flush=True)
    new_ids = stream_continuation(task.model, params, tokenizer, prompt_ids, sampling, stream,
                                  context_ids=text_ids)
    if stream is not None:
        stream("")
    return tokenizer.decode(text_ids + new_ids)


def stream_continuation(model, params, tokenizer, prompt_ids: list[int],
                        sampling: decoding.SamplingConfig, stream: Callable[..., None] | None,
                        context_ids: list[int] = ()) -> list[int]:
    """Decodes new tokens, passing each newly complete piece of text to `stream` as it comes.

    Text is decoded together with `context_ids` (what is already on screen), since a piece
    decoded alone can lose its leading space, and a multi-byte character may span tokens."""
    context_ids, new_ids = list(context_ids), []
    emitted = tokenizer.decode(context_ids)
    for token in decoding.stream(model, params, prompt_ids, sampling):
        new_ids.append(token)
        text = tokenizer.decode(context_ids + new_ids)
        if stream is not None and text.startswith(emitted) and not text.endswith("\ufffd"):
            stream(text[len(emitted):], end="", flush=True)
            emitted = text
    return new_ids
