"""GAN: the one-scalar loss splits into each network's own gradient; loss formulas against their
textbook forms; a short run through the engine's step learns the digits' pixel statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from core import optim, step as step_lib
from core.train_state import TrainState
from generative import gan
from tests.test_diffusion import digits_train


def tiny_gan(loss="non_saturating"):
    return gan.GANTask(gan.gan_config(loss=loss, latent_dim=16, generator_channels=16,
                                      discriminator_channels=16), (8, 8, 1))


def batch_of(images, rows):
    return {"image": jnp.asarray(images[rows]), "label": jnp.zeros(len(rows), jnp.int32),
            "mask": jnp.ones(len(rows), jnp.int32)}


@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
def test_one_loss_gives_each_network_its_own_gradient(loss):
    task = tiny_gan(loss)
    params = nn.unbox(task.init_params(jax.random.key(0)))
    images, _ = digits_train()
    batch = batch_of(images, np.arange(8))
    rng = jax.random.key(3)
    grads = jax.grad(lambda p: task.loss(p, batch, rng, train=True).loss)(params)

    # The two objectives written separately, with no stop_gradient anywhere.
    real = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    z = task.latents(rng, 8)
    fake = task.generate(params["generator"], z)

    def d_objective(d_params):
        real_logit, fake_logit = task.discriminate(d_params, real), task.discriminate(d_params, fake)
        if loss == "hinge":
            return jnp.sum(jnp.maximum(0, 1 - real_logit) + jnp.maximum(0, 1 + fake_logit))
        return -jnp.sum(jnp.log(jax.nn.sigmoid(real_logit)) + jnp.log(1 - jax.nn.sigmoid(fake_logit)))

    def g_objective(g_params):
        fake_logit = task.discriminate(params["discriminator"], task.generate(g_params, z))
        return jnp.sum(-fake_logit) if loss == "hinge" else -jnp.sum(jnp.log(jax.nn.sigmoid(fake_logit)))

    want_d, want_g = jax.grad(d_objective)(params["discriminator"]), jax.grad(g_objective)(params["generator"])
    for got, want in [(grads["discriminator"], want_d), (grads["generator"], want_g)]:
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
    sums = task.loss(params, batch, rng, train=True)
    np.testing.assert_allclose(sums.extra["d_loss"], d_objective(params["discriminator"]), rtol=1e-5)
    np.testing.assert_allclose(sums.extra["g_loss"], g_objective(params["generator"]), rtol=1e-5)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="gan.loss"):
        gan.GANTask(gan.gan_config(loss="wasserstein"), (8, 8, 1))
    with pytest.raises(ValueError, match="multiples of 4"):
        gan.GANTask(gan.gan_config(), (10, 10, 1))


def test_training_through_the_engine_step_learns_the_mean_digit():
    """300 simultaneous steps with the engine's AdamW: the generator's mean image goes from
    unrelated to the digits' mean image (correlation ~0.05) to resembling it (> 0.6)."""
    task = tiny_gan()
    images, _ = digits_train()
    mean_digit = (images.astype(np.float32) / 127.5 - 1.0).mean(0).ravel()
    steps = 300
    cfg = optim.optim_config(learning_rate=2e-3, warmup_steps=1, min_lr_ratio=1.0, b1=0.5,
                             b2=0.999, weight_decay=0.0, clip_norm=0.0)
    optimizer, schedule = optim.build_optimizer(cfg, steps)
    params = nn.unbox(task.init_params(jax.random.key(0)))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    train_step = jax.jit(step_lib.make_train_step(task, optimizer, schedule, 1, seed=0))
    generate = jax.jit(lambda p: task.generate(p["generator"], task.latents(jax.random.key(9), 1000)))
    correlation = lambda p: np.corrcoef(np.asarray(generate(p)).mean(0).ravel(), mean_digit)[0, 1]  # noqa: E731
    before = correlation(state.params)
    rng = np.random.RandomState(0)
    for _ in range(steps):
        state, metrics = train_step(state, batch_of(images, rng.choice(len(images), 64, replace=False)))
    assert before < 0.3 and correlation(state.params) > 0.6
    assert np.isfinite(float(metrics["loss"]))


def test_gan_config_sections_build():
    from experiments.configs.generative import gan as gan_configs
    config = gan_configs.get_config("size=digits")
    info = ml_collections.ConfigDict({"image_shape": (8, 8, 1), "num_classes": 10})
    task = gan.build_task(config, info)
    assert task.image_shape == (8, 8, 1) and config.task == "gan"


def test_two_time_scale_learning_rates_reach_each_network():
    """The config's optimiser groups cover both networks; with TTUR's rates, Adam's first step
    (about lr * sign(g)) moves the discriminator 4x as far as the generator."""
    from core.config import apply_overrides
    from experiments.configs.generative import gan as gan_configs
    config = gan_configs.get_config("size=digits")
    apply_overrides(config, ["--config.optim.groups.discriminator.learning_rate=4e-4",
                             "--config.optim.groups.generator.learning_rate=1e-4",
                             "--config.optim.warmup_steps=1"])
    task = tiny_gan()
    optimizer, _ = optim.build_optimizer(config.optim, 10)
    params = nn.unbox(task.init_params(jax.random.key(0)))
    state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(2):  # warmup 1: the first step's rate is 0
        updates, state = optimizer.update(grads, state, params)
    largest = {name: max(float(jnp.abs(u).max()) for u in jax.tree_util.tree_leaves(tree))
               for name, tree in updates.items()}
    assert largest["discriminator"] == pytest.approx(4e-4, rel=1e-3)
    assert largest["generator"] == pytest.approx(1e-4, rel=1e-3)
