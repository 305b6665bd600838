"""The generalist: one decoder-only transformer over Gato's token sequences.

A token's input embedding is its id's row of the table (text, mu-law bins, discrete values, the
separator, the image placeholder), plus, as in the paper (section 2.2):
  - for an image patch: the patch's pixels through one residual block (GroupNorm, two 3x3
    convolutions, vision/resnet.py's block) and a linear map to the model width;
  - for a token of an observation (a patch, a value) or an action: a learned embedding of its
    place inside the step (`local`; -1 for text), so the model knows which value it is reading.
Everything after the embeddings is lm/models/transformer.py's decoder, with its KV cache, its
sharding rules and its logical axis names.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from lm.models import layers
from lm.models.transformer import Transformer, TransformerConfig
from vision.resnet import ResidualBlock, ResNetConfig


@dataclasses.dataclass(frozen=True)
class GatoConfig:
    decoder: TransformerConfig
    image_token: int          # the id whose positions carry a patch
    patch_side: int = 7       # square patches of this many pixels a side
    channels: int = 1
    patch_channels: int = 16  # width of the residual block inside a patch
    local_positions: int = 64 # places inside one step (observation values, patches, action)


class PatchEmbed(nn.Module):
    cfg: GatoConfig

    @nn.compact
    def __call__(self, patches_BTP: Array) -> Array:
        cfg, D = self.cfg, self.cfg.decoder.d_model
        B, T, _ = patches_BTP.shape
        side = cfg.patch_side
        x_NHWC = patches_BTP.reshape(B * T, side, side, cfg.channels)
        block = ResNetConfig(stage_sizes=(1,), norm="group", dtype=cfg.decoder.dtype)
        x_NHWC = ResidualBlock(block, cfg.patch_channels, 1, name="block")(x_NHWC, train=False)
        kernel = layers.logical_param(self, "proj", nn.initializers.lecun_normal(),
                                      (side * side * cfg.patch_channels, D), (None, "embed"),
                                      jnp.dtype(cfg.decoder.param_dtype))
        return (x_NHWC.reshape(B, T, -1) @ kernel.astype(x_NHWC.dtype))


class Gato(nn.Module):
    """(tokens [B, T], patches [B, T, side*side*channels], local [B, T]) -> logits [B, T, V]."""
    cfg: GatoConfig

    @nn.compact
    def __call__(self, tokens_BT: Array, patches_BTP: Array, local_BT: Array,
                 positions_BT: Array | None = None, segment_ids_BT: Array | None = None,
                 deterministic: bool = True, decode: bool = False,
                 logits_at_BK: Array | None = None) -> Array:
        cfg = self.cfg
        D = cfg.decoder.d_model
        is_patch_BT1 = (tokens_BT == cfg.image_token)[..., None]
        added_BTD = jnp.where(is_patch_BT1, PatchEmbed(cfg, name="patch_embed")(patches_BTP), 0)
        local_LD = layers.logical_param(self, "local_embed", nn.initializers.normal(0.02),
                                        (cfg.local_positions, D), (None, "embed"),
                                        jnp.dtype(cfg.decoder.param_dtype))
        local_BTD = jnp.take(local_LD, jnp.clip(local_BT, 0, cfg.local_positions - 1), axis=0)
        added_BTD = added_BTD + jnp.where((local_BT >= 0)[..., None], local_BTD, 0)
        return Transformer(cfg.decoder, name="decoder")(
            tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic, decode=decode,
            logits_at_BK=logits_at_BK, added_BTD=added_BTD)
