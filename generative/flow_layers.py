"""The invertible layers of a Glow/RealNVP flow: each maps x -> (y, log|det dy/dx| per image).

Every layer is a Flax module called as `layer(x_BHWC, reverse=False)`; `reverse=True` runs the
inverse and returns the inverse's log-determinant (the negative of the forward one). Layers act
on NHWC float32 arrays, and their log-determinants are summed over every pixel and channel, so
they are per-image vectors `[B]`.

Parameter logical names: the coupling nets' hidden convolutions use ("conv_in", "conv_out") like
any conv net; the per-channel parameters of the flow itself (actnorm, the 1x1 convolution, the
nets' output convolutions) have only a handful of channels and stay replicated (None).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import flax.linen as nn
import jax
import jax.numpy as jnp


def _param(module: nn.Module, name: str, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape)


def squeeze(x_BHWC: jax.Array) -> jax.Array:
    """Space-to-depth: each 2x2 patch becomes 4x the channels ([B, H/2, W/2, 4C])."""
    b, h, w, c = x_BHWC.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze needs even height and width, got {h}x{w}")
    x = x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x_BHWC: jax.Array) -> jax.Array:
    """Depth-to-space, the inverse of `squeeze`."""
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h, w, 2, 2, c // 4)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + bias) * exp(log_scale) (Glow section 3.1).

    Data-dependent initialisation: the first call under `init` sets bias and scale so that the
    init batch comes out with zero mean and unit variance per channel. Because the task's
    `init_params(rng)` runs the flow on a fixed batch of training images given at build time,
    initialisation stays a pure function of (rng, that batch). Without an init batch (`data_init`
    False) the layer starts as the identity."""
    data_init: bool = True

    @nn.compact
    def __call__(self, x_BHWC, reverse: bool = False):
        channels = x_BHWC.shape[-1]

        def init_bias(rng, shape):
            if not self.data_init:
                return jnp.zeros(shape)
            return -jnp.mean(x_BHWC, axis=(0, 1, 2))

        def init_log_scale(rng, shape):
            if not self.data_init:
                return jnp.zeros(shape)
            return -jnp.log(jnp.std(x_BHWC, axis=(0, 1, 2)) + 1e-6)

        bias_C = _param(self, "bias", init_bias, (channels,), (None,))
        log_scale_C = _param(self, "log_scale", init_log_scale, (channels,), (None,))
        pixels = x_BHWC.shape[1] * x_BHWC.shape[2]
        logdet = pixels * jnp.sum(log_scale_C) * jnp.ones(x_BHWC.shape[0])
        if reverse:
            return x_BHWC * jnp.exp(-log_scale_C) - bias_C, -logdet
        return (x_BHWC + bias_C) * jnp.exp(log_scale_C), logdet


