"""From a config's `model` section to an image model (ResNet or ViT, hybrids included).

The section holds `kind` plus the fields of that kind's config dataclass, so every field can be
overridden from the command line (`--config.model.width=64`); `num_classes` 0 and ViT's
`image_size` follow the dataset."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from core.config import ConfigError, check_choice
from core.flops import xla_flops
from vision import resnet, vit
from vision.data import DatasetInfo

KINDS = {"resnet": (resnet.ResNetConfig, resnet.ResNet, resnet.PRESETS),
         "vit": (vit.ViTConfig, vit.ViT, vit.PRESETS)}


def model_section(kind: str, preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A config's model section: every field of the preset, which overrides then replace."""
    check_choice("model kind", kind, KINDS)
    _, _, presets = KINDS[kind]
    if preset not in presets:
        raise ConfigError(f"unknown {kind} preset {preset!r}; expected one of {sorted(presets)}")
    fields = dataclasses.asdict(presets[preset])
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ConfigError(f"{kind} has no fields {sorted(unknown)}; it has {sorted(fields)}")
    fields.update(overrides)
    return ml_collections.ConfigDict({"kind": kind, **fields})


def model_config(section: ml_collections.ConfigDict, info: DatasetInfo):
    """The dataclass config of a model section, fitted to the dataset."""
    fields = section.to_dict()
    kind = fields.pop("kind")
    config_cls, _, _ = KINDS[kind]
    if not fields.get("num_classes"):
        fields["num_classes"] = info.num_classes
    if kind == "vit":
        fields["image_size"] = tuple(info.image_shape[:2])
        if fields.get("hybrid"):
            fields["hybrid"] = resnet.ResNetConfig(**fields["hybrid"])
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model ({kind}): {error}") from error


def build_model(section: ml_collections.ConfigDict, info: DatasetInfo) -> nn.Module:
    kind = section.kind
    return KINDS[kind][1](model_config(section, info))


def init_variables(model: nn.Module, info: DatasetInfo, rng: jax.Array) -> dict:
    """Every variable collection of the model ({"params", "batch_stats"?}); boxed params."""
    images = jnp.zeros((1, *info.image_shape), jnp.float32)
    return dict(model.init({"params": rng, "dropout": rng}, images, False))


def forward_flops(model: nn.Module, info: DatasetInfo) -> float:
    """FLOPs of one image's forward pass, as XLA counts them (a multiply-add is 2). XLA counts a
    scanned loop's body once, so layers are unrolled for the count."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "scan_layers", False):
        model = type(model)(dataclasses.replace(cfg, scan_layers=False))
    variables = jax.eval_shape(lambda r: init_variables(model, info, r), jax.random.key(0))
    images = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
    return xla_flops(lambda v, x: model.apply(nn.unbox(v), x, False), variables, images)
