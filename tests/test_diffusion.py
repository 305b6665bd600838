"""Diffusion: schedules against the papers' formulas, samplers against an analytic denoiser and a
textbook NumPy DDPM loop, guidance semantics, exact inpainting, seeding, and a short real run."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import step as step_lib
from core.train_state import TrainState
from generative import diffusion, samplers
from vision.data import load_image_set

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_heads=2,
                 groups=4, dropout=0.0)


def digits_train() -> tuple[np.ndarray, np.ndarray]:
    data = load_image_set("digits", "train")
    return data.images, data.labels


def tiny_task(conditional=False, prediction="eps", schedule="cosine", timesteps=1000):
    cfg = diffusion.diffusion_config(unet=TINY_UNET, conditional=conditional,
                                     prediction=prediction, schedule=schedule, timesteps=timesteps)
    return diffusion.DiffusionTask(cfg, (8, 8, 1), 10)


@functools.cache
def initial_params(conditional: bool):
    """The tiny U-Net's initial parameters, one compile per shape. The key is XLA's own
    RngBitGenerator ("rbg"): the same initialisers draw them, but compiling the init's ~115
    threefry draws takes XLA:CPU about 45 s, and rbg a quarter of that."""
    task = tiny_task(conditional=conditional)
    return jax.jit(lambda r: nn.unbox(task.init_params(r)))(jax.random.key(0, impl="rbg"))


@functools.cache
def _noised_params(conditional: bool):
    """Initial parameters plus N(0, 0.05^2) noise drawn with NumPy (jitted jax.random draws for
    every leaf cost over a minute of XLA:CPU compile)."""
    rng = np.random.RandomState(1)
    return jax.tree_util.tree_map(
        lambda p: p + jnp.asarray(0.05 * rng.standard_normal(p.shape), p.dtype),
        initial_params(conditional))


def random_params(task):
    """Init params plus noise: the U-Net's zero-initialised output layer would make eps == 0."""
    return _noised_params(task.null_class is not None)


