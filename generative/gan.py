"""A DCGAN-style GAN (Radford et al. 2016) as one task, both networks trained by one optimizer.

The engine differentiates one scalar with respect to all parameters, so the task's loss is
    d_loss(D, stop_gradient(G(z))) + g_loss(stop_gradient(D), G(z))
whose gradient with respect to D is the discriminator's loss gradient and with respect to G the
generator's: each network descends its own objective, simultaneously, in one jitted step.

Generator: z -> dense -> (H/4, W/4, 2c) -> transposed conv x2 (stride 2) -> tanh image in [-1, 1].
Discriminator: conv stride 2 x2 with LeakyReLU(0.2) -> dense logit. GroupNorm replaces DCGAN's
BatchNorm in the generator (no running statistics, so the task needs no model state); the
discriminator has no normalisation. Losses: "non_saturating" (Goodfellow et al. 2014: D minimises
softplus(-D(x)) + softplus(D(G(z))), G minimises softplus(-D(G(z)))) or "hinge" (Lim & Ye 2017;
D: relu(1 - D(x)) + relu(1 + D(G(z))), G: -D(G(z))).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from core.config import ConfigError, check_choice
from core.flops import xla_flops
from core.task import BatchField, LossSums
from generative.diffusion import images_to_unit

LOSSES = ("non_saturating", "hinge")
_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(features, strides, transpose=False, name=None):
    kwargs = dict(kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), _CONV_AXES),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                  padding="SAME", strides=(strides, strides), name=name)
    if transpose:
        return nn.ConvTranspose(features, (4, 4), **kwargs)
    return nn.Conv(features, (4, 4), **kwargs)


def _dense(features, axes, name=None):
    return nn.Dense(features,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                    name=name)


def _group_norm(channels, name):
    return nn.GroupNorm(num_groups=min(8, channels),
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        name=name)


class Generator(nn.Module):
    image_shape: tuple[int, int, int]
    channels: int

    @nn.compact
    def __call__(self, z_BZ):
        height, width, out_channels = self.image_shape
        h0, w0 = height // 4, width // 4
        h_BD = _dense(h0 * w0 * 2 * self.channels, ("embed", "mlp"), "project")(z_BZ)
        h_BHWC = h_BD.reshape(z_BZ.shape[0], h0, w0, 2 * self.channels)
        h_BHWC = nn.relu(_group_norm(2 * self.channels, "norm0")(h_BHWC))
        h_BHWC = _conv(self.channels, 2, transpose=True, name="up1")(h_BHWC)
        h_BHWC = nn.relu(_group_norm(self.channels, "norm1")(h_BHWC))
        h_BHWC = _conv(out_channels, 2, transpose=True, name="up2")(h_BHWC)
        return jnp.tanh(h_BHWC)


class Discriminator(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x_BHWC):
        h_BHWC = nn.leaky_relu(_conv(self.channels, 2, name="down1")(x_BHWC), 0.2)
        h_BHWC = nn.leaky_relu(_conv(2 * self.channels, 2, name="down2")(h_BHWC), 0.2)
        h_BD = h_BHWC.reshape(h_BHWC.shape[0], -1)
        return _dense(1, ("embed", "classes"), "logit")(h_BD)[:, 0]


def discriminator_loss(kind: str, real_logit_B, fake_logit_B):
    """Per-image discriminator loss."""
    if kind == "hinge":
        return jax.nn.relu(1.0 - real_logit_B) + jax.nn.relu(1.0 + fake_logit_B)
    return jax.nn.softplus(-real_logit_B) + jax.nn.softplus(fake_logit_B)


def generator_loss(kind: str, fake_logit_B):
    """Per-image generator loss (non-saturating: -log sigmoid(D(G(z))))."""
    if kind == "hinge":
        return -fake_logit_B
    return jax.nn.softplus(-fake_logit_B)


def gan_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "loss": "non_saturating",   # non_saturating | hinge
        "latent_dim": 64,
        "generator_channels": 64,
        "discriminator_channels": 64,
    })
    cfg.update(overrides)
    return cfg


class GANTask:
    """params = {"generator": ..., "discriminator": ...}; loss = D's loss + G's loss, per image."""
    name = "gan"

    def __init__(self, cfg: ml_collections.ConfigDict, image_shape):
        check_choice("gan.loss", cfg.loss, LOSSES)
        height, width, _ = image_shape
        if height % 4 or width % 4:
            raise ConfigError(f"the DCGAN generator upsamples x4: image sides must be multiples "
                              f"of 4, got {height}x{width}")
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.generator = Generator(self.image_shape, cfg.generator_channels)
        self.discriminator = Discriminator(cfg.discriminator_channels)

    def init_params(self, rng):
        g_rng, d_rng = jax.random.split(rng)
        z_BZ = jnp.zeros((1, self.cfg.latent_dim), jnp.float32)
        x_BHWC = jnp.zeros((1, *self.image_shape), jnp.float32)
        return {"generator": self.generator.init({"params": g_rng}, z_BZ)["params"],
                "discriminator": self.discriminator.init({"params": d_rng}, x_BHWC)["params"]}

    def generate(self, generator_params, z_BZ):
        """Images in [-1, 1] from latents."""
        return self.generator.apply({"params": generator_params}, z_BZ)

    def latents(self, rng, num: int):
        return jax.random.normal(rng, (num, self.cfg.latent_dim))

    def discriminate(self, discriminator_params, x_BHWC):
        return self.discriminator.apply({"params": discriminator_params}, x_BHWC)

    def loss_terms(self, params, batch, rng):
        """Per-image (d_loss, g_loss, real logits, fake logits), with the stop-gradients that make
        d(d_loss + g_loss)/dD the discriminator's gradient and /dG the generator's."""
        real_BHWC = images_to_unit(batch["image"])
        fake_BHWC = self.generate(params["generator"], self.latents(rng, real_BHWC.shape[0]))
        d_params = params["discriminator"]
        logits_2B = self.discriminate(
            d_params, jnp.concatenate([real_BHWC, jax.lax.stop_gradient(fake_BHWC)]))
        real_logit_B, fake_logit_B = jnp.split(logits_2B, 2)
        g_fake_logit_B = self.discriminate(jax.lax.stop_gradient(d_params), fake_BHWC)
        return (discriminator_loss(self.cfg.loss, real_logit_B, fake_logit_B),
                generator_loss(self.cfg.loss, g_fake_logit_B), real_logit_B, fake_logit_B)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        del train  # no dropout or augmentation: train and eval losses are the same function
        d_loss_B, g_loss_B, real_logit_B, fake_logit_B = self.loss_terms(params, batch, rng)
        mask_B = batch["mask"].astype(jnp.float32)
        correct_B = (real_logit_B > 0).astype(jnp.float32) + (fake_logit_B < 0).astype(jnp.float32)
        total = lambda v_B: jnp.sum(v_B * mask_B)  # noqa: E731
        return LossSums(loss=total(d_loss_B + g_loss_B), weight=jnp.sum(mask_B),
                        extra={"d_loss": total(d_loss_B), "g_loss": total(g_loss_B),
                               "d_accuracy": total(correct_B) / 2.0,
                               "d_real_logit": total(real_logit_B),
                               "d_fake_logit": total(fake_logit_B)})

    def batch_fields(self):
        return {"image": BatchField(self.image_shape, jnp.uint8, ("batch", None, None, None)),
                "label": BatchField((), jnp.int32, ("batch",)),
                "mask": BatchField((), jnp.int32, ("batch",))}

    @functools.cached_property
    def _forward_flops(self) -> float:
        params = jax.eval_shape(self.init_params, jax.random.key(0))
        batch = {"image": jax.ShapeDtypeStruct((1, *self.image_shape), jnp.uint8),
                 "mask": jax.ShapeDtypeStruct((1,), jnp.int32)}
        return xla_flops(self.loss_terms, params, batch, jax.random.key(0))

    def train_flops_per_example(self) -> float:
        """3x the forward passes of one step's image (G once, D three times), by XLA."""
        return 3.0 * self._forward_flops

    def units_per_example(self):
        return "images", 1

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Per-image losses and the discriminator's accuracy on real vs generated images."""
        weight = max(totals["weight"], 1.0)
        result = {"loss": totals["loss"] / weight, "images": totals["weight"]}
        result.update({k: totals[k] / weight for k in
                       ("d_loss", "g_loss", "d_accuracy", "d_real_logit", "d_fake_logit")})
        return result


def build_task(config: ml_collections.ConfigDict, info) -> GANTask:
    return GANTask(config.gan, info.image_shape)