def lu_init(channels: int, seed: int):
    """A random rotation split as W = P L (U + diag(sign * exp(log_s))) (Glow's LU form).

    P and the signs stay fixed for the run, so they are constants of the architecture, drawn
    from `seed` (numpy), rather than parameters the optimiser could move."""
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(channels, channels)))[0]
    p, lower, upper = scipy.linalg.lu(rotation)
    diag = np.diag(upper)
    return (p.astype(np.float32), lower.astype(np.float32), np.triu(upper, 1).astype(np.float32),
            np.sign(diag).astype(np.float32), np.log(np.abs(diag)).astype(np.float32))


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution y = W x at every pixel; log-det = H W log|det W|.

    kind "lu": W from its LU factors, so log|det W| = sum(log_s) costs O(C) (Glow).
    kind "plain": W itself, initialised as a random rotation, with log|det W| from slogdet."""
    kind: str = "lu"
    seed: int = 0

    def weight(self, channels: int):
        if self.kind == "plain":
            def init(rng, shape):
                return jnp.linalg.qr(jax.random.normal(rng, shape))[0]
            w_CC = _param(self, "kernel", init, (channels, channels), (None, None))
            return w_CC, jnp.linalg.slogdet(w_CC)[1]
        if self.kind != "lu":
            raise ValueError(f"invertible 1x1 conv kind {self.kind!r} is not 'lu' or 'plain'")
        p, lower, upper, sign, log_s = lu_init(channels, self.seed)
        lower_CC = _param(self, "lower", lambda r, s: jnp.asarray(lower), lower.shape, (None, None))
        upper_CC = _param(self, "upper", lambda r, s: jnp.asarray(upper), upper.shape, (None, None))
        log_s_C = _param(self, "log_s", lambda r, s: jnp.asarray(log_s), log_s.shape, (None,))
        eye = jnp.eye(channels)
        l_CC = jnp.tril(lower_CC, -1) + eye
        u_CC = jnp.triu(upper_CC, 1) + jnp.diag(sign * jnp.exp(log_s_C))
        return jnp.asarray(p) @ l_CC @ u_CC, jnp.sum(log_s_C)

    @nn.compact
    def __call__(self, x_BHWC, reverse: bool = False):
        w_CC, log_abs_det = self.weight(x_BHWC.shape[-1])
        pixels = x_BHWC.shape[1] * x_BHWC.shape[2]
        logdet = pixels * log_abs_det * jnp.ones(x_BHWC.shape[0])
        if reverse:
            return jnp.einsum("bhwc,dc->bhwd", x_BHWC, jnp.linalg.inv(w_CC)), -logdet
        return jnp.einsum("bhwc,dc->bhwd", x_BHWC, w_CC), logdet


class CouplingNet(nn.Module):
    """conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3 (so each coupling starts
    near the identity, Glow section 3.3)."""
    width: int
    out_channels: int

    @nn.compact
    def __call__(self, x_BHWC):
        hidden = dict(kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
        h = nn.relu(nn.Conv(self.width, (3, 3), name="conv_in", **hidden)(x_BHWC))
        h = nn.relu(nn.Conv(self.width, (1, 1), name="conv_mid", **hidden)(h))
        return nn.Conv(self.out_channels, (3, 3), name="conv_out",
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.zeros, (None, None, "conv_in", None)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(h)


class AffineCoupling(nn.Module):
    """The second half of the channels moves by an affine map computed from the first half:
    y_b = (x_b + shift(x_a)) * sigmoid(raw(x_a) + 2); log-det = sum log scale (Glow's form;
    the sigmoid keeps scales in (0, 1) and training stable)."""
    width: int

    @nn.compact
    def __call__(self, x_BHWC, reverse: bool = False):
        channels = x_BHWC.shape[-1]
        if channels % 2:
            raise ValueError(f"affine coupling needs an even channel count, got {channels}")
        x_a, x_b = jnp.split(x_BHWC, 2, axis=-1)
        out = CouplingNet(self.width, channels, name="net")(x_a)
        shift, raw = out[..., 0::2], out[..., 1::2]
        scale = jax.nn.sigmoid(raw + 2.0)
        logdet = jnp.sum(jnp.log(scale), axis=(1, 2, 3))
        if reverse:
            return jnp.concatenate([x_a, x_b / scale - shift], axis=-1), -logdet
        return jnp.concatenate([x_a, (x_b + shift) * scale], axis=-1), logdet


class FlowStep(nn.Module):
    """One Glow step: actnorm, invertible 1x1 convolution, affine coupling."""
    width: int
    invconv_kind: str = "lu"
    seed: int = 0
    data_init: bool = True

    def setup(self):
        self.actnorm = ActNorm(self.data_init)
        self.invconv = InvConv1x1(self.invconv_kind, self.seed)
        self.coupling = AffineCoupling(self.width)

    def __call__(self, x_BHWC, reverse: bool = False):
        layers = [self.actnorm, self.invconv, self.coupling]
        logdet = jnp.zeros(x_BHWC.shape[0])
        for layer in (reversed(layers) if reverse else layers):
            x_BHWC, layer_logdet = layer(x_BHWC, reverse)
            logdet = logdet + layer_logdet
        return x_BHWC, logdet


class SplitPrior(nn.Module):
    """The Gaussian of factored-out channels given the kept ones: a zero-initialised conv3x3
    gives their mean and log standard deviation, so it starts as N(0, I) (Glow's split prior)."""

    @nn.compact
    def __call__(self, kept_BHWC):
        out = nn.Conv(2 * kept_BHWC.shape[-1], (3, 3), name="conv",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.zeros, (None, None, "conv_in", None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(
                          kept_BHWC)
        return out[..., 0::2], out[..., 1::2]


def gaussian_log_prob(z, mean, log_std) -> jax.Array:
    """Per-image log density of z under N(mean, exp(log_std)^2), summed over H, W, C."""
    log_density = -0.5 * (jnp.log(2 * jnp.pi) + 2 * log_std + ((z - mean) * jnp.exp(-log_std)) ** 2)
    return jnp.sum(log_density, axis=tuple(range(1, z.ndim)))
