"""A multi-scale normalizing flow (Glow: actnorm, 1x1 conv, affine coupling) as an image task.

Likelihood bookkeeping. 8-bit pixels x in {0..255} are dequantised as y = (x + u) / 256 with
u ~ U[0, 1)^D, a continuous point in [0, 1)^D. The flow gives log p(y) exactly (change of
variables), and since each x owns a bin of volume 256^-D,
    -log P(x) <= E_u[-log p(y)] + D log 256           (nats per image)
    bits/dim   = (-log p(y) + D log 256) / (D log 2),
the number every flow paper reports. Preprocessing ("logit": z = logit(a + (1 - 2a) y), RealNVP's
a = 0.05; "shift": z = y - 0.5, Glow's) is part of the flow, with its log-determinant counted.

Multi-scale: for each of `levels`: squeeze (2x2 space-to-depth), `steps` Glow steps, then (except
at the last level) half the channels are factored out with a learned Gaussian prior conditioned
on the other half. The last level's output has a standard normal prior.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from core.config import check_choice
from core.task import BatchField, LossSums
from generative.flow_layers import (FlowStep, SplitPrior, gaussian_log_prob, squeeze,
                                    unsqueeze)

PREPROCESSING = ("logit", "shift")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    image_shape: tuple[int, int, int]
    levels: int = 2
    steps: int = 4               # Glow steps per level
    width: int = 64              # coupling nets' hidden channels
    invconv: str = "lu"          # "lu" or "plain"
    preprocess: str = "logit"    # "logit" or "shift"
    logit_alpha: float = 0.05
    data_init: bool = True       # actnorm from the init batch (needs one at build time)

    def __post_init__(self):
        h, w, c = self.image_shape
        if self.levels < 1:
            raise ValueError(f"flow.levels must be >= 1, got {self.levels}")
        if self.steps < 0 or self.width < 1:
            raise ValueError(f"flow.steps must be >= 0 and flow.width >= 1, got {self.steps} "
                             f"and {self.width}")
        if h % 2 ** self.levels or w % 2 ** self.levels:
            raise ValueError(f"images of {h}x{w} cannot be squeezed {self.levels} times; "
                             f"height and width must be multiples of 2^levels = {2 ** self.levels}"
                             "; lower flow.levels")
        check_choice("flow.preprocess", self.preprocess, PREPROCESSING, ValueError)
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"flow.logit_alpha must be in [0, 0.5), got {self.logit_alpha}")

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def level_channels(self) -> list[int]:
        """Channels inside each level (after its squeeze)."""
        channels, out = self.image_shape[2], []
        for level in range(self.levels):
            channels *= 4
            out.append(channels)
            channels //= 2
        return out


def preprocess(cfg: FlowConfig, y_BHWC):
    """[0, 1) -> the flow's input space, with the per-image log-determinant."""
    if cfg.preprocess == "shift":
        return y_BHWC - 0.5, jnp.zeros(y_BHWC.shape[0])
    a = cfg.logit_alpha
    s = a + (1 - 2 * a) * y_BHWC
    logdet_elem = math.log(1 - 2 * a) - jnp.log(s) - jnp.log1p(-s)
    return jnp.log(s) - jnp.log1p(-s), jnp.sum(logdet_elem, axis=(1, 2, 3))


def postprocess(cfg: FlowConfig, x_BHWC):
    """The inverse of `preprocess`."""
    if cfg.preprocess == "shift":
        return x_BHWC + 0.5
    return (jax.nn.sigmoid(x_BHWC) - cfg.logit_alpha) / (1 - 2 * cfg.logit_alpha)


