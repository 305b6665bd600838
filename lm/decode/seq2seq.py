"""Encoder-decoder decoding (T5, BART, PEGASUS, captioning): encode once, then one decoder step
per token through the KV cache, all steps inside one jitted scan.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.decode import decoding
from lm.models.encoder_decoder import EncoderDecoder

Array = jax.Array

def init_cache(model: EncoderDecoder, batch: int, inputs_len: int, length: int):
    """A zero decoder cache for `batch` rows of `length` target slots."""
    def create(inputs_BS, targets_BT):
        return model.init(jax.random.key(0), inputs_BS, targets_BT, decode=True)["cache"]
    shapes = jax.eval_shape(create, jax.ShapeDtypeStruct((batch, inputs_len), jnp.int32),
                            jax.ShapeDtypeStruct((batch, length), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def decode_steps(model: EncoderDecoder, params, inputs_BS: Array, input_segment_ids_BS: Array,
                 sampling: decoding.SamplingConfig, start_id: int) -> tuple[Array, Array]:
    """(tokens (B, N), logits (B, N, V)) of N = sampling.max_new_tokens decoder steps, each
    feeding back the token chosen from the previous step's logits (the first: start_id)."""
    B, N = inputs_BS.shape[0], sampling.max_new_tokens
    memory_BSD = model.apply({"params": params}, inputs_BS, input_segment_ids_BS,
                             method=EncoderDecoder.encode)
    cache = init_cache(model, B, inputs_BS.shape[1], N)
    rng = jax.random.key(sampling.seed)

    def step(carry, i):
        token_B, cache = carry
        logits_B1V, variables = model.apply(
            {"params": params, "cache": cache}, token_B[:, None], memory_BSD,
            input_segment_ids_BS, jnp.ones((B, 1), jnp.int32), jnp.full((B, 1), i),
            decode=True, mutable=["cache"], method=EncoderDecoder.decode)
        logits_BV = logits_B1V[:, 0]
        token_B = decoding.choose_tokens(logits_BV, jax.random.fold_in(rng, i), sampling)
        return (token_B, variables["cache"]), (token_B, logits_BV)

    start_B = jnp.full((B,), start_id, jnp.int32)
    _, (tokens_NB, logits_NBV) = jax.lax.scan(step, (start_B, cache), jnp.arange(N))
    return tokens_NB.T, logits_NBV.transpose(1, 0, 2)


def generate(model: EncoderDecoder, params, inputs: Sequence[Sequence[int]],
             sampling: decoding.SamplingConfig, start_id: int) -> list[list[int]]:
    """Target tokens for each input sequence, up to (not including) the first stop token.

    Inputs of different lengths are padded on the right (segment 0, which cross-attention never
    sees); sampling.temperature 0 is greedy."""
    tokens_BS, segments_BS, _, _ = decoding.pad_prompts(inputs, sampling.pad_id, "right")
    tokens_BN, _ = decode_steps(model, params, jnp.asarray(tokens_BS), jnp.asarray(segments_BS),
                                sampling, start_id)
    out = []
    for row in np.asarray(tokens_BN).tolist():
        stops = [n for n, token in enumerate(row) if token in sampling.stop_ids]
        out.append(row[:stops[0]] if stops else row)
    return out