def test_linear_schedule_matches_ho_et_al():
    schedule = diffusion.make_schedule("linear", 1000)
    betas = np.asarray(schedule.betas, np.float64)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # Ho et al.: alpha_bar_T ~ 4.04e-5, so x_T is almost pure noise (sqrt(alpha_bar_T) ~ 0.0064).
    assert float(schedule.alpha_bars[-1]) == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_schedule_matches_nichol_dhariwal():
    timesteps, s = 1000, 0.008
    schedule = diffusion.make_schedule("cosine", timesteps)
    t = np.arange(1, timesteps + 1)
    alpha_bar = np.cos((t / timesteps + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    # Unclipped steps follow the closed form; only the last betas hit the 0.999 clip.
    unclipped = np.asarray(schedule.betas) < 0.999 - 1e-6
    assert unclipped[:-1].all() and not unclipped[-1]
    np.testing.assert_allclose(np.asarray(schedule.alpha_bars)[:-1], alpha_bar[:-1], rtol=2e-4, atol=1e-9)
    assert float(schedule.betas.max()) == pytest.approx(0.999)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_conversions_recover_noise_and_image(prediction):
    schedule = diffusion.make_schedule("cosine", 1000)
    rng = np.random.RandomState(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (6, 4, 4, 1)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(6, 4, 4, 1)), jnp.float32)
    t = jnp.asarray([0, 10, 200, 500, 900, 990])
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    a = np.sqrt(np.asarray(schedule.alpha_bars)[np.asarray(t)])[:, None, None, None]
    v = a * np.asarray(eps) - np.sqrt(1 - a ** 2) * np.asarray(x0)   # Salimans & Ho eq. (v)
    output = eps if prediction == "eps" else jnp.asarray(v, jnp.float32)
    if prediction == "v":
        np.testing.assert_allclose(diffusion.v_target(schedule, x0, t, eps), v, atol=1e-5)
    eps_hat, x0_hat = diffusion.eps_and_x0(schedule, prediction, output, x_t, t)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
    # x0 from eps divides by sqrt(alpha_bar), tiny at t=990: compare where it is well-conditioned.
    np.testing.assert_allclose(x0_hat[:5], x0[:5], atol=2e-3)


def gaussian_oracle(schedule, mu, std):
    """E[eps | x_t] when every pixel of x0 is N(mu, std^2): the ideal denoiser, in closed form."""
    def eps_fn(x_t, t_B):
        alpha_bar = schedule.alpha_bars[t_B][:, None, None, None]
        return (jnp.sqrt(1 - alpha_bar) * (x_t - jnp.sqrt(alpha_bar) * mu)
                / (alpha_bar * std ** 2 + 1 - alpha_bar))
    return eps_fn


def predicted_moments(schedule, mu, std, pairs, eta):
    """Mean and std of the samples, propagated exactly in float64: with the ideal denoiser each
    step maps d = x_t - sqrt(alpha_bar_t) mu to k d + sigma z, a linear Gaussian recursion."""
    alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
    mean, var = -np.sqrt(alpha_bars[-1]) * mu, 1.0
    for t, t_prev in pairs:
        a2, a2_prev = alpha_bars[t], (alpha_bars[t_prev] if t_prev >= 0 else 1.0)
        sigma2 = eta ** 2 * (1 - a2_prev) / (1 - a2) * (1 - a2 / a2_prev)
        c = np.sqrt(1 - a2_prev - sigma2)
        k = (np.sqrt(a2_prev * a2) * std ** 2 + c * np.sqrt(1 - a2)) / (a2 * std ** 2 + 1 - a2)
        mean, var = k * mean, k * k * var + sigma2
    return mu + mean, np.sqrt(var)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim50", "ddim50_eta1"])
def test_samplers_with_the_ideal_denoiser_match_the_exact_moments(sampler):
    """Gaussian data (every pixel N(0.3, 0.2^2)) and its closed-form denoiser: the samples' mean
    and std match the float64 propagation of the update rule within sampling error; DDPM's
    1000 steps land within 3% of the data's std (beta_tilde slightly under-disperses), DDIM-50
    (eta 0) shrinks it more (each deterministic step contracts the spread)."""
    schedule = diffusion.make_schedule("linear", 1000)
    mu, std = 0.3, 0.2
    eps_fn = gaussian_oracle(schedule, mu, std)
    shape = (8192, 2, 2, 1)
    rng = jax.random.key(3)
    if sampler == "ddpm":
        x = samplers.ddpm_sample(eps_fn, schedule, rng, shape, clip=False)
        taus, eta = np.arange(999, -1, -1), 1.0
    else:
        eta = 1.0 if sampler.endswith("eta1") else 0.0
        x = samplers.ddim_sample(eps_fn, schedule, rng, shape, steps=50, eta=eta, clip=False)
        taus = samplers.ddim_timesteps(1000, 50)
    pairs = list(zip(taus, list(taus[1:]) + [-1]))
    want_mean, want_std = predicted_moments(schedule, mu, std, pairs, eta)
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - want_mean) < 4 * want_std / np.sqrt(x.size)
    assert abs(x.std() - want_std) < 4 * want_std / np.sqrt(2 * x.size) + 1e-4
    if sampler == "ddpm":
        assert want_std == pytest.approx(std, rel=0.03) and want_mean == pytest.approx(mu, abs=1e-3)


def test_ddpm_matches_a_textbook_numpy_loop():
    """Ho et al. Algorithm 2 with sigma_t^2 = beta_tilde, written out in NumPy on the same noise."""
    schedule = diffusion.make_schedule("linear", 100)
    eps_fn = gaussian_oracle(schedule, -0.2, 0.5)
    shape, rng = (16, 3, 3, 1), jax.random.key(7)
    got = np.asarray(samplers.ddpm_sample(eps_fn, schedule, rng, shape, clip=False), np.float64)

    betas = np.asarray(schedule.betas, np.float64)
    alphas, alpha_bars = 1 - betas, np.cumprod(1 - betas)
    x = np.asarray(jax.random.normal(jax.random.fold_in(rng, 100), shape), np.float64)
    for t in range(99, -1, -1):
        eps = np.asarray(eps_fn(jnp.asarray(x, jnp.float32), jnp.full((16,), t)), np.float64)
        mean = (x - betas[t] / np.sqrt(1 - alpha_bars[t]) * eps) / np.sqrt(alphas[t])
        if t > 0:
            var = betas[t] * (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t])
            z = np.asarray(jax.random.normal(jax.random.fold_in(rng, t), shape), np.float64)
            x = mean + np.sqrt(var) * z
        else:
            x = mean
    np.testing.assert_allclose(got, x, atol=2e-4)
    # DDIM with eta = 1 over all T steps is the same sampler, draw for draw.
    ddim = samplers.ddim_sample(eps_fn, schedule, rng, shape, steps=100, eta=1.0, clip=False)
    np.testing.assert_allclose(np.asarray(ddim), x, atol=2e-4)


