"""Vision Transformer (Dosovitskiy et al. 2021) on the language models' transformer blocks.

Interface (stable; vision/ towers such as CLIP and captioning import it):

    cfg = preset("vit_fmnist")                      # or ViTConfig(...), preset("vit_b16")
    params = ViT(cfg).init(rng, images_BHWC, False)["params"]        # boxed, logical axes
    logits_BK = ViT(cfg).apply({"params": params}, images_BHWC, train)          # (B, classes)
    pooled_BD = ViT(cfg).apply({"params": params}, images_BHWC, train, features=True)
    tokens_BND = ViT(cfg).apply({"params": params}, images_BHWC, train, method="tokens")
    # == ViT(cfg).apply(..., images_BHWC, train, tokens=True): every token after the final norm,
    # N = cfg.num_tokens (the class token first when pool="cls", then the patches row-major).

`train` (positional) turns dropout on (a "dropout" rng is then needed when cfg.dropout > 0).
Images are float (B, H, W, C), already normalised, with (H, W) == cfg.image_size. A hybrid ViT
(cfg.hybrid, a ResNetConfig) runs that ResNet's stem and stages first and patchifies its feature
map (usually with patch=1); use norm="group" there (as the paper's BiT stem) to stay stateless, or
norm="batch" and pass "batch_stats" as with vision/resnet.py.

The encoder is lm/models/transformer.py's `run_blocks` with causal=False, pre-norm LayerNorm, exact GELU and
biases: the same attention and MLP code as the language models, scanned over layers. (XLA's
cost_analysis counts a scanned body once: count FLOPs with scan_layers=False.)

Parameters (logical axis names):
  hybrid/...                 vision/resnet.py's stem and stages                 hybrid only
  patch_embed/kernel (p, p, C, D) (None, None, "conv_in", "embed"), bias (D,) ("embed",)
  cls_token  (1, 1, D)       (None, None, "embed")                              pool="cls" only
  pos_embed  (N, D)          ("length", "embed"): one learned vector per grid cell (+ class)
  layers/... the blocks of lm/models/transformer.py (attn/w_q ... mlp/w_down, leading "layers" axis)
  final_norm/{scale, bias}   ("norm",)
  head/kernel (D, classes) ("embed", "classes"), head/bias ("classes",)    zero-initialised
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import layers
from lm.models.param_tree import count_params
from lm.models.transformer import TransformerConfig, run_blocks
from vision.resnet import ResNet, ResNetConfig

Array = jax.Array

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT. image_size is (H, W) (an int means square)."""
    image_size: tuple[int, int] = (224, 224)
    patch: int = 16
    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    pool: str = "cls"                     # "cls" (class token) | "mean" (average of the patches)
    norm_eps: float = 1e-6
    dropout: float = 0.0                  # on the embeddings and every residual branch
    init_std: float = 0.02                # block weights ~ N(0, init_std), as lm/models/transformer.py
    hybrid: ResNetConfig | None = None    # a CNN stem whose feature map is patchified
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"                   # as TransformerConfig.remat
    scan_layers: bool = True
    attention_impl: str = "xla"           # "xla" | "dot_product_attention" (cuDNN where there)

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"image_size={self.image_size!r}: expected (H, W) positive ints")
        object.__setattr__(self, "image_size", size)
        if isinstance(self.hybrid, dict):  # from an ml_collections config
            object.__setattr__(self, "hybrid", ResNetConfig(**self.hybrid))
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}; expected one of {POOLS}")
        for field in ("patch", "num_layers", "d_model", "num_heads", "mlp_dim", "num_classes"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}")
        stride = self.stem_stride * self.patch
        if size[0] % stride or size[1] % stride:
            stem = f" x the hybrid stem's stride {self.stem_stride}" if self.hybrid else ""
            raise ValueError(f"image_size={size} is not divisible by patch={self.patch}{stem}; "
                             f"pick a patch (or image size) that tiles the image exactly")
        self.transformer()  # validates dropout, dtype, remat, attention_impl, norm_eps

    @property
    def stem_stride(self) -> int:
        return self.hybrid.stride if self.hybrid is not None else 1

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along H and W."""
        stride = self.stem_stride * self.patch
        return self.image_size[0] // stride, self.image_size[1] // stride

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder sees (and `tokens` returns): the patches, plus the class token."""
        return self.num_patches + (self.pool == "cls")

    def transformer(self) -> TransformerConfig:
        """The encoder blocks as lm/models/transformer.py's config: bidirectional, pre-norm, exact GELU."""
        return TransformerConfig(
            vocab_size=0, num_layers=self.num_layers, d_model=self.d_model,
            num_heads=self.num_heads, d_ff=self.mlp_dim, max_len=self.num_tokens,
            pos_emb="learned", norm="layernorm", norm_eps=self.norm_eps, norm_position="pre",
            causal=False, mlp="gelu_exact", use_bias=True, dropout=self.dropout,
            init_std=self.init_std, dtype=self.dtype,
            param_dtype=self.param_dtype, remat=self.remat, scan_layers=self.scan_layers,
            attention_impl=self.attention_impl)


