"""ResNet (He et al. 2016) in Flax linen: basic and bottleneck blocks, BatchNorm or GroupNorm.

The bottleneck is v1.5 (torchvision's): the stride sits in the 3x3 conv, not the first 1x1.
Stage i has `width * 2**i` inner channels (times 4 at a bottleneck's output); the first block of
every stage but the first halves the resolution, and a 1x1 conv + norm projects the shortcut
whenever its shape changes (option B). Two stems: "imagenet" (7x7/2 conv, 3x3/2 max pool) and
"small" (3x3/1 conv, no pool) for 28x28 Fashion-MNIST or 8x8 digits.

    cfg = preset("resnet_fmnist")
    variables = init_variables(cfg, rng, (28, 28, 1))   # {"params", "batch_stats"}, boxed params
    logits_BK, updates = ResNet(cfg).apply(variables, images_BHWC, True, mutable=["batch_stats"])
    logits_BK = ResNet(cfg).apply(variables, images_BHWC, False)          # running statistics
    pooled_BD = ResNet(cfg).apply(variables, images_BHWC, False, features=True)
    fmap_BhwC = ResNet(cfg).apply(variables, images_BHWC, False, feature_map=True)  # hybrid ViT

Parameters (logical axis names):
  stem_conv/kernel (k, k, C, W)  (None, None, "conv_in", "conv_out");  stem_norm/{scale, bias}
  stage{i}_block{j}/conv{1,2[,3]}/kernel, norm{1,2[,3]}/{scale, bias}  ("conv_out",)
  stage{i}_block{j}/proj_conv/kernel, proj_norm/{scale, bias}        where the shortcut projects
  head/kernel (D, classes) ("embed", "classes"), head/bias ("classes",)
BatchNorm keeps running "mean"/"var" in the "batch_stats" collection (unboxed, small: replicated);
norm="group" (GroupNorm, as BiT and the hybrid ViT's stem) keeps none.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")
NORMS = ("batch", "group")
DTYPES = ("float32", "bfloat16", "float16")
BN_MOMENTUM = 0.9    # flax convention: running = momentum * running + (1 - momentum) * batch
NORM_EPS = 1e-5      # (PyTorch's BatchNorm2d(momentum=0.1, eps=1e-5))
GROUPS = 32          # GroupNorm groups (fewer where the channel count is not a multiple)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a ResNet. `width` is the first stage's (inner) channel count."""
    stage_sizes: tuple[int, ...]          # blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18
    block: str = "basic"                  # "basic" (two 3x3) | "bottleneck" (1x1, 3x3, 1x1 x4)
    width: int = 64
    num_classes: int = 1000
    stem: str = "imagenet"                # "imagenet" (7x7/2 + max pool /2) | "small" (3x3/1)
    norm: str = "batch"                   # "batch" (BatchNorm) | "group" (GroupNorm, stateless)
    zero_init_residual: bool = False      # last norm scale of each branch starts at 0 (Goyal+17)
    dtype: str = "float32"                # compute dtype; parameters stay float32

    def __post_init__(self):
        sizes = self.stage_sizes
        if isinstance(sizes, list):  # ml_collections hands back lists
            object.__setattr__(self, "stage_sizes", tuple(sizes))
            sizes = self.stage_sizes
        if (not isinstance(sizes, tuple) or not sizes
                or not all(isinstance(n, int) and n > 0 for n in sizes)):
            raise ValueError(f"stage_sizes={sizes!r}: expected a non-empty tuple of positive "
                             "block counts, e.g. (2, 2, 2, 2)")
        for field, valid in (("block", BLOCKS), ("stem", STEMS), ("norm", NORMS),
                             ("dtype", DTYPES)):
            if getattr(self, field) not in valid:
                raise ValueError(f"{field}={getattr(self, field)!r}; expected one of {valid}")
        for field in ("width", "num_classes"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)!r}")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        """Channels of the last stage: the pooled feature width D."""
        return self.width * 2 ** (len(self.stage_sizes) - 1) * self.expansion

    @property
    def stride(self) -> int:
        """Total downsampling from the image to the last feature map."""
        return (4 if self.stem == "imagenet" else 1) * 2 ** (len(self.stage_sizes) - 1)


PRESETS: dict[str, ResNetConfig] = {
    # torchvision's resnet18/34/50/101 (v1.5): 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160.
    "resnet18": ResNetConfig((2, 2, 2, 2), "basic"),
    "resnet34": ResNetConfig((3, 4, 6, 3), "basic"),
    "resnet50": ResNetConfig((3, 4, 6, 3), "bottleneck"),
    "resnet101": ResNetConfig((3, 4, 23, 3), "bottleneck"),
    # Fashion-MNIST / digits: CIFAR-style (He et al. 2016 sec. 4.2: 3 stages, 3x3 stem, no pool)
    # at twice ResNet-20's width, 2 blocks a stage: 28x28 -> 14x14 -> 7x7 maps with 32/64/128
    # channels, 0.70 M params, 0.15 GFLOP per 28x28 image forward (XLA's count).
    "resnet_fmnist": ResNetConfig((2, 2, 2), "basic", width=32, num_classes=10, stem="small",
                                  zero_init_residual=True),
}


def preset(name: str, **overrides: Any) -> ResNetConfig:
    """A named preset with fields replaced, e.g. preset("resnet18", num_classes=10)."""
    if name not in PRESETS:
        raise ValueError(f"unknown ResNet preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# He et al. 2015 init as torchvision uses it: normal(0, sqrt(2 / fan_out)), untruncated.
_conv_init = nn.with_logical_partitioning(
    nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    (None, None, "conv_in", "conv_out"))


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """A bias-free conv with PyTorch's symmetric padding (k // 2 each side), so that strided
    convs on even sizes see the same pixels as torch's (SAME would pad 0 before, 1 after)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, dtype=dtype,
                   kernel_init=_conv_init, name=name)


