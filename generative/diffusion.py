"""Denoising diffusion (DDPM, Ho et al. 2020) as a task: noise schedules, the training loss, and
the conversions between what the network predicts (noise eps, or v) and the clean image.

Images are scaled to [-1, 1] (x/127.5 - 1), the range the DDPM schedules are designed for, not
standardised by the dataset's mean and std. Timesteps are indices 0..T-1; index t uses beta[t],
so alpha_bar[t] = prod_{s<=t} (1 - beta[s]) and index 0 is the least noisy step.

v-prediction (Salimans & Ho 2022): v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, from which
x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v and eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core.config import ConfigError, check_choice
from core.flops import xla_flops
from core.task import BatchField, LossSums
from generative import unet as unet_lib

PREDICTIONS = ("eps", "v")
SCHEDULES = ("linear", "cosine")


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s schedule, written for T = 1000 (scaled so other T keep its endpoints' SNR)."""
    scale = 1000.0 / timesteps
    return np.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021: alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2."""
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep constants as float32 arrays [T] (computed in float64)."""
    betas: jax.Array
    alpha_bars: jax.Array        # prod_{s<=t} (1 - beta_s)
    alpha_bars_prev: jax.Array   # alpha_bar[t-1], with alpha_bar[-1] = 1

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(name: str, timesteps: int) -> Schedule:
    check_choice("diffusion.schedule", name, SCHEDULES)
    if timesteps < 2:
        raise ConfigError(f"diffusion.timesteps must be at least 2, got {timesteps}")
    betas = linear_betas(timesteps) if name == "linear" else cosine_betas(timesteps)
    alpha_bars = np.cumprod(1.0 - betas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Schedule(as32(betas), as32(alpha_bars), as32(alpha_bars_prev))


def _per_row(values_B, x_BHWC):
    return values_B.reshape((-1,) + (1,) * (x_BHWC.ndim - 1))


def q_sample(schedule: Schedule, x0_BHWC, t_B, noise_BHWC):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps: the forward process in one jump."""
    alpha_bar = _per_row(schedule.alpha_bars[t_B], x0_BHWC)
    return jnp.sqrt(alpha_bar) * x0_BHWC + jnp.sqrt(1.0 - alpha_bar) * noise_BHWC


def v_target(schedule: Schedule, x0_BHWC, t_B, noise_BHWC):
    alpha_bar = _per_row(schedule.alpha_bars[t_B], x0_BHWC)
    return jnp.sqrt(alpha_bar) * noise_BHWC - jnp.sqrt(1.0 - alpha_bar) * x0_BHWC


def eps_and_x0(schedule: Schedule, prediction: str, output_BHWC, x_t_BHWC, t_B):
    """The network's output (eps or v) -> (predicted noise, predicted clean image)."""
    alpha_bar = _per_row(schedule.alpha_bars[t_B], x_t_BHWC)
    a, b = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if prediction == "eps":
        return output_BHWC, (x_t_BHWC - b * output_BHWC) / a
    return b * x_t_BHWC + a * output_BHWC, a * x_t_BHWC - b * output_BHWC


def images_to_unit(images_BHWC):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def unit_to_images(x_BHWC):
    """float [-1, 1] -> uint8 [0, 255], clipped and rounded."""
    return jnp.clip(jnp.round((x_BHWC + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def diffusion_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "schedule": "cosine",       # linear (1e-4..0.02) | cosine (s=0.008)
        "timesteps": 1000,
        "prediction": "eps",        # eps | v
        "conditional": True,        # class embedding + null class for classifier-free guidance
        "p_uncond": 0.1,            # label dropout to the null class while training
        "flip": False,              # random horizontal flips while training
        # UNetConfig's fields but num_classes and out_channels, which come from the data.
        "unet": {k: v for k, v in dataclasses.asdict(unet_lib.UNetConfig()).items()
                 if k not in ("num_classes", "out_channels")},
    })
    cfg.update(overrides)
    return cfg


class DiffusionTask:
    """Noise-prediction (or v-prediction) MSE at a uniformly drawn timestep, per image dimension."""
    name = "diffusion"

    def __init__(self, cfg: ml_collections.ConfigDict, image_shape, num_classes: int):
        check_choice("diffusion.prediction", cfg.prediction, PREDICTIONS)
        if not 0.0 <= cfg.p_uncond < 1.0:
            raise ConfigError(f"diffusion.p_uncond must be in [0, 1), got {cfg.p_uncond}")
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.schedule = make_schedule(cfg.schedule, cfg.timesteps)
        unet_fields = dict(cfg.unet)
        unet_fields["channel_mults"] = tuple(unet_fields["channel_mults"])
        unet_fields["num_classes"] = num_classes if cfg.conditional else 0
        unet_fields["out_channels"] = self.image_shape[-1]
        self.unet_cfg = unet_lib.UNetConfig(**unet_fields)
        unet_lib.check_image_size(*self.image_shape[:2], len(self.unet_cfg.channel_mults))
        self.model = unet_lib.UNet(self.unet_cfg)

    @property
    def null_class(self) -> int | None:
        return self.unet_cfg.num_classes if self.unet_cfg.num_classes else None

    def init_params(self, rng):
        x_BHWC = jnp.zeros((1, *self.image_shape), jnp.float32)
        label_B = jnp.zeros((1,), jnp.int32) if self.null_class is not None else None
        return self.model.init({"params": rng}, x_BHWC, jnp.zeros((1,), jnp.int32), label_B)["params"]

    def apply(self, params, x_t_BHWC, t_B, label_B=None, rng=None, train=False):
        """The raw network output (eps or v, per `diffusion.prediction`)."""
        return self.model.apply({"params": params}, x_t_BHWC, t_B, label_B, train=train,
                                rngs={"dropout": rng} if train and rng is not None else None)

    def predict(self, params, x_t_BHWC, t_B, label_B=None):
        """(eps, x0) predicted at x_t, whichever the network was trained to output."""
        output = self.apply(params, x_t_BHWC, t_B, label_B)
        return eps_and_x0(self.schedule, self.cfg.prediction, output, x_t_BHWC, t_B)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        x0_BHWC = images_to_unit(batch["image"])
        mask_B = batch["mask"].astype(jnp.float32)
        t_rng, noise_rng, drop_rng, flip_rng, dropout_rng = jax.random.split(rng, 5)
        batch_size = x0_BHWC.shape[0]
        if train and self.cfg.flip:
            flip_B = jax.random.bernoulli(flip_rng, 0.5, (batch_size,))
            x0_BHWC = jnp.where(_per_row(flip_B, x0_BHWC), x0_BHWC[:, :, ::-1], x0_BHWC)
        t_B = jax.random.randint(t_rng, (batch_size,), 0, self.schedule.timesteps)
        noise_BHWC = jax.random.normal(noise_rng, x0_BHWC.shape)
        x_t_BHWC = q_sample(self.schedule, x0_BHWC, t_B, noise_BHWC)
        label_B = None
        if self.null_class is not None:
            label_B = batch["label"]
            if train and self.cfg.p_uncond > 0:
                dropped_B = jax.random.bernoulli(drop_rng, self.cfg.p_uncond, (batch_size,))
                label_B = jnp.where(dropped_B, self.null_class, label_B)
        output_BHWC = self.apply(params, x_t_BHWC, t_B, label_B, dropout_rng, train)
        target_BHWC = noise_BHWC if self.cfg.prediction == "eps" else v_target(
            self.schedule, x0_BHWC, t_B, noise_BHWC)
        sq_err_B = jnp.sum(jnp.square(output_BHWC - target_BHWC), axis=(1, 2, 3))
        eps_BHWC, _ = eps_and_x0(self.schedule, self.cfg.prediction, output_BHWC, x_t_BHWC, t_B)
        eps_err_B = jnp.sum(jnp.square(eps_BHWC - noise_BHWC), axis=(1, 2, 3))
        dims = math.prod(self.image_shape)
        return LossSums(loss=jnp.sum(sq_err_B * mask_B), weight=jnp.sum(mask_B) * dims,
                        extra={"eps_mse": jnp.sum(eps_err_B * mask_B)})

    def batch_fields(self):
        return {"image": BatchField(self.image_shape, jnp.uint8, ("batch", None, None, None)),
                "label": BatchField((), jnp.int32, ("batch",)),
                "mask": BatchField((), jnp.int32, ("batch",))}

    @functools.cached_property
    def _forward_flops(self) -> float:
        params = jax.eval_shape(self.init_params, jax.random.key(0))
        x = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        label = t if self.null_class is not None else None
        return xla_flops(self.apply, params, x, t, label)

    def train_flops_per_example(self) -> float:
        """3x the forward pass (backward is about twice the forward), from XLA's cost analysis."""
        return 3.0 * self._forward_flops

    def units_per_example(self):
        return "images", 1

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Eval-set mean squared error per pixel of the training target, and of eps."""
        weight = max(totals["weight"], 1.0)
        return {"loss": totals["loss"] / weight, "eps_mse": totals["eps_mse"] / weight,
                "images": totals["weight"] / math.prod(self.image_shape)}


def build_task(config: ml_collections.ConfigDict, info) -> DiffusionTask:
    return DiffusionTask(config.diffusion, info.image_shape, info.num_classes)
