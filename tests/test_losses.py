"""The chunked cross-entropy (core/losses.py) against optax's on full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import losses


def reference(hidden_ND, unembed, targets_N, weights_N, vocab_major):
    logits_NV = hidden_ND @ (unembed.T if vocab_major else unembed)
    nll_N = optax.softmax_cross_entropy_with_integer_labels(logits_NV, targets_N)
    correct_N = (jnp.argmax(logits_NV, -1) == targets_N).astype(jnp.float32)
    return jnp.sum(nll_N * weights_N), jnp.sum(weights_N), jnp.sum(correct_N * weights_N)


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("chunk", [1, 16, 37, 1000])
def test_sums_and_gradients_equal_full_logits(vocab_major, chunk):
    rng = np.random.default_rng(chunk)
    N, D, V = 100, 24, 301
    hidden = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    unembed = jnp.asarray(rng.normal(0, 0.3, size=(V, D) if vocab_major else (D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N))
    weights = jnp.asarray(rng.integers(0, 2, N) * rng.uniform(0.5, 2, N), jnp.float32)
    ours = losses.chunked_cross_entropy(hidden, unembed, targets, weights, chunk, vocab_major)
    ref = reference(hidden, unembed, targets, weights, vocab_major)
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-5)
    grad = lambda f: jax.grad(lambda h, w: f(h, w, targets, weights)[0] * 0.7, (0, 1))(
        hidden, unembed)
    for a, b in zip(grad(lambda *a: losses.chunked_cross_entropy(*a, chunk, vocab_major)),
                    grad(lambda *a: reference(*a, vocab_major))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_memory_holds_no_full_logits():
    """Compiled forward and backward at N x V = 8,192 x 8,192: temporaries stay far below one
    float32 [N, V] array (256 MiB), which the plain loss needs several of."""
    N, D, V = 8192, 64, 8192
    args = (jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((N,), jnp.int32), jax.ShapeDtypeStruct((N,), jnp.float32))

    def temp_bytes(loss_fn):
        step = jax.jit(jax.grad(lambda h, w, t, wt: loss_fn(h, w, t, wt)[0], (0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda *a: reference(*a, False))
    ours = temp_bytes(lambda *a: losses.chunked_cross_entropy(*a, chunk=512))
    assert full >= N * V * 4 and ours < N * V * 4 / 4, (full, ours)


@pytest.mark.parametrize("style", ["tiny-gpt2", "tiny-llama"])  # tied and untied unembedding
def test_the_causal_lm_loss_through_chunks_equals_full_logits(style):
    import dataclasses

    from lm.models import transformer as model_lib
    from lm.objectives.causal_lm import CausalLMTask
    cfg = model_lib.preset(style, vocab_size=200, max_len=32)
    full, chunked = (CausalLMTask(dataclasses.replace(cfg, loss_chunk=c), 32) for c in (0, 24))
    params = jax.tree.map(lambda x: getattr(x, "value", x), full.init_params(jax.random.key(0)),
                          is_leaf=lambda x: hasattr(x, "value"))
    assert chunked.projection_for_loss(params)[1] == cfg.tie_embeddings
    rng = np.random.default_rng(1)
    batch = {"tokens": jnp.asarray(rng.integers(0, 200, (3, 33))),
             "segment_ids": jnp.asarray(np.repeat([[1] * 20 + [2] * 10 + [0] * 3], 3, 0))}
    run = lambda task: jax.value_and_grad(
        lambda p: (lambda s: (s.loss, s))(task.loss(p, batch, None, False)), has_aux=True)(params)
    (_, a), ga = run(full)
    (_, b), gb = run(chunked)
    np.testing.assert_allclose([a.loss, a.weight, a.extra["accuracy"]],
                               [b.loss, b.weight, b.extra["accuracy"]], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
