"""The Glow flow: exact inverses, log-determinants against brute-force Jacobians, the bits/dim
bookkeeping against analytic densities, sampling, and a short training run on real digits."""
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from generative import flow_layers as layers
from generative.flow import FlowConfig, FlowTask, Glow, bits_per_dim, dequantize


def load_digits():
    """The 8x8 digits as uint8 0..255: (train images, test images), 1,438 / 359."""
    from vision.data import load_image_set
    return load_image_set("digits", "train").images, load_image_set("digits", "test").images


def perturbed(params, rng, scale=0.3):
    """Params moved off their (near-identity) init so every layer does something."""
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(params))
    keys = jax.random.split(rng, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def brute_logdets(fn, x_B):
    """log|det d fn(x) / dx| for each example of x_B, from full Jacobians (one jitted call)."""
    def flat_fn(v):
        return jnp.ravel(fn(v.reshape(x_B.shape[1:])))
    jacobians = jax.jit(jax.vmap(jax.jacfwd(flat_fn)))(x_B.reshape(len(x_B), -1))
    return np.linalg.slogdet(np.asarray(jacobians, np.float64))[1]


LAYERS = {
    "actnorm": lambda: layers.ActNorm(data_init=True),
    "invconv_lu": lambda: layers.InvConv1x1("lu", seed=3),
    "invconv_plain": lambda: layers.InvConv1x1("plain"),
    "coupling": lambda: layers.AffineCoupling(width=8),
    "step": lambda: layers.FlowStep(width=8, invconv_kind="lu", seed=1),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverse_and_logdet_match_brute_force(name):
    layer = LAYERS[name]()
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 4)) * 2 + 1
    params = perturbed(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
    y, logdet = layer.apply({"params": params}, x)
    x_back, inverse_logdet = layer.apply({"params": params}, y, reverse=True)
    np.testing.assert_allclose(x_back, x, atol=2e-5)
    np.testing.assert_allclose(inverse_logdet, -logdet, rtol=1e-6)
    assert not np.allclose(y, x, atol=1e-2)  # the layer is not the identity
    expected = brute_logdets(lambda v: layer.apply({"params": params}, v[None])[0][0], x)
    np.testing.assert_allclose(logdet, expected, rtol=1e-4, atol=1e-4)


def test_actnorm_data_init_standardises_the_init_batch():
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 3)) * jnp.array([0.5, 2.0, 7.0]) + 3.0
    layer = layers.ActNorm(data_init=True)
    params = layer.init(jax.random.key(1), x)["params"]
    y, _ = layer.apply({"params": params}, x)
    np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.std(y, axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_invconv_logdet_is_pixels_times_numpy_slogdet():
    layer = layers.InvConv1x1("lu", seed=7)
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
    params = perturbed(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
    p, _, _, sign, _ = layers.lu_init(6, 7)
    lower = np.tril(np.asarray(params["lower"]), -1) + np.eye(6)
    upper = np.triu(np.asarray(params["upper"]), 1) + np.diag(sign * np.exp(params["log_s"]))
    weight = p @ lower @ upper
    y, logdet = layer.apply({"params": params}, x)
    np.testing.assert_allclose(y, np.einsum("bhwc,dc->bhwd", np.asarray(x), weight), atol=1e-5)
    np.testing.assert_allclose(logdet, 15 * np.linalg.slogdet(weight)[1], rtol=1e-5)
    # The LU init is a rotation: |det| = 1.
    init = layer.init(jax.random.key(1), x)["params"]
    np.testing.assert_allclose(np.sum(nn.meta.unbox(init)["log_s"]), 0.0, atol=1e-5)


def test_squeeze_is_a_permutation_with_its_inverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = layers.squeeze(x)
    assert y.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(layers.unsqueeze(y), x)
    np.testing.assert_array_equal(np.sort(np.ravel(y)), np.ravel(x))
    # Channel block k of output pixel (i, j) is input pixel (2i + k // 2, 2j + k % 2).
    np.testing.assert_array_equal(y[:, 1, 2, 3:6], x[:, 2, 5, :])


def tiny_flow(preprocess="logit", steps=2, image_shape=(4, 4, 1)):
    cfg = FlowConfig(image_shape=image_shape, levels=2, steps=steps, width=8,
                     preprocess=preprocess)
    images = np.random.default_rng(0).integers(0, 256, (16, *image_shape), dtype=np.uint8)
    return FlowTask(cfg, images)


@pytest.mark.parametrize("preprocess", ["logit", "shift"])
def test_whole_flow_inverts_and_its_logdet_matches_the_jacobian(preprocess):
    task = tiny_flow(preprocess)
    params = jax.jit(task.init_params)(jax.random.key(0))
    params = perturbed(params, jax.random.key(1), scale=0.2)
    y = dequantize(jax.random.key(2), jnp.asarray(np.random.default_rng(1).integers(
        0, 256, (4, 4, 4, 1), dtype=np.uint8)))
    latents, logdet, _ = jax.jit(task.model.apply)({"params": params}, y)
    assert [z.shape for z in latents] == [(4, 2, 2, 2), (4, 1, 1, 8)]
    inverse = jax.jit(partial(task.model.apply, method=Glow.inverse))
    y_back = inverse({"params": params}, latents)
    np.testing.assert_allclose(y_back, y, atol=1e-5)

    def to_latents(v):
        zs, _, _ = task.model.apply({"params": params}, v[None])
        return jnp.concatenate([jnp.ravel(z) for z in zs])
    np.testing.assert_allclose(logdet, brute_logdets(to_latents, y), rtol=1e-4, atol=2e-3)


def test_round_trip_on_a_data_initialised_28x28_flow():
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    task = FlowTask(FlowConfig((28, 28, 1), levels=2, steps=1, width=16), images)
    params = jax.jit(task.init_params)(jax.random.key(0))
    params = perturbed(params, jax.random.key(1), scale=0.05)
    y = dequantize(jax.random.key(2), jnp.asarray(images))

    @jax.jit
    def round_trip(params, y):
        latents, _, _ = task.model.apply({"params": params}, y)
        return task.model.apply({"params": params}, latents, method=Glow.inverse)
    y_back = round_trip(params, y)
    np.testing.assert_allclose(y_back, y, atol=1e-5)


@pytest.mark.parametrize("preprocess", ["shift", "logit"])
def test_bits_per_dim_of_a_permutation_flow_is_the_analytic_value(preprocess):
    """With no flow steps the flow is squeezes and splits (permutations) and every prior is
    N(0, 1) at init, so log p(y) has a closed form: the standard normal of the preprocessed
    pixels plus the preprocessing's own log-derivative."""
    task = tiny_flow(preprocess, steps=0, image_shape=(8, 8, 1))
    params = jax.jit(task.init_params)(jax.random.key(0))
    images = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    batch = {"image": jnp.asarray(images), "mask": jnp.array([1, 1, 1, 1, 0])}
    rng = jax.random.key(4)
    sums = task.loss(params, batch, rng, train=False)

    y = (images.astype(np.float64) + np.asarray(jax.random.uniform(rng, images.shape))) / 256
    if preprocess == "shift":
        log_p = scipy.stats.norm.logpdf(y - 0.5)
    else:
        s = 0.05 + 0.9 * y
        log_p = scipy.stats.norm.logpdf(np.log(s / (1 - s))) + np.log(0.9 / (s * (1 - s)))
    log_p = log_p.reshape(5, -1).sum(axis=1)
    bpd = (-log_p + 64 * np.log(256)) / (64 * np.log(2))
    metrics = task.metrics({"loss": float(sums.loss), "weight": float(sums.weight)})
    assert metrics["images"] == 4
    np.testing.assert_allclose(metrics["bits_per_dim"], bpd[:4].mean(), rtol=1e-5)
    np.testing.assert_allclose(bits_per_dim(log_p, 64), bpd)


def test_sampling_shape_determinism_and_temperature():
    task = tiny_flow(image_shape=(8, 8, 1))
    params = jax.jit(task.init_params)(jax.random.key(0))
    params = perturbed(params, jax.random.key(1), scale=0.1)
    sample = jax.jit(task.sample, static_argnums=2)
    a = sample(params, jax.random.key(5), 6, 0.8)
    assert a.shape == (6, 8, 8, 1) and a.dtype == jnp.uint8
    np.testing.assert_array_equal(a, sample(params, jax.random.key(5), 6, 0.8))
    assert not np.array_equal(a, sample(params, jax.random.key(6), 6, 0.8))
    # At temperature 0 every latent is its prior mean, whatever the seed.
    np.testing.assert_array_equal(sample(params, jax.random.key(5), 6, 0.0),
                                  sample(params, jax.random.key(9), 6, 0.0))


def test_bad_configs_and_batches_are_refused_with_a_fix():
    with pytest.raises(ValueError, match="multiples of 2\\^levels = 8"):
        FlowConfig((28, 28, 1), levels=3)
    with pytest.raises(ValueError, match="preprocess"):
        FlowConfig((8, 8, 1), preprocess="tanh")
    with pytest.raises(ValueError, match="init_images"):
        FlowTask(FlowConfig((8, 8, 1)))
    task = tiny_flow(image_shape=(8, 8, 1))
    params = jax.jit(task.init_params)(jax.random.key(0))
    with pytest.raises(ValueError, match="built for \\(8, 8, 1\\)"):
        task.loss(params, {"image": jnp.zeros((2, 4, 4, 1), jnp.uint8),
                           "mask": jnp.ones(2, jnp.int32)}, jax.random.key(0), True)


def gaussian_bpd(train, test, full_covariance):
    """Bits/dim of a Gaussian fitted to the logit-preprocessed dequantised digits: a linear
    flow, the reference a trained Glow must beat."""
    cfg = FlowConfig((8, 8, 1), preprocess="logit")
    from generative.flow import preprocess

    def embed(images, seed):
        y = dequantize(jax.random.key(seed), jnp.asarray(images))
        x, logdet = preprocess(cfg, y)
        return np.asarray(x, np.float64).reshape(len(images), -1), np.asarray(logdet)
    x_train, _ = embed(train, 0)
    x_test, logdet = embed(test, 1)
    mean = x_train.mean(0)
    cov = np.cov(x_train.T) if full_covariance else np.diag(x_train.var(0))
    log_p = scipy.stats.multivariate_normal(mean, cov + 1e-6 * np.eye(64)).logpdf(x_test)
    return float(np.mean(bits_per_dim(log_p + logdet, 64)))


def test_training_on_digits_beats_a_full_covariance_gaussian():
    train, test = load_digits()
    task = FlowTask(FlowConfig((8, 8, 1), levels=2, steps=4, width=32), train[:512])
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 30, 400, 2e-4))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, rng):
        def loss(p):
            sums = task.loss(p, {"image": images, "mask": jnp.ones(len(images))}, rng, True)
            return sums.loss / sums.weight
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    order = np.random.default_rng(0)
    for i in range(400):
        batch = train[order.integers(0, len(train), 64)]
        params, opt_state = step(params, opt_state, jnp.asarray(batch), jax.random.key(i))
    sums = jax.jit(task.loss, static_argnums=3)(
        params, {"image": jnp.asarray(test), "mask": jnp.ones(len(test))}, jax.random.key(0),
        False)
    flow_bpd = task.metrics({"loss": float(sums.loss), "weight": float(sums.weight)})
    diagonal, full = gaussian_bpd(train, test, False), gaussian_bpd(train, test, True)
    print(f"digits test bits/dim: flow {flow_bpd['bits_per_dim']:.3f}, "
          f"full-covariance Gaussian {full:.3f}, diagonal Gaussian {diagonal:.3f}")
    assert full < diagonal
    assert flow_bpd["bits_per_dim"] < full
    assert math.isfinite(flow_bpd["bits_per_dim"])