PRESETS: dict[str, ViTConfig] = {
    # ViT-B/16 at 224 (torchvision vit_b_16: 86,567,656 params).
    "vit_b16": ViTConfig(),
    "vit_s16": ViTConfig(num_layers=12, d_model=384, num_heads=6, mlp_dim=1536),
    "vit_l16": ViTConfig(num_layers=24, d_model=1024, num_heads=16, mlp_dim=4096),
    # R50+ViT-B/16 (the paper's hybrid): ResNet-50's stem and first 3 stages, stage 3 with 9
    # blocks, GroupNorm; 224 / 16 -> a 14x14 map patchified with patch 1.
    "vit_r50_b16": ViTConfig(patch=1, hybrid=ResNetConfig((3, 4, 9), "bottleneck",
                                                          norm="group")),
    # Fashion-MNIST: 4x4 patches on 28x28 -> 7x7 = 49 tokens, 6 layers of width 128 (1.2 M
    # params, 0.13 GFLOP forward), average pooling, which beats a class token on small data
    # (Beyer et al. 2022). Block weights start at N(0, 0.1), about Xavier's scale at this width:
    # GPT-2's 0.02 left the 4x96 model at 64% test accuracy after 300 Adam steps, against 76%.
    "vit_fmnist": ViTConfig(image_size=(28, 28), patch=4, num_layers=6, d_model=128,
                            num_heads=4, mlp_dim=512, num_classes=10, pool="mean",
                            dropout=0.1, init_std=0.1),
}


def preset(name: str, **overrides: Any) -> ViTConfig:
    """A named preset with fields replaced, e.g. preset("vit_fmnist", pool="cls")."""
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class ViT(nn.Module):
    """Images (B, H, W, C) -> logits (B, classes) float32, the pooled embedding (B, D) with
    features=True, or every token (B, N, D) with tokens=True (or method="tokens")."""
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images_BHWC: Array, train: bool, features: bool = False,
                 tokens: bool = False) -> Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if images_BHWC.ndim != 4 or tuple(images_BHWC.shape[1:3]) != cfg.image_size:
            raise ValueError(f"ViT expects images (B, {cfg.image_size[0]}, {cfg.image_size[1]}, "
                             f"C) as cfg.image_size says, got shape {images_BHWC.shape}")
        x = images_BHWC.astype(dtype)
        if cfg.hybrid is not None:
            x = ResNet(cfg.hybrid, name="hybrid")(x, train, feature_map=True)
        D = cfg.d_model
        x_BhwD = nn.Conv(
            D, (cfg.patch, cfg.patch), strides=(cfg.patch, cfg.patch), padding="VALID",
            dtype=dtype, param_dtype=pdtype, name="patch_embed",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None, "conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)
        B = x_BhwD.shape[0]
        x_BTD = x_BhwD.reshape(B, -1, D)
        if cfg.pool == "cls":
            cls_11D = layers.logical_param(self, "cls_token", nn.initializers.zeros, (1, 1, D),
                                           (None, None, "embed"), pdtype)
            x_BTD = jnp.concatenate([jnp.broadcast_to(cls_11D.astype(dtype), (B, 1, D)), x_BTD],
                                    axis=1)
        T = x_BTD.shape[1]
        pos_TD = layers.logical_param(self, "pos_embed", nn.initializers.normal(0.02), (T, D),
                                      ("length", "embed"), pdtype)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD + pos_TD.astype(dtype), deterministic=not train)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

        tcfg = cfg.transformer()
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = run_blocks(tcfg, x_BTD, positions_BT, None, deterministic=not train,
                           decode=False)
        x_BTD = layers.Norm("layernorm", cfg.norm_eps, True, dtype, pdtype,
                            name="final_norm")(x_BTD)
        if tokens:
            return x_BTD
        pooled_BD = x_BTD[:, 0] if cfg.pool == "cls" else jnp.mean(x_BTD, axis=1)
        if features:
            return pooled_BD
        head = nn.Dense(cfg.num_classes, dtype=dtype, param_dtype=pdtype, name="head",
                        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ("embed", "classes")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("classes",)))
        return head(pooled_BD).astype(jnp.float32)

    def tokens(self, images_BHWC: Array, train: bool) -> Array:
        """(B, cfg.num_tokens, D): every token after the final norm (for CLIP / captioning)."""
        return self(images_BHWC, train, tokens=True)


def init_params(cfg: ViTConfig, rng: jax.Array, channels: int = 3) -> dict:
    """Boxed params for images of cfg.image_size with `channels` channels."""
    images = jnp.zeros((1, *cfg.image_size, channels), jnp.float32)
    variables = ViT(cfg).init(rng, images, False)
    if set(variables) != {"params"}:
        raise ValueError(f"this ViT keeps state {sorted(set(variables) - {'params'})}: its hybrid "
                         "stem uses BatchNorm; init it with ViT(cfg).init(...) instead, or set "
                         "hybrid.norm='group'")
    return variables["params"]


def param_shapes(cfg: ViTConfig, channels: int = 3) -> dict:
    """Abstract variables (ShapeDtypeStructs) of a config, without allocating them."""
    images = jax.ShapeDtypeStruct((1, *cfg.image_size, channels), jnp.float32)
    return jax.eval_shape(lambda rng, x: ViT(cfg).init(rng, x, False), jax.random.key(0), images)


def num_params(cfg: ViTConfig, channels: int = 3) -> int:
    return count_params(param_shapes(cfg, channels)["params"])
