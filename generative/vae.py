"""A convolutional VAE (or plain autoencoder) on 8-bit images, as a task of the engine.

Likelihoods:
  "logistic":  8-bit pixels k in {0..255} scaled to x = 2k/255 - 1 in [-1, 1]; each pixel is a
               logistic(mean, scale) discretised into bins of width 2/255 centred on the 256
               values (edges x +- 1/255), the two edge bins reaching to -inf and +inf
               (PixelCNN++, Salimans et al. 2017, without the mixture). Probabilities of the 256
               values sum to one, so the loss is a true negative log-likelihood bound of 8-bit data.
  "bernoulli": for binarised images: a pixel is 1 where k/255 >= 0.5 (fixed threshold 128, not
               stochastic binarisation, so train and test see the same data every epoch).
               Numbers are then about the binarised images, not comparable with 8-bit ones.
kind "vae": Gaussian posterior N(mean, exp(log_var)), reparameterised, standard normal prior;
loss = reconstruction + beta * KL (beta-VAE; beta = 1 is the ELBO). kind "ae": deterministic
code, loss = reconstruction only. The loss is summed over real images, weight = number of images,
so the eval metric is the negative ELBO in nats per image (and bits/dim); `VAETask.log_weights`
gives the tighter importance-weighted bound at evaluation time.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from core.config import check_choice
from core.task import BatchField, LossSums

KINDS = ("vae", "ae")
LIKELIHOODS = ("logistic", "bernoulli")
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on the logistic's log scale


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    image_shape: tuple[int, int, int]
    kind: str = "vae"
    likelihood: str = "logistic"
    latent_dim: int = 32
    widths: tuple[int, int] = (32, 64)  # the two stride-2 conv stages
    hidden: int = 256                   # the dense layer between convs and code
    beta: float = 1.0

    def __post_init__(self):
        h, w, _ = self.image_shape
        if h % 4 or w % 4:
            raise ValueError(f"the VAE halves {h}x{w} images twice; height and width must be "
                             "multiples of 4 (pad or crop the images)")
        check_choice("vae.kind", self.kind, KINDS, ValueError)
        check_choice("vae.likelihood", self.likelihood, LIKELIHOODS, ValueError)
        if self.beta < 0:
            raise ValueError(f"vae.beta must be >= 0, got {self.beta}")

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)


def discretized_logistic_log_prob(images_BHWC, mean_BHWC, log_scale_BHWC):
    """log P(pixel = k) per pixel, for uint8 k, under a logistic discretised into 256 bins.

    Uses log(sigmoid(a) - sigmoid(b)) = log_sigmoid(a) + log_sigmoid(-b) + log(-expm1(b - a)),
    exact and stable in both tails."""
    x = images_BHWC.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    inv_scale = jnp.exp(-jnp.maximum(log_scale_BHWC, MIN_LOG_SCALE))
    upper = inv_scale * (x - mean_BHWC + 1.0 / 255.0)
    lower = inv_scale * (x - mean_BHWC - 1.0 / 255.0)
    middle = (jax.nn.log_sigmoid(upper) + jax.nn.log_sigmoid(-lower)
              + jnp.log(-jnp.expm1(lower - upper)))
    return jnp.where(images_BHWC == 0, jax.nn.log_sigmoid(upper),
                     jnp.where(images_BHWC == 255, jax.nn.log_sigmoid(-lower), middle))


def binarize(images_BHWC):
    """Fixed-threshold binarisation: 1 where k/255 >= 0.5."""
    return (images_BHWC >= 128).astype(jnp.float32)


def gaussian_kl(mean_BL, log_var_BL):
    """KL(N(mean, exp(log_var)) || N(0, I)) per image."""
    return 0.5 * jnp.sum(mean_BL ** 2 + jnp.exp(log_var_BL) - 1.0 - log_var_BL, axis=-1)


def diagonal_normal_log_prob(z_BL, mean_BL, log_var_BL):
    return -0.5 * jnp.sum(math.log(2 * math.pi) + log_var_BL
                          + (z_BL - mean_BL) ** 2 * jnp.exp(-log_var_BL), axis=-1)


def _conv_axes():
    return dict(kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def _dense(features: int, out_axis: str | None, name: str):
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("embed", out_axis)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)))


class Encoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, images_BHWC):
        x = images_BHWC.astype(jnp.float32) * (2.0 / 255.0) - 1.0
        for index, width in enumerate(self.cfg.widths):
            x = nn.relu(nn.Conv(width, (3, 3), strides=2, name=f"conv{index}", **_conv_axes())(x))
        x = nn.relu(_dense(self.cfg.hidden, "mlp", "hidden")(x.reshape(x.shape[0], -1)))
        code = 2 * self.cfg.latent_dim if self.cfg.kind == "vae" else self.cfg.latent_dim
        return _dense(code, None, "code")(x)


class Decoder(nn.Module):
    """z -> per-pixel likelihood parameters: (mean, log_scale) for "logistic", logits for
    "bernoulli"."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z_BL):
        h, w, c = self.cfg.image_shape
        first, second = self.cfg.widths
        x = nn.relu(_dense(self.cfg.hidden, "mlp", "hidden")(z_BL))
        x = nn.relu(_dense(h // 4 * w // 4 * second, "mlp", "expand")(x))
        x = x.reshape(-1, h // 4, w // 4, second)
        x = nn.relu(nn.ConvTranspose(first, (3, 3), strides=(2, 2), name="up0",
                                     **_conv_axes())(x))
        x = nn.relu(nn.ConvTranspose(first, (3, 3), strides=(2, 2), name="up1",
                                     **_conv_axes())(x))
        outputs = 2 * c if self.cfg.likelihood == "logistic" else c
        return nn.Conv(outputs, (3, 3), name="out", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)


class VAEModel(nn.Module):
    cfg: VAEConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, images_BHWC):
        """(mean, log_var) of q(z|x) for a VAE; (code, None) for an autoencoder."""
        out = self.encoder(images_BHWC)
        if self.cfg.kind == "ae":
            return out, None
        mean, log_var = jnp.split(out, 2, axis=-1)
        return mean, log_var

    def decode(self, z_BL):
        return self.decoder(z_BL)

    def __call__(self, images_BHWC):
        mean, _ = self.encode(images_BHWC)
        return self.decode(mean)


def reconstruction_log_prob(cfg: VAEConfig, images_BHWC, out_BHWC):
    """log p(x|z) per image from the decoder's output."""
    if cfg.likelihood == "bernoulli":
        per_pixel = -optax.sigmoid_binary_cross_entropy(out_BHWC, binarize(images_BHWC))
    else:
        mean, log_scale = out_BHWC[..., 0::2], out_BHWC[..., 1::2]
        per_pixel = discretized_logistic_log_prob(images_BHWC, mean, log_scale)
    return jnp.sum(per_pixel, axis=(1, 2, 3))


class VAETask:
    name = "vae"

    def __init__(self, cfg: VAEConfig):
        self.cfg = cfg
        self.model = VAEModel(cfg)

    def init_params(self, rng):
        images = jnp.zeros((1, *self.cfg.image_shape), jnp.uint8)
        return self.model.init({"params": rng}, images)["params"]

    def _check(self, images):
        if tuple(images.shape[1:]) != self.cfg.image_shape:
            raise ValueError(f"batch images have shape {tuple(images.shape[1:])}, the VAE was "
                             f"built for {self.cfg.image_shape}")

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        """Sums over real images of reconstruction + beta * KL (one posterior sample each)."""
        images, mask_B = batch["image"], batch["mask"].astype(jnp.float32)
        self._check(images)
        apply = self.model.apply
        mean, log_var = apply({"params": params}, images, method=VAEModel.encode)
        if self.cfg.kind == "ae":
            out = apply({"params": params}, mean, method=VAEModel.decode)
            recon_B = -reconstruction_log_prob(self.cfg, images, out)
            return LossSums(loss=jnp.sum(recon_B * mask_B), weight=jnp.sum(mask_B),
                            extra={"reconstruction": jnp.sum(recon_B * mask_B)})
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)
        out = apply({"params": params}, z, method=VAEModel.decode)
        recon_B = -reconstruction_log_prob(self.cfg, images, out)
        kl_B = gaussian_kl(mean, log_var)
        return LossSums(loss=jnp.sum((recon_B + self.cfg.beta * kl_B) * mask_B),
                        weight=jnp.sum(mask_B),
                        extra={"reconstruction": jnp.sum(recon_B * mask_B),
                               "kl": jnp.sum(kl_B * mask_B),
                               "neg_elbo": jnp.sum((recon_B + kl_B) * mask_B)})

    def log_weights(self, params, images, rng, num_samples: int):
        """log p(x, z_k) - log q(z_k | x) for K posterior samples: [K, B]. Their mean is an
        ELBO estimate, their log-mean-exp the IWAE bound."""
        if self.cfg.kind != "vae":
            raise ValueError("importance weights need a VAE (vae.kind='vae'), not an autoencoder")
        self._check(images)
        apply = self.model.apply
        mean, log_var = apply({"params": params}, images, method=VAEModel.encode)
        z_KBL = mean + jnp.exp(0.5 * log_var) * jax.random.normal(
            rng, (num_samples, *mean.shape))

        def one(z_BL):
            out = apply({"params": params}, z_BL, method=VAEModel.decode)
            return (reconstruction_log_prob(self.cfg, images, out)
                    + diagonal_normal_log_prob(z_BL, 0.0, jnp.zeros_like(z_BL))
                    - diagonal_normal_log_prob(z_BL, mean, log_var))
        return jax.lax.map(one, z_KBL)

    def sample(self, params, rng, batch: int, mode: str = "mean"):
        """uint8 images decoded from z ~ N(0, I): the likelihood's mean ("mean"), or a draw from
        it ("sample")."""
        z_rng, pixel_rng = jax.random.split(rng)
        z = jax.random.normal(z_rng, (batch, self.cfg.latent_dim))
        out = self.model.apply({"params": params}, z, method=VAEModel.decode)
        if self.cfg.likelihood == "bernoulli":
            probs = jax.nn.sigmoid(out)
            pixels = probs if mode == "mean" else jax.random.bernoulli(pixel_rng, probs)
            return (pixels * 255).round().astype(jnp.uint8)
        mean, log_scale = out[..., 0::2], out[..., 1::2]
        if mode == "sample":
            scale = jnp.exp(jnp.maximum(log_scale, MIN_LOG_SCALE))
            mean = mean + scale * jax.random.logistic(pixel_rng, mean.shape)
        elif mode != "mean":
            raise ValueError(f"sample mode {mode!r} is not 'mean' or 'sample'")
        return jnp.clip(jnp.round((mean + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def bits_per_dim(self, nats_per_image: float) -> float:
        return nats_per_image / (self.cfg.num_dims * math.log(2))

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        images = max(totals["weight"], 1.0)
        out = {"loss": totals["loss"] / images, "images": totals["weight"],
               "reconstruction": totals["reconstruction"] / images}
        if self.cfg.kind == "ae":
            out["reconstruction_bits_per_dim"] = self.bits_per_dim(out["reconstruction"])
            return out
        out["kl"] = totals["kl"] / images
        out["neg_elbo"] = totals["neg_elbo"] / images
        out["bits_per_dim"] = self.bits_per_dim(out["neg_elbo"])
        return out

    def batch_fields(self):
        return {"image": BatchField(self.cfg.image_shape, jnp.uint8, ("batch", None, None, None)),
                "label": BatchField((), jnp.int32, ("batch",)),
                "mask": BatchField((), jnp.int32, ("batch",))}

    def train_flops_per_example(self) -> float:
        """3x the forward multiply-adds (x2) of the convolutions and dense layers."""
        cfg, (h, w, c) = self.cfg, self.cfg.image_shape
        first, second = cfg.widths
        h2, w2, h4, w4 = h // 2, w // 2, h // 4, w // 4
        code = 2 * cfg.latent_dim if cfg.kind == "vae" else cfg.latent_dim
        outputs = 2 * c if cfg.likelihood == "logistic" else c
        macs = (h2 * w2 * 9 * c * first + h4 * w4 * 9 * first * second
                + h4 * w4 * second * cfg.hidden + cfg.hidden * code
                + cfg.latent_dim * cfg.hidden + cfg.hidden * h4 * w4 * second
                + h2 * w2 * 9 * second * first + h * w * 9 * first * first
                + h * w * 9 * first * outputs)
        return 3 * 2 * float(macs)

    def units_per_example(self):
        return "images", 1


def vae_config(**overrides):
    """The `vae` section of a run config."""
    import ml_collections
    section = ml_collections.ConfigDict({
        "kind": "vae", "likelihood": "logistic", "latent_dim": 32, "widths": (32, 64),
        "hidden": 256, "beta": 1.0})
    section.update(overrides)
    return section


def build_task(config, info) -> VAETask:
    section = config.vae
    return VAETask(VAEConfig(image_shape=tuple(info.image_shape), kind=section.kind,
                             likelihood=section.likelihood, latent_dim=section.latent_dim,
                             widths=tuple(section.widths), hidden=section.hidden,
                             beta=section.beta))