def norm(cfg: ResNetConfig, train: bool, name: str, zero_scale: bool = False) -> nn.Module:
    """BatchNorm (batch statistics when training, running ones otherwise) or GroupNorm."""
    scale_init = nn.with_logical_partitioning(
        nn.initializers.zeros if zero_scale else nn.initializers.ones, ("conv_out",))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",))
    if cfg.norm == "group":
        return _GroupNorm(scale_init, bias_init, jnp.dtype(cfg.dtype), name=name)
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=NORM_EPS,
                        dtype=jnp.dtype(cfg.dtype), scale_init=scale_init, bias_init=bias_init,
                        name=name)


class _GroupNorm(nn.Module):
    """GroupNorm with gcd(32, C) groups: channel counts need not be multiples of 32."""
    scale_init: Any
    bias_init: Any
    dtype: Any

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        groups = math.gcd(GROUPS, x_BHWC.shape[-1])
        return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=self.dtype,
                            scale_init=self.scale_init, bias_init=self.bias_init,
                            name="group_norm")(x_BHWC)


class ResidualBlock(nn.Module):
    """relu(branch(x) + shortcut(x)); `channels` is the block's inner width."""
    cfg: ResNetConfig
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x_BHWC: Array, train: bool) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        last_zero = cfg.zero_init_residual
        if cfg.block == "basic":
            out_channels = self.channels
            y = conv(self.channels, 3, self.stride, dtype, "conv1")(x_BHWC)
            y = nn.relu(norm(cfg, train, "norm1")(y))
            y = conv(self.channels, 3, 1, dtype, "conv2")(y)
            y = norm(cfg, train, "norm2", last_zero)(y)
        else:  # v1.5 bottleneck: the stride is in the 3x3 conv
            out_channels = 4 * self.channels
            y = conv(self.channels, 1, 1, dtype, "conv1")(x_BHWC)
            y = nn.relu(norm(cfg, train, "norm1")(y))
            y = conv(self.channels, 3, self.stride, dtype, "conv2")(y)
            y = nn.relu(norm(cfg, train, "norm2")(y))
            y = conv(out_channels, 1, 1, dtype, "conv3")(y)
            y = norm(cfg, train, "norm3", last_zero)(y)
        shortcut = x_BHWC
        if self.stride != 1 or x_BHWC.shape[-1] != out_channels:
            shortcut = conv(out_channels, 1, self.stride, dtype, "proj_conv")(x_BHWC)
            shortcut = norm(cfg, train, "proj_norm")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """Images (B, H, W, C) float -> logits (B, classes) float32, pooled features (B, D), or
    (feature_map=True) the last stage's map (B, H/stride, W/stride, D) for a hybrid ViT."""
    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images_BHWC: Array, train: bool, features: bool = False,
                 feature_map: bool = False) -> Array:
        """train=True normalises with batch statistics and (BatchNorm) updates "batch_stats",
        which the caller must pass as mutable; train=False uses the running statistics."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if images_BHWC.ndim != 4:
            raise ValueError(f"ResNet expects images (B, H, W, C), got shape {images_BHWC.shape}")
        x = images_BHWC.astype(dtype)
        if cfg.stem == "imagenet":
            x = conv(cfg.width, 7, 2, dtype, "stem_conv")(x)
            x = nn.relu(norm(cfg, train, "stem_norm")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(cfg.width, 3, 1, dtype, "stem_conv")(x)
            x = nn.relu(norm(cfg, train, "stem_norm")(x))
        for i, blocks in enumerate(cfg.stage_sizes):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = ResidualBlock(cfg, cfg.width * 2 ** i, stride, name=f"stage{i}_block{j}")(
                    x, train)
        if feature_map:
            return x
        pooled_BD = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if features:
            return pooled_BD
        head = nn.Dense(cfg.num_classes, dtype=dtype, name="head",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), ("embed", "classes")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("classes",)))
        return head(pooled_BD.astype(dtype)).astype(jnp.float32)


def init_variables(cfg: ResNetConfig, rng: jax.Array, image_shape: tuple[int, int, int]) -> dict:
    """{"params": boxed params, "batch_stats": running mean/var ({} for norm="group")}."""
    images = jnp.zeros((1, *image_shape), jnp.float32)
    variables = dict(ResNet(cfg).init(rng, images, False))
    variables.setdefault("batch_stats", {})
    return variables


def param_shapes(cfg: ResNetConfig, image_shape: tuple[int, int, int] = (224, 224, 3)) -> dict:
    """Abstract variables (ShapeDtypeStructs) of a config, without allocating them."""
    return jax.eval_shape(lambda rng: init_variables(cfg, rng, image_shape), jax.random.key(0))


def num_params(cfg: ResNetConfig, image_shape: tuple[int, int, int] = (224, 224, 3)) -> int:
    """Trainable parameters (not the BatchNorm statistics)."""
    from lm.models.param_tree import count_params
    return count_params(param_shapes(cfg, image_shape)["params"])
