"""A small U-Net that predicts noise (or v) from a noisy image, its timestep and optional label.

The DDPM architecture (Ho et al. 2020) at small scale: a sinusoidal timestep embedding through an
MLP, ResNet blocks with GroupNorm whose activations are shifted by the time (and class)
embedding, self-attention at the lowest resolution, strided-conv downsampling and nearest-neighbour
upsampling with skip connections. With `num_classes > 0` a class embedding is added to the time
embedding; its row `num_classes` is the *null class* that classifier-free guidance trains with
(label dropout) and samples the unconditional model from.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)   # one resolution level per entry
    num_res_blocks: int = 1                       # per level, on the way down (up has one more)
    attention_heads: int = 4                      # at the lowest resolution only
    groups: int = 8                               # GroupNorm groups
    num_classes: int = 0                          # 0: unconditional; else + 1 null class
    dropout: float = 0.0
    out_channels: int = 1


def _conv(features, kernel=3, strides=1, name=None, zero=False):
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                   kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                   name=name)


def _dense(features, name=None, axes=("embed", "mlp")):
    return nn.Dense(features,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                    name=name)


def _group_norm(groups, channels, name=None):
    return nn.GroupNorm(num_groups=math.gcd(groups, channels),
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        name=name)


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """[B] integer or float timesteps -> [B, dim] sin/cos features (Transformer positions)."""
    half = dim // 2
    freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_BF = t_B.astype(jnp.float32)[:, None] * freqs_F[None, :]
    return jnp.concatenate([jnp.sin(angles_BF), jnp.cos(angles_BF)], axis=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the conditioning embedding added in between (DDPM's block)."""
    channels: int
    groups: int
    dropout: float

    @nn.compact
    def __call__(self, x_BHWC, cond_BE, train: bool):
        h_BHWC = _conv(self.channels, name="conv1")(nn.silu(_group_norm(self.groups, x_BHWC.shape[-1], "norm1")(x_BHWC)))
        h_BHWC = h_BHWC + _dense(self.channels, "cond", ("embed", "conv_out"))(nn.silu(cond_BE))[:, None, None, :]
        h_BHWC = nn.silu(_group_norm(self.groups, self.channels, "norm2")(h_BHWC))
        h_BHWC = nn.Dropout(self.dropout, deterministic=not train)(h_BHWC)
        h_BHWC = _conv(self.channels, name="conv2", zero=True)(h_BHWC)
        if x_BHWC.shape[-1] != self.channels:
            x_BHWC = _conv(self.channels, kernel=1, name="skip")(x_BHWC)
        return x_BHWC + h_BHWC


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual (DDPM uses it at 16x16)."""
    heads: int
    groups: int

    @nn.compact
    def __call__(self, x_BHWC):
        batch, height, width, channels = x_BHWC.shape
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into {self.heads} attention heads")
        h_BLC = _group_norm(self.groups, channels, "norm")(x_BHWC).reshape(batch, height * width, channels)
        split = lambda y_BLC: y_BLC.reshape(batch, height * width, self.heads, -1)  # noqa: E731
        q_BLNH, k_BLNH, v_BLNH = (split(_dense(channels, name, ("embed", "mlp"))(h_BLC))
                                  for name in ("query", "key", "value"))
        out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLNH, v_BLNH)
        out_BLC = nn.Dense(channels, name="out",
                           kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "embed")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
            out_BLNH.reshape(batch, height * width, channels))
        return x_BHWC + out_BLC.reshape(batch, height, width, channels)


class UNet(nn.Module):
    config: UNetConfig

    @nn.compact
    def __call__(self, x_BHWC, t_B, label_B=None, train: bool = False):
        cfg = self.config
        embed_dim = 4 * cfg.base_channels
        cond_BE = timestep_embedding(t_B, cfg.base_channels)
        cond_BE = _dense(embed_dim, "time_mlp1")(cond_BE)
        cond_BE = _dense(embed_dim, "time_mlp2", ("mlp", "embed"))(nn.silu(cond_BE))
        if cfg.num_classes:
            if label_B is None:
                raise ValueError("this U-Net is class-conditional (num_classes > 0): pass labels, "
                                 f"or the null class {cfg.num_classes} for the unconditional model")
            table = nn.Embed(cfg.num_classes + 1, embed_dim, name="class_embed",
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(0.02), ("classes", "embed")))
            cond_BE = cond_BE + table(label_B)

        h_BHWC = _conv(cfg.base_channels, name="stem")(x_BHWC)
        skips = [h_BHWC]
        levels = len(cfg.channel_mults)
        for level, mult in enumerate(cfg.channel_mults):
            for block in range(cfg.num_res_blocks):
                h_BHWC = ResBlock(cfg.base_channels * mult, cfg.groups, cfg.dropout,
                                  name=f"down{level}_{block}")(h_BHWC, cond_BE, train)
                skips.append(h_BHWC)
            if level < levels - 1:
                h_BHWC = _conv(h_BHWC.shape[-1], strides=2, name=f"downsample{level}")(h_BHWC)
                skips.append(h_BHWC)

        channels = cfg.base_channels * cfg.channel_mults[-1]
        h_BHWC = ResBlock(channels, cfg.groups, cfg.dropout, name="mid1")(h_BHWC, cond_BE, train)
        h_BHWC = SelfAttention(cfg.attention_heads, cfg.groups, name="mid_attention")(h_BHWC)
        h_BHWC = ResBlock(channels, cfg.groups, cfg.dropout, name="mid2")(h_BHWC, cond_BE, train)

        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for block in range(cfg.num_res_blocks + 1):
                h_BHWC = jnp.concatenate([h_BHWC, skips.pop()], axis=-1)
                h_BHWC = ResBlock(cfg.base_channels * mult, cfg.groups, cfg.dropout,
                                  name=f"up{level}_{block}")(h_BHWC, cond_BE, train)
            if level > 0:
                target = skips[-1].shape[1:3]
                h_BHWC = jax.image.resize(h_BHWC, (h_BHWC.shape[0], *target, h_BHWC.shape[-1]),
                                          "nearest")
                h_BHWC = _conv(h_BHWC.shape[-1], name=f"upsample{level}")(h_BHWC)

        h_BHWC = nn.silu(_group_norm(cfg.groups, h_BHWC.shape[-1], "out_norm")(h_BHWC))
        return _conv(cfg.out_channels, name="out", zero=True)(h_BHWC)


def check_image_size(height: int, width: int, levels: int) -> None:
    """Each downsampling halves (rounding up); skips must line up on the way back."""
    if min(height, width) < 2 ** (levels - 1):
        raise ValueError(f"a {height}x{width} image is too small for {levels} U-Net levels; "
                         "use fewer channel_mults")