def test_ddim_timesteps_are_even_descending_and_end_at_zero():
    taus = samplers.ddim_timesteps(1000, 50)
    assert len(taus) == 50 and taus[0] == 999 and taus[-1] == 0 and np.all(np.diff(taus) < 0)
    with pytest.raises(ValueError, match="between 1 and"):
        samplers.ddim_timesteps(1000, 0)


def test_guidance_semantics():
    """w = 0: the conditional model; w = -1 or the null label: the unconditional one; else
    (1 + w) eps_cond - w eps_uncond, checked against two separate network calls."""
    task = tiny_task(conditional=True)
    params = random_params(task)
    predict = jax.jit(lambda p, x, t, y: task.predict(p, x, t, y)[0])
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t = jnp.asarray([5, 300, 600, 999])
    labels = jnp.asarray([0, 3, 7, 9])
    null = jnp.full((4,), task.null_class)
    eps_cond, eps_uncond = predict(params, x, t, labels), predict(params, x, t, null)
    assert not np.allclose(eps_cond, eps_uncond, atol=1e-3)
    guided = lambda w, y: samplers.guided_eps_fn(predict, params, y, task.null_class, w)(x, t)  # noqa: E731
    np.testing.assert_array_equal(guided(0.0, labels), eps_cond)
    np.testing.assert_allclose(guided(-1.0, labels), eps_uncond, atol=1e-5)
    np.testing.assert_allclose(guided(3.0, null), eps_uncond, atol=1e-5)
    np.testing.assert_allclose(guided(2.0, labels), 3 * eps_cond - 2 * eps_uncond, atol=1e-5)
    # End to end: sampling the null class with guidance 2 gives the unguided null-class images.
    key = jax.random.key(1)
    a = samplers.sample(task, params, key, 4, "ddim", 5, label_B=null, guidance=2.0)
    b = samplers.sample(task, params, key, 4, "ddim", 5, label_B=null, guidance=0.0)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_conditional_model_needs_labels_and_guidance_needs_a_null_class():
    task = tiny_task(conditional=True)
    with pytest.raises(ValueError, match="class-conditional"):
        samplers.sample(task, None, jax.random.key(0), 2, "ddim", 5)
    with pytest.raises(ValueError, match="null class"):
        samplers.guided_eps_fn(lambda *a: None, None, jnp.zeros(2, jnp.int32), None, 1.0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_deterministic_under_a_seed(sampler):
    task = tiny_task(timesteps=20)
    params = random_params(task)
    draw = lambda seed: np.asarray(samplers.sample(  # noqa: E731
        task, params, jax.random.key(seed), 3, sampler, 5))
    first, again, other = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 0.1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_keeps_known_pixels_exactly(sampler):
    task = tiny_task(timesteps=20)
    params = random_params(task)
    images, _ = digits_train()
    original = diffusion.images_to_unit(jnp.asarray(images[:4]))
    mask = np.zeros((4, 8, 8, 1), bool)
    mask[:, :, :4] = True   # the left half is known
    out = samplers.sample(task, params, jax.random.key(0), 4, sampler, 5,
                          known=(original, jnp.asarray(mask)))
    np.testing.assert_array_equal(np.asarray(out)[mask], np.asarray(original)[mask])
    np.testing.assert_array_equal(diffusion.unit_to_images(out)[mask], images[:4][mask])
    assert np.abs(np.asarray(out)[~mask] - np.asarray(original)[~mask]).mean() > 0.05
    with pytest.raises(ValueError, match="shaped like the samples"):
        samplers.sample(task, params, jax.random.key(0), 4, sampler, 5,
                        known=(original[:2], jnp.asarray(mask[:2])))


def test_padding_rows_do_not_count():
    task = tiny_task(conditional=True)
    params = random_params(task)
    images, labels = digits_train()
    batch = {"image": jnp.asarray(images[:4]), "label": jnp.asarray(labels[:4]),
             "mask": jnp.asarray([1, 1, 0, 0], jnp.int32)}
    other = dict(batch, image=batch["image"].at[2:].set(255), label=batch["label"].at[2:].set(1))
    loss = jax.jit(lambda b: task.loss(params, b, jax.random.key(0), train=False))
    a, b = loss(batch), loss(other)
    assert float(a.weight) == 2 * 64
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="diffusion.prediction"):
        diffusion.DiffusionTask(diffusion.diffusion_config(prediction="x0"), (8, 8, 1), 10)
    with pytest.raises(ValueError, match="too small"):
        diffusion.DiffusionTask(diffusion.diffusion_config(
            unet=dict(TINY_UNET, channel_mults=(1, 1, 1, 1, 1))), (8, 8, 1), 10)


