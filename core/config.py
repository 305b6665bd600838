"""Python config files (ml_collections), selected as `path.py:arg` and overridden as `--config.a.b=v`.

A config file defines `get_config(arg: str) -> ConfigDict`; `arg` is everything after the colon,
usually `key=value,key=value` pairs read with `parse_arg`. Overrides are type-checked against the
existing field, and an unknown key is an error naming the closest valid one, so a typo can never
silently train the wrong model.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
import re
from typing import Any, Iterable, Sequence

import ml_collections


class UserError(Exception):
    """A mistake the user can fix: every command prints it as one line `error: ...` and exits 2
    (core/cli.py); anything else is a bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A config that cannot be what the user meant."""


class DataError(UserError, ValueError):
    """A data problem the user can fix (missing file, unknown corpus, empty split, ...)."""


def check_choice(name: str, value: Any, choices: Iterable, error: type[ValueError] = ConfigError,
                 hint: str = "") -> None:
    """Raises `error` when `value` is not one of `choices` (a mapping: its keys), naming the valid
    ones (sorted unless given as a sequence), then `hint`, then the closest match."""
    if value in choices:
        return
    valid = list(choices) if isinstance(choices, (list, tuple)) else sorted(choices)
    near = _did_you_mean(str(value), [str(v) for v in valid], cutoff=0.6)
    raise error(f"{name} {value!r} is not one of {valid}{hint}{near}")


_RANGE = re.compile(r"^([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])$|^(>=|>|<=|<)\s*(\S+)$")


def in_range(value: float, rule: str) -> bool:
    """Whether `value` satisfies `rule`: an interval like "[0, 1)" or "(0, inf)", or a bound
    like "> 0" or ">= 1"."""
    match = _RANGE.match(rule.strip())
    if not match:
        raise ValueError(f"range rule {rule!r} is neither an interval nor a bound")
    if match.group(5):
        bound = float(match.group(6))
        return {">": value > bound, ">=": value >= bound,
                "<": value < bound, "<=": value <= bound}[match.group(5)]
    low, high = float(match.group(2)), float(match.group(3))
    above = value >= low if match.group(1) == "[" else value > low
    below = value <= high if match.group(4) == "]" else value < high
    return above and below


def check_ranges(section: str, cfg: ml_collections.ConfigDict, ranges: dict[str, str]) -> None:
    """Refuses any number of `cfg` outside its rule (see `in_range`), naming `section.key`; keys
    the section does not have are skipped (config files differ in what they carry)."""
    for key, rule in ranges.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{section}.{key} must be a number in {rule}, got {value!r}")
        if not in_range(value, rule):
            within = f"in {rule}" if rule.strip()[0] in "[(" else rule
            raise ConfigError(f"{section}.{key} must be {within}, got {value!r}; change it with "
                              f"--config.{section}.{key}=...")


def parse_arg(arg: str, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `key=value,key=value` against typed defaults; unknown keys are errors."""
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    for item in arg.split(","):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not key=value (in {arg!r})")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in defaults:
            raise ConfigError(_unknown_key_message(key, list(defaults), "config argument"))
        result[key] = _coerce(value, defaults[key], key)
    return result


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted leaf path of a config, e.g. `train.steps`."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(all_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def _did_you_mean(text: str, valid: Sequence[str], cutoff: float) -> str:
    """The suffix naming the closest of `valid` (similarity >= cutoff), or an empty string."""
    close = difflib.get_close_matches(text, valid, n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key_message(key: str, valid: Sequence[str], what: str) -> str:
    return f"unknown {what} {key!r}{_did_you_mean(key, valid, cutoff=0.0)}"


def _coerce(text: str, current: Any, key: str) -> Any:
    """Turns override text into the type of the field it replaces."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {text!r}")
    if isinstance(current, str):
        return text
    if current is None:  # an unset field (e.g. model.d_ff): a Python literal, else the text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{key}: cannot read {text!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, type(current)):
        raise ConfigError(
            f"{key}: expected {type(current).__name__} like {current!r}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
    """Applies `a.b=value` (or `--config.a.b=value`) strings in order."""
    valid = all_keys(config)
    for override in overrides:
        text = override[len("--config."):] if override.startswith("--config.") else override
        if "=" not in text:
            raise ConfigError(f"override {override!r} is not --config.key=value")
        key, value = text.split("=", 1)
        if key not in valid:
            raise ConfigError(_unknown_key_message(key, valid, "config key"))
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = _coerce(value, node[leaf], key)
    return config


def load_run_config(workdir: str | pathlib.Path,
                    overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """The config a run was trained with (its workdir's config.json), overrides applied, locked.

    The run may have been launched as several processes; what reads it runs as one unless told
    otherwise with --config.distributed.*."""
    import json
    saved = pathlib.Path(workdir) / "config.json"
    if not saved.exists():
        raise ConfigError(f"{saved} does not exist: pass --config, or a --workdir of a run")
    config = ml_collections.ConfigDict(json.loads(saved.read_text()))
    config.distributed = distributed_config()
    apply_overrides(config, overrides)
    config.lock()
    return config


def distributed_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "enabled": False,            # call jax.distributed.initialize() at start
        "coordinator_address": "",   # "" = from the environment (SLURM, TPU metadata, ...)
        "coordinator_port": 0,       # SLURM: 0 = derived from SLURM_JOB_ID (as jax does)
        "num_processes": 0,          # 0 = from the environment
        "process_id": -1,            # -1 = from the environment
        "local_device_count": 0,     # CPU only: simulated devices per process (tests)
        "log_all_processes": False,  # False: processes other than 0 log warnings and errors only
    })


def load_config_module(spec: str):
    """(the module of `path/to/file.py[:arg]`, its path, arg): config files are not packages."""
    path_text, _, arg = spec.partition(":")
    path = pathlib.Path(path_text)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, path, arg


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]`, applies overrides and locks the result against new keys."""
    module, path, arg = load_config_module(spec)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg)
    apply_overrides(config, overrides)
    config.lock()
    return config

