"""AdamW (or SGD with momentum) with linear warmup, cosine decay and global-norm clipping (optax).

Weight decay applies to weight matrices and embeddings only, never to biases or norm scales (the
GPT-2/LLaMA practice). It is decided by parameter name, not rank, because scanned layers stack
every vector into a matrix. `freeze` (a regular expression on '/'-joined parameter paths, e.g.
"^encoder/" to train only a classifier's head) zeroes those parameters' gradients before clipping
and their updates after weight decay, so frozen parameters never move.

`groups` gives parameter groups their own settings (a GAN's two networks, two-time-scale
learning rates): each group is {"match": regex on parameter paths, <any optim key>: value}; a
group's parameters get the base settings with its overrides, and their own gradient clipping.
Parameters no group matches keep the base settings. The logged learning rate is the base one.

`ema_decay` > 0 keeps an exponential moving average of the parameters in the optimiser state
(`ema_params(state.opt_state)`), checkpointed and sharded like everything else; samplers use it.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from core.config import ConfigError, check_choice, check_ranges


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
        "ema_decay": 0.0,          # > 0: keep an EMA of the parameters (ema_params)
        "groups": ml_collections.ConfigDict(),  # name -> {"match": regex, overrides...}
    })
    cfg.update(overrides)
    return cfg


# The numbers an optimiser setting may take (core.config.in_range rules).
RANGES = {"learning_rate": "> 0", "warmup_steps": ">= 0", "decay_steps": ">= 0",
          "min_lr_ratio": "[0, 1]", "b1": "[0, 1)", "b2": "[0, 1)", "eps": "> 0",
          "momentum": "[0, 1)", "weight_decay": ">= 0", "clip_norm": ">= 0",
          "ema_decay": "[0, 1)"}


def check_config(cfg: ml_collections.ConfigDict, total_steps: int) -> None:
    """Everything about the optim section that needs no parameters: names, ranges, the warmup
    against the decay horizon, regexes, and the same for every group's settings."""
    settings = [("optim", cfg)] + [(f"optim.groups.{name}", _group_settings(cfg, name, group))
                                   for name, group in cfg.get("groups", {}).items()]
    for section, each in settings:
        check_choice(f"{section}.name", each.name, ("adamw", "sgd"))
        check_ranges(section, each, RANGES)
        learning_rate_schedule(each, total_steps)
    if cfg.get("freeze"):
        _regex(cfg.freeze, "optim.freeze")
    for name, group in cfg.get("groups", {}).items():
        _regex(group["match"], f"optim.groups.{name}.match")


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


def _path_text(path) -> str:
    """A parameter's '/'-joined path, what `freeze` and group `match` regexes search."""
    return "/".join(_names(path))


def _regex(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"{key} {pattern!r} is not a regular expression: {error}")


def _decay_mask(params):
    def decays(path, _):
        names = _names(path)
        return _decays(names[-1], names[:-1])
    return jax.tree_util.tree_map_with_path(decays, params)


def frozen_mask(pattern: str):
    """params -> tree of bools: True where the '/'-joined path matches `pattern`."""
    regex = _regex(pattern, "optim.freeze")
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: bool(regex.search(_path_text(path))), params)


def _update_rule(cfg, total_steps: int) -> tuple[list, optax.Schedule]:
    """Clipping, then AdamW or SGD, for one set of settings."""
    if cfg.name not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name {cfg.name!r} is not supported; use 'adamw' or 'sgd'")
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(
            learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=_decay_mask))
    else:  # PyTorch's SGD: L2 added to the gradient, then (Nesterov) momentum
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    return parts, schedule


_NOT_PER_GROUP = ("groups", "freeze", "ema_decay")


def _group_settings(cfg, name: str, group) -> ml_collections.ConfigDict:
    """The base settings with the group's overrides; a key optim does not have is an error."""
    if "match" not in group:
        raise ConfigError(f"optim.groups.{name} needs a 'match' regex on parameter paths")
    settings = ml_collections.ConfigDict({k: v for k, v in cfg.items()
                                          if k not in _NOT_PER_GROUP})
    for key, value in group.items():
        if key == "match":
            continue
        if key not in settings:
            valid = sorted(settings.keys())
            raise ConfigError(f"optim.groups.{name}.{key} is not a per-group optim setting; "
                              f"valid: match, {', '.join(valid)}")
        settings[key] = value
    return settings


def group_labels(groups) -> Any:
    """params -> tree of group names ("" for the base settings). A parameter two groups match,
    or a group that matches no parameter (a mistyped regex), is an error."""
    patterns = {name: _regex(group["match"], f"optim.groups.{name}.match")
                for name, group in groups.items()}

    def labels(params):
        used = set()

        def label(path, _):
            text = _path_text(path)
            hits = [name for name, regex in patterns.items() if regex.search(text)]
            if len(hits) > 1:
                raise ConfigError(f"parameter {text} is in optim groups {hits}: make their "
                                  f"'match' regexes exclusive")
            used.update(hits)
            return hits[0] if hits else ""
        tree = jax.tree_util.tree_map_with_path(label, params)
        unused = sorted(set(patterns) - used)
        if unused:
            first_path = jax.tree_util.tree_leaves_with_path(params)[0][0]
            raise ConfigError(f"optim groups {unused} match no parameter; parameter paths look "
                              f"like {_path_text(first_path)!r}")
        return tree
    return labels


class EmaState(NamedTuple):
    count: jax.Array
    ema: Any


def ema_of_params(decay: float) -> optax.GradientTransformation:
    """Keeps, in the optimiser state, a float32 moving average of the parameters after each
    update: ema <- d * ema + (1 - d) * params with d = min(decay, (1 + n) / (10 + n)) at update
    n, so early averages are not dominated by the initialisation. Updates pass unchanged, so
    it goes last in the chain."""
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in (0, 1), got {decay}")

    def init(params):
        return EmaState(count=jnp.zeros((), jnp.int32),
                        ema=jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the parameter EMA needs the parameters: optimizer.update(g, s, params)")
        new_params = optax.apply_updates(params, updates)
        count = state.count.astype(jnp.float32)
        rate = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
        ema = jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p.astype(jnp.float32),
                                     state.ema, new_params)
        return updates, EmaState(count=state.count + 1, ema=ema)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state) -> Any | None:
    """The parameter EMA inside an optimiser state built with optim.ema_decay > 0, else None."""
    found = [node for node in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda node: isinstance(node, EmaState)) if isinstance(node, EmaState)]
    return found[0].ema if found else None


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    """Returns (optax transformation, schedule).

    Without groups or EMA the chain is [freeze, clip, rule, freeze] as it always was, so older
    checkpoints' optimiser states still restore."""
    parts, schedule = _update_rule(cfg, total_steps)
    groups = cfg.get("groups") or {}
    if groups:
        rules = {"": optax.chain(*parts)}
        for name, group in groups.items():
            rules[name] = optax.chain(*_update_rule(_group_settings(cfg, name, group),
                                                    total_steps)[0])
        parts = [optax.multi_transform(rules, group_labels(groups))]
    freeze = cfg.get("freeze", "")
    if freeze:
        # Zero the gradients before clipping, and the updates after weight decay, which moves
        # parameters even with zero gradients.
        mask = frozen_mask(freeze)
        parts = [optax.masked(optax.set_to_zero(), mask), *parts,
                 optax.masked(optax.set_to_zero(), mask)]
    if cfg.get("ema_decay", 0.0):
        parts.append(ema_of_params(cfg.ema_decay))
    return optax.chain(*parts), schedule