def test_training_on_digits_lowers_the_loss():
    """The engine's own train step on real 8x8 digits: the eval loss at fixed noise falls from
    the untrained model's 1.0 (its zero-initialised output layer predicts eps = 0) to under 0.5."""
    task = tiny_task(conditional=True)
    images, labels = digits_train()
    optimizer = optax.adam(3e-3)
    params = initial_params(conditional=True)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params))
    train_step = jax.jit(step_lib.make_train_step(task, optimizer, lambda s: 3e-3, 1, seed=0))
    eval_batch = {"image": jnp.asarray(images[-256:]), "label": jnp.asarray(labels[-256:]),
                  "mask": jnp.ones(256, jnp.int32)}
    evaluate = jax.jit(lambda p: task.loss(p, eval_batch, jax.random.key(5), train=False))
    before = evaluate(state.params)
    order = np.random.RandomState(0).permutation(len(images) - 256)
    for i in range(100):
        rows = order[(i * 32) % (len(order) - 32):][:32]
        state, metrics = train_step(state, {"image": images[rows], "label": labels[rows],
                                            "mask": np.ones(32, np.int32)})
    after = evaluate(state.params)
    assert float(before.loss / before.weight) == pytest.approx(1.0, abs=0.05)
    assert float(after.loss / after.weight) < 0.5


def test_sample_command_draws_from_the_parameter_ema(tmp_path):
    """A 6-step digits run through the engine, then `generative.sample`: the grid, the samples
    and their record, from the EMA by default and from the raw parameters on request."""
    import json
    import pathlib
    from conftest import QUIET
    from core import trainer
    from core.config import load_config
    from generative import sample
    from vision import pipeline
    config_file = pathlib.Path(__file__).parents[1] / "experiments/configs/generative/diffusion.py"
    config = load_config(f"{config_file}:size=digits,steps=6,batch=32", [
        *QUIET, "--config.diffusion.unet.base_channels=8", "--config.diffusion.unet.groups=4",
        "--config.diffusion.unet.channel_mults=(1, 2)", "--config.train.checkpoint_every=100",
        "--config.optim.learning_rate=0.03"])  # moves the zero-initialised output layer
    assert config.optim.ema_decay == 0.999
    setup = pipeline.build(config, tmp_path)
    trainer.train(config, tmp_path, setup.task, setup.data)
    records, images = {}, {}
    for name, extra in (("ema", []), ("raw", ["--raw-params"])):
        out = tmp_path / name
        # Two full batches of one shape: several batches, one compiled sampler.
        assert sample.main(["--workdir", str(tmp_path), "--out", str(out), "--num", "16",
                            "--batch", "8", "--steps", "4", "--no-fid", *extra]) == 0
        records[name] = json.loads((out / "metrics.json").read_text())
        drawn = np.load(out / "samples.npz")
        assert drawn["images"].shape == (16, 8, 8, 1) and drawn["images"].dtype == np.uint8
        np.testing.assert_array_equal(drawn["labels"], np.arange(16) % 10)
        assert (out / "grid.png").stat().st_size > 100
        images[name] = drawn["images"]
    assert records["ema"]["params"] == "ema" and records["raw"]["params"] == "raw"
    assert records["ema"]["step"] == 6
    # the EMA is not the raw parameters
    assert np.abs(images["ema"].astype(int) - images["raw"]).mean() > 0.5
