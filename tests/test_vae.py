"""The VAE task: its likelihoods against scipy, the KL against numerical integration, the IWAE
bound's ordering, masking, and training on real digits against an independent baseline."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.stats

from core import cli
from generative.vae import (VAEConfig, VAETask, binarize, discretized_logistic_log_prob,
                            gaussian_kl, reconstruction_log_prob)
from test_flow import load_digits


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.7, -5.0), (-0.99, -1.0),
                                            (0.3, -6.9), (2.0, 0.5)])
def test_discretized_logistic_is_a_distribution_over_256_values_matching_scipy(mean, log_scale):
    values = jnp.arange(256, dtype=jnp.uint8).reshape(1, 16, 16, 1)
    log_p = np.asarray(discretized_logistic_log_prob(
        values, jnp.full(values.shape, mean), jnp.full(values.shape, log_scale)), np.float64)
    np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, rtol=1e-4)
    # scipy: bins of width 2/255 around 2k/255 - 1, the edge bins open to -inf and +inf.
    centres = 2 * np.arange(256) / 255 - 1
    # Right of the mean the bin is a difference of survival functions, which keeps float64's
    # precision in the upper tail (1 - cdf would not).
    dist = scipy.stats.logistic(loc=mean, scale=np.exp(log_scale))
    first, last = np.arange(256) == 0, np.arange(256) == 255
    by_cdf = (np.where(last, 1.0, dist.cdf(centres + 1 / 255))
              - np.where(first, 0.0, dist.cdf(centres - 1 / 255)))
    by_sf = (np.where(first, 1.0, dist.sf(centres - 1 / 255))
             - np.where(last, 0.0, dist.sf(centres + 1 / 255)))
    expected = np.where(centres > mean, by_sf, by_cdf)
    big = expected > 1e-30
    np.testing.assert_allclose(log_p.ravel()[big], np.log(expected[big]), rtol=2e-3, atol=2e-4)


def test_bernoulli_likelihood_is_on_fixed_threshold_binarisation():
    images = jnp.array([0, 127, 128, 255], jnp.uint8).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(np.ravel(binarize(images)), [0, 0, 1, 1])
    cfg = VAEConfig((4, 4, 1), likelihood="bernoulli")
    logits = jnp.array([-1.0, 0.5, 2.0, -0.3]).reshape(1, 2, 2, 1)
    probs = 1 / (1 + np.exp(-np.asarray(logits).ravel()))
    expected = np.log(1 - probs[0]) + np.log(1 - probs[1]) + np.log(probs[2]) + np.log(probs[3])
    np.testing.assert_allclose(reconstruction_log_prob(cfg, images, logits), [expected],
                               rtol=1e-6)


def test_gaussian_kl_matches_numerical_integration():
    mean, log_var = np.array([[0.3, -1.2, 0.0]]), np.array([[-0.5, 0.8, 0.0]])
    total = 0.0
    for m, lv in zip(mean[0], log_var[0]):
        q = scipy.stats.norm(m, np.exp(0.5 * lv))
        total += scipy.integrate.quad(
            lambda z: q.pdf(z) * (q.logpdf(z) - scipy.stats.norm.logpdf(z)), -30, 30)[0]
    np.testing.assert_allclose(gaussian_kl(jnp.asarray(mean), jnp.asarray(log_var)), [total],
                               rtol=1e-5)


def masked_batch(images, real):
    mask = np.zeros(len(images), np.int32)
    mask[:real] = 1
    return {"image": jnp.asarray(images), "mask": jnp.asarray(mask)}


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_padding_rows_do_not_count_and_beta_weights_only_the_kl(kind):
    train, _ = load_digits()
    task = VAETask(VAEConfig((8, 8, 1), kind=kind, beta=4.0, widths=(8, 16), hidden=32,
                             latent_dim=4))
    params = jax.jit(task.init_params)(jax.random.key(0))
    images = train[:6]
    padded = np.concatenate([images, train[100:103]])
    rng, loss = jax.random.key(1), jax.jit(task.loss, static_argnums=3)
    full = loss(params, masked_batch(padded, 6), rng, False)
    alone = loss(params, masked_batch(images, 6), rng, False)
    assert float(full.weight) == 6
    np.testing.assert_allclose(full.extra["reconstruction"], alone.extra["reconstruction"],
                               rtol=1e-5)
    if kind == "ae":
        np.testing.assert_allclose(full.loss, full.extra["reconstruction"], rtol=1e-6)
        assert "kl" not in full.extra
    else:
        np.testing.assert_allclose(full.loss, full.extra["reconstruction"] + 4 * full.extra["kl"],
                                   rtol=1e-5)
        np.testing.assert_allclose(full.extra["neg_elbo"],
                                   full.extra["reconstruction"] + full.extra["kl"], rtol=1e-5)


def train_digits(task, train, steps, seed=0):
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(seed)))
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps, 3e-4))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, rng):
        def loss(p):
            sums = task.loss(p, {"image": images, "mask": jnp.ones(len(images))}, rng, True)
            return sums.loss / sums.weight
        updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    order = np.random.default_rng(seed)
    for i in range(steps):
        batch = jnp.asarray(train[order.integers(0, len(train), 64)])
        params, opt_state = step(params, opt_state, batch, jax.random.key(i))
    return params


def independent_logistic_nats(train, test):
    """Test NLL (nats/image) of independent per-pixel discretised logistics, each pixel's mean
    and scale fitted to the train images by Adam: the same likelihood without a latent code,
    which a VAE must beat by modelling how pixels vary together."""
    train_x, test_x = jnp.asarray(train), jnp.asarray(test)

    def nll(p, images):
        return -jnp.sum(discretized_logistic_log_prob(images, p[0], p[1])) / len(images)
    params = jnp.stack([jnp.mean(train_x / 127.5 - 1.0, axis=0),
                        jnp.full(train.shape[1:], -2.0)])
    optimizer = optax.adam(0.03)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(nll)(params, train_x), state)
        return optax.apply_updates(params, updates), state
    for _ in range(500):
        params, state = step(params, state)
    return float(nll(params, test_x))


@pytest.fixture(scope="module")
def trained_vae():
    train, test = load_digits()
    task = VAETask(VAEConfig((8, 8, 1), latent_dim=8, widths=(16, 32), hidden=128))
    return task, train_digits(task, train, 600), train, test


def test_training_on_digits_beats_independent_pixels(trained_vae):
    task, params, train, test = trained_vae
    sums = jax.jit(task.loss, static_argnums=3)(params, masked_batch(test, len(test)),
                                                jax.random.key(0), False)
    metrics = task.metrics({"loss": float(sums.loss), "weight": float(sums.weight),
                            **{k: float(v) for k, v in sums.extra.items()}})
    baseline = independent_logistic_nats(train, test)
    print(f"digits test: negative ELBO {metrics['neg_elbo']:.1f} nats/image "
          f"({metrics['bits_per_dim']:.3f} bits/dim, KL {metrics['kl']:.1f}); "
          f"independent per-pixel logistics {baseline:.1f} nats/image")
    np.testing.assert_allclose(metrics["bits_per_dim"], metrics["neg_elbo"] / (64 * np.log(2)))
    assert metrics["kl"] > 2.0  # the code carries information
    assert metrics["neg_elbo"] < baseline


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(trained_vae):
    task, params, _, test = trained_vae
    images = jnp.asarray(test[:200])
    log_w = {k: task.log_weights(params, images, jax.random.key(k), k) for k in (1, 10, 100)}
    iwae = {k: np.asarray(jax.nn.logsumexp(w, axis=0) - np.log(k)) for k, w in log_w.items()}
    elbo_100 = np.asarray(jnp.mean(log_w[100], axis=0))
    assert np.all(iwae[100] >= elbo_100 - 1e-4)  # log-mean-exp >= mean, sample by sample
    means = {k: float(v.mean()) for k, v in iwae.items()}
    print("IWAE bound (nats/image):", means, "ELBO:", float(elbo_100.mean()))
    assert means[1] < means[10] < means[100]
    # The mean log weight estimates the same ELBO that the loss reports (as -neg_elbo).
    sums = task.loss(params, masked_batch(test[:200], 200), jax.random.key(3), False)
    np.testing.assert_allclose(-float(sums.extra["neg_elbo"]) / 200, elbo_100.mean(), atol=1.5)


def test_samples_decode_prior_draws_deterministically(trained_vae):
    task, params, _, _ = trained_vae
    a = task.sample(params, jax.random.key(0), 5)
    assert a.shape == (5, 8, 8, 1) and a.dtype == jnp.uint8
    np.testing.assert_array_equal(a, task.sample(params, jax.random.key(0), 5))
    assert not np.array_equal(a, task.sample(params, jax.random.key(1), 5))
    noisy = task.sample(params, jax.random.key(0), 5, mode="sample")
    assert noisy.shape == a.shape and not np.array_equal(noisy, a)


def test_bad_configs_are_refused_with_a_fix():
    with pytest.raises(ValueError, match="multiples of 4"):
        VAEConfig((30, 30, 1))
    with pytest.raises(ValueError, match="likelihood"):
        VAEConfig((8, 8, 1), likelihood="gaussian")
    with pytest.raises(ValueError, match="not an autoencoder"):
        VAETask(VAEConfig((8, 8, 1), kind="ae")).log_weights(None, None, None, 1)


@pytest.mark.parametrize("kind", ["vae", "flow"])
def test_sample_command_draws_from_vae_and_flow_runs(tmp_path, kind):
    """A 3-step digits run through the engine, then `generative.sample --sampler vae|flow`: the
    samples are the task's own draws under the command's seed, with a grid and a record."""
    import json
    import pathlib
    from conftest import QUIET
    from core import trainer
    from core.config import load_config
    from generative import sample
    from vision import pipeline
    config_file = pathlib.Path(__file__).parents[1] / f"experiments/configs/generative/{kind}.py"
    config = load_config(f"{config_file}:size=digits,steps=3",
                         [*QUIET, "--config.train.checkpoint_every=100"])
    setup = pipeline.build(config, tmp_path)
    trainer.train(config, tmp_path, setup.task, setup.data)
    out = tmp_path / "samples"
    assert sample.main(["--workdir", str(tmp_path), "--out", str(out), "--sampler", kind,
                        "--num", "6", "--batch", "4", "--temperature", "0.7", "--no-fid"]) == 0
    drawn = np.load(out / "samples.npz")
    assert drawn["images"].shape == (6, 8, 8, 1) and drawn["images"].dtype == np.uint8
    record = json.loads((out / "metrics.json").read_text())
    assert record["sampler"] == kind and record["step"] == 3 and record["num"] == 6
    assert (out / "grid.png").stat().st_size > 100
    from vision.pipeline import restore
    params = restore(config, str(tmp_path))[2].params
    args = (4, 0.7) if kind == "flow" else (4,)
    first = setup.task.sample(jax.device_get(params),
                              jax.random.fold_in(jax.random.key(0), 0), *args)
    np.testing.assert_array_equal(drawn["images"][:4], np.asarray(first))
    assert cli.run(sample.main, ["--workdir", str(tmp_path), "--out", str(out), "--sampler",
                                 "gan", "--num", "2", "--no-fid"]) == 2  # not a GAN run: refused
    from generative import iwae  # the IWAE command: a VAE run only
    assert cli.run(iwae.main, ["--workdir", str(tmp_path), "--k", "4", "--num", "8"]) == (
        0 if kind == "vae" else 2)


def test_iwae_estimate_equals_the_elbo_at_k_1_and_is_tighter_above(trained_vae):
    from generative import iwae
    task, params, _, test = trained_vae
    one = iwae.estimate(task, params, test[:150], k=1, batch=64)
    np.testing.assert_allclose(one["neg_iwae_nats"], one["neg_elbo_nats"], rtol=1e-6)
    many = iwae.estimate(task, params, test[:150], k=50, batch=64)
    assert many["neg_iwae_nats"] < many["neg_elbo_nats"] and many["images"] == 150
    np.testing.assert_allclose(many["neg_iwae_bits_per_dim"],
                               many["neg_iwae_nats"] / (64 * np.log(2)), rtol=1e-6)
