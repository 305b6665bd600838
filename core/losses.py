"""Cross-entropy over a large vocabulary without ever holding [rows, vocabulary] logits.

A language model's loss is usually `softmax_cross_entropy(hidden @ unembed, targets)`: the logits
and their gradient are B x T x V float32 arrays (3.3 GB for GPT-2 at batch 16 x 1024), and the
backward pass builds a one-hot scatter and a transposed copy of them. Here rows go through the
projection a chunk at a time, in the compute dtype, upcast to float32 inside the chunk:

  forward    per chunk: logits, log-sum-exp, the target's logit, whether it is the argmax
             (accuracy in the same pass); only the per-row log-sum-exp is kept
  backward   per chunk: logits again, softmax - onehot (a comparison with an iota, no scatter),
             d hidden = g @ W^T and d W += h^T @ g

Memory is O(chunk x V) whatever the batch. The result is the weighted sums (loss, weight,
correct) that core/task.py's LossSums carry.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 1024


def _pad_rows(x, rows: int):
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _chunks(x, chunk: int):
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _logits(h_CD, w, vocab_major: bool):
    spec = "cd,vd->cv" if vocab_major else "cd,dv->cv"
    return jnp.einsum(spec, h_CD, w.astype(h_CD.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sums(hidden_ND, w, targets_N, weights_N, chunk: int, vocab_major: bool):
    return _forward(hidden_ND, w, targets_N, weights_N, chunk, vocab_major)[0]


def _forward(hidden_ND, w, targets_N, weights_N, chunk, vocab_major):
    def one(args):
        h_CD, t_C, wt_C = args
        logits_CV = _logits(h_CD, w, vocab_major)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        target_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        correct_C = (jnp.argmax(logits_CV, axis=-1) == t_C).astype(jnp.float32)
        return (jnp.sum((lse_C - target_C) * wt_C), jnp.sum(correct_C * wt_C)), lse_C

    (nll_K, correct_K), lse_KC = jax.lax.map(
        one, (_chunks(hidden_ND, chunk), _chunks(targets_N, chunk), _chunks(weights_N, chunk)))
    return (jnp.sum(nll_K), jnp.sum(correct_K)), lse_KC.reshape(-1)


def _sums_fwd(hidden_ND, w, targets_N, weights_N, chunk, vocab_major):
    out, lse_N = _forward(hidden_ND, w, targets_N, weights_N, chunk, vocab_major)
    return out, (hidden_ND, w, targets_N, weights_N, lse_N)


def _sums_bwd(chunk, vocab_major, residuals, cotangents):
    hidden_ND, w, targets_N, weights_N, lse_N = residuals
    g_loss = cotangents[0]  # the correct count has no gradient

    def one(dw, args):
        h_CD, t_C, wt_C, lse_C = args
        logits_CV = _logits(h_CD, w, vocab_major)
        onehot_CV = jax.lax.broadcasted_iota(jnp.int32, logits_CV.shape, 1) == t_C[:, None]
        g_CV = (jnp.exp(logits_CV - lse_C[:, None]) - onehot_CV) * (wt_C * g_loss)[:, None]
        g_CV = g_CV.astype(h_CD.dtype)
        wc = w.astype(h_CD.dtype)
        if vocab_major:
            dh_CD = jnp.einsum("cv,vd->cd", g_CV, wc, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("cv,cd->vd", g_CV, h_CD, preferred_element_type=jnp.float32)
        else:
            dh_CD = jnp.einsum("cv,dv->cd", g_CV, wc, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("cd,cv->dv", h_CD, g_CV, preferred_element_type=jnp.float32)
        return dw, dh_CD.astype(hidden_ND.dtype)

    dw, dh_KCD = jax.lax.scan(
        one, jnp.zeros(w.shape, jnp.float32),
        (_chunks(hidden_ND, chunk), _chunks(targets_N, chunk), _chunks(weights_N, chunk),
         _chunks(lse_N, chunk)))
    return (dh_KCD.reshape(hidden_ND.shape), dw.astype(w.dtype), None, None)


_sums.defvjp(_sums_fwd, _sums_bwd)


def chunked_cross_entropy(hidden_ND: jax.Array, unembed: jax.Array, targets_N: jax.Array,
                          weights_N: jax.Array, chunk: int = DEFAULT_CHUNK,
                          vocab_major: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of weight x cross-entropy, sum of weights, sum of weight x [argmax == target]).

    unembed is [D, V], or [V, D] with vocab_major (a tied embedding table). hidden's dtype is
    the compute dtype of the projection; logits are float32 inside a chunk only."""
    N = hidden_ND.shape[0]
    chunk = max(1, min(chunk, N))
    rows = -(-N // chunk) * chunk
    weights_N = weights_N.astype(jnp.float32)
    loss, correct = _sums(_pad_rows(hidden_ND, rows), unembed,
                          _pad_rows(targets_N.astype(jnp.int32), rows),
                          _pad_rows(weights_N, rows), chunk, vocab_major)
    return loss, jnp.sum(weights_N), correct