class Glow(nn.Module):
    cfg: FlowConfig

    def setup(self):
        cfg = self.cfg
        self.steps = [FlowStep(cfg.width, cfg.invconv, seed=1000 * level + step,
                               data_init=cfg.data_init)
                      for level in range(cfg.levels) for step in range(cfg.steps)]
        self.priors = [SplitPrior() for _ in range(cfg.levels - 1)]

    def level_steps(self, level: int):
        return self.steps[level * self.cfg.steps:(level + 1) * self.cfg.steps]

    def forward(self, y_BHWC):
        """y in [0, 1) -> (latents per level, log|det| per image, log prior per image)."""
        x, logdet = preprocess(self.cfg, y_BHWC)
        log_prior = jnp.zeros(y_BHWC.shape[0])
        latents = []
        for level in range(self.cfg.levels):
            x = squeeze(x)
            for step in self.level_steps(level):
                x, step_logdet = step(x)
                logdet = logdet + step_logdet
            if level < self.cfg.levels - 1:
                x, z = jnp.split(x, 2, axis=-1)
                mean, log_std = self.priors[level](x)
                log_prior = log_prior + gaussian_log_prob(z, mean, log_std)
                latents.append(z)
        latents.append(x)
        log_prior = log_prior + gaussian_log_prob(x, 0.0, 0.0)
        return latents, logdet, log_prior

    def __call__(self, y_BHWC):
        return self.forward(y_BHWC)

    def inverse(self, latents, rng=None, temperature: float = 1.0):
        """Latents -> y. With `rng`, factored-out latents given as None are drawn from their
        priors at `temperature` (sampling); otherwise every level's latent must be given."""
        x = latents[-1]
        for level in reversed(range(self.cfg.levels)):
            if level < self.cfg.levels - 1:
                z = latents[level]
                if z is None:
                    mean, log_std = self.priors[level](x)
                    noise = jax.random.normal(jax.random.fold_in(rng, level), mean.shape)
                    z = mean + temperature * jnp.exp(log_std) * noise
                x = jnp.concatenate([x, z], axis=-1)
            for step in reversed(self.level_steps(level)):
                x, _ = step(x, reverse=True)
            x = unsqueeze(x)
        return postprocess(self.cfg, x)

    def latent_shapes(self, batch: int) -> list[tuple[int, ...]]:
        h, w, _ = self.cfg.image_shape
        shapes = []
        for level, channels in enumerate(self.cfg.level_channels()):
            h, w = h // 2, w // 2
            last = level == self.cfg.levels - 1
            shapes.append((batch, h, w, channels if last else channels // 2))
        return shapes

    def sample(self, rng, batch: int, temperature: float = 1.0):
        """y ~ the model at `temperature` (the latents' standard deviations scaled by it)."""
        top_rng, level_rng = jax.random.split(rng)
        shapes = self.latent_shapes(batch)
        top = temperature * jax.random.normal(top_rng, shapes[-1])
        return self.inverse([None] * (len(shapes) - 1) + [top], level_rng, temperature)


def bits_per_dim(log_density, num_dims: int):
    """Bits per dimension of 8-bit data from the log density of y = (x + u)/256 on [0, 1)^D."""
    return (-log_density + num_dims * math.log(256)) / (num_dims * math.log(2))


def dequantize(rng, images_BHWC):
    """y = (x + u) / 256 with u ~ U[0, 1): the noise is jax.random.uniform(rng, images.shape)."""
    noise = jax.random.uniform(rng, images_BHWC.shape)
    return (images_BHWC.astype(jnp.float32) + noise) / 256.0


def quantize(y_BHWC):
    """A continuous sample in [0, 1) back to 8-bit pixels."""
    return jnp.clip(jnp.floor(y_BHWC * 256.0), 0, 255).astype(jnp.uint8)


class FlowTask:
    """Glow on 8-bit images; the loss is -log P(x) in nats per image (dequantisation bound)."""
    name = "flow"

    def __init__(self, cfg: FlowConfig, init_images=None):
        """`init_images` (uint8 [N, H, W, C], a fixed batch of training images): actnorm's
        data-dependent initialisation runs on it; required when cfg.data_init is True."""
        if cfg.data_init and init_images is None:
            raise ValueError("flow.data_init needs init_images (a fixed batch of training "
                             "images); pass them, or set flow.data_init=False")
        if init_images is not None and tuple(init_images.shape[1:]) != cfg.image_shape:
            raise ValueError(f"init_images have shape {tuple(init_images.shape[1:])}, the flow "
                             f"expects {cfg.image_shape}")
        self.cfg = cfg
        self.model = Glow(cfg)
        self.init_images = init_images

    def init_params(self, rng):
        images = (self.init_images if self.init_images is not None
                  else jnp.zeros((1, *self.cfg.image_shape), jnp.uint8))
        noise_rng, param_rng = jax.random.split(rng)
        return self.model.init({"params": param_rng},
                               dequantize(noise_rng, jnp.asarray(images)))["params"]

    def log_density(self, params, y_BHWC):
        """log p(y) per image, y continuous in [0, 1)^D."""
        _, logdet, log_prior = self.model.apply({"params": params}, y_BHWC)
        return log_prior + logdet

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        images = batch["image"]
        if tuple(images.shape[1:]) != self.cfg.image_shape:
            raise ValueError(f"batch images have shape {tuple(images.shape[1:])}, the flow "
                             f"was built for {self.cfg.image_shape}")
        mask_B = batch["mask"].astype(jnp.float32)
        nll_B = (-self.log_density(params, dequantize(rng, images))
                 + self.cfg.num_dims * math.log(256))
        return LossSums(loss=jnp.sum(nll_B * mask_B), weight=jnp.sum(mask_B), extra={})

    def sample(self, params, rng, batch: int, temperature: float = 1.0):
        """uint8 images [batch, H, W, C] drawn at `temperature`."""
        y = self.model.apply({"params": params}, rng, batch, temperature, method=Glow.sample)
        return quantize(y)

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        images = max(totals["weight"], 1.0)
        nats = totals["loss"] / images
        bpd = nats / (self.cfg.num_dims * math.log(2))
        return {"loss": nats, "nats_per_image": nats, "bits_per_dim": bpd,
                "images": totals["weight"]}

    def batch_fields(self):
        return {"image": BatchField(self.cfg.image_shape, jnp.uint8, ("batch", None, None, None)),
                "label": BatchField((), jnp.int32, ("batch",)),
                "mask": BatchField((), jnp.int32, ("batch",))}

    def train_flops_per_example(self) -> float:
        """3x the forward multiply-adds (x2) of the coupling nets, the rest being negligible."""
        cfg, (h, w, _) = self.cfg, self.cfg.image_shape
        total = 0.0
        for channels in cfg.level_channels():
            h, w = h // 2, w // 2
            half = channels // 2
            per_pixel = 9 * half * cfg.width + cfg.width ** 2 + 9 * cfg.width * channels
            per_pixel += channels ** 2  # the 1x1 convolution
            total += cfg.steps * h * w * per_pixel
        return 3 * 2 * total

    def units_per_example(self):
        return "images", 1


def flow_config(**overrides):
    """The `flow` section of a run config."""
    import ml_collections
    section = ml_collections.ConfigDict({
        "levels": 2, "steps": 4, "width": 64, "invconv": "lu", "preprocess": "logit",
        "logit_alpha": 0.05, "data_init": True, "init_examples": 512,
        "sample_temperature": 0.7})
    section.update(overrides)
    return section


def build_task(config, info) -> FlowTask:
    """config.flow -> FlowTask for images shaped info.image_shape. The actnorm init batch is the
    first `flow.init_examples` images of the training split (vision.pipeline.load_split)."""
    section = config.flow
    cfg = FlowConfig(image_shape=tuple(info.image_shape), levels=section.levels,
                     steps=section.steps, width=section.width, invconv=section.invconv,
                     preprocess=section.preprocess, logit_alpha=section.logit_alpha,
                     data_init=section.data_init)
    init_images = None
    if cfg.data_init:
        from vision.pipeline import load_split
        init_images = load_split(config, "train").images[:section.init_examples]
    return FlowTask(cfg, init_images)
