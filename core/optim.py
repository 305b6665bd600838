"""AdamW (or SGD with momentum) with linear warmup, cosine decay and global-norm clipping (optax).

Weight decay applies to weight matrices and embeddings only, never to biases or norm scales (the
GPT-2/LLaMA practice). It is decided by parameter name, not rank, because scanned layers stack
every vector into a matrix. `freeze` (a regular expression on '/'-joined parameter paths, e.g.
"^encoder/" to train only a classifier's head) zeroes those parameters' gradients before clipping
and their updates after weight decay, so frozen parameters never move.
"""
from __future__ import annotations

import re

import jax
import ml_collections
import optax

from core.config import ConfigError


def optim_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "name": "adamw",           # "adamw" | "sgd" (momentum; weight decay added to the gradient)
        "learning_rate": 1e-3,
        "warmup_steps": 100,
        "decay_steps": 0,          # 0: decay over the whole run (train.steps)
        "min_lr_ratio": 0.1,       # cosine ends at learning_rate * min_lr_ratio
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "momentum": 0.9,           # sgd
        "nesterov": True,          # sgd
        "weight_decay": 0.1,
        "clip_norm": 1.0,          # 0 disables clipping
        "freeze": "",              # regex on parameter paths ("a/b/c") that stay fixed
    })
    cfg.update(overrides)
    return cfg


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    decay_steps = cfg.decay_steps or total_steps
    if cfg.warmup_steps >= decay_steps:
        raise ConfigError(
            f"optim.warmup_steps ({cfg.warmup_steps}) must be below the decay horizon "
            f"({decay_steps}); lower warmup_steps or raise train.steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


_NO_DECAY_NAMES = ("bias", "scale")


def _decays(name: str, parents: list[str]) -> bool:
    """Weight matrices and embeddings decay; biases (`bias`, `b_q`, ...), scales, norms do not."""
    is_bias = name in _NO_DECAY_NAMES or name.startswith("b_")
    return not is_bias and not any("norm" in n.lower() for n in parents + [name])


def _names(path) -> list[str]:
    # Dict keys only: a logically-boxed leaf adds a `.value` attribute to its path.
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _decay_mask(params):
    def decays(path, _):
        names = _names(path)
        return _decays(names[-1], names[:-1])
    return jax.tree_util.tree_map_with_path(decays, params)


def frozen_mask(pattern: str):
    """params -> tree of bools: True where the '/'-joined path matches `pattern`."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"optim.freeze {pattern!r} is not a regular expression: {error}")
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: bool(regex.search("/".join(_names(path)))), params)


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    """Returns (optax transformation, schedule)."""
    if cfg.name not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name {cfg.name!r} is not supported; use 'adamw' or 'sgd'")
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    freeze = cfg.get("freeze", "")
    if freeze:
        parts.append(optax.masked(optax.set_to_zero(), frozen_mask(freeze)))
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(
            learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=_decay_mask))
    else:  # PyTorch's SGD: L2 added to the gradient, then (Nesterov) momentum
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    if freeze:  # weight decay moves parameters even with zero gradients
        parts.append(optax.masked(optax.set_to_zero(), frozen_mask(freeze)))
    return optax.chain(*parts), schedule
