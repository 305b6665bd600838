"""LoRA as a parameter transform: h = W x + s B A x on chosen kernels, with W frozen.

Our kernels store inputs first, (in..., out...), so an adapter is a pair A (in..., r) and
B (r, out...) whose product A B has the kernel's shape. A and B inherit the kernel's logical axis
names (the rank axis is replicated), so they shard like the kernel under any rules table.
A is initialised as PEFT does (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), +)) and B is
zero, so step 0 computes exactly the base model. s = alpha / r, or alpha / sqrt(r) (rsLoRA).

The model applies the adapters inside each layer: `layers.logical_param` adds A B to a kernel when
the "lora" variable collection holds an adapter of that name (with s folded into B). Under
nn.scan only one layer's adapted kernel exists at a time, gradients reach A and B only, and no
model code names LoRA beyond that one hook. `LoraModel` wraps a Transformer so that any task's
`model.apply({"params": LoraParams(...)}, ...)` runs the adapted model unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from core.config import ConfigError

# Matmul kernel name -> (input axes, output axes), after any stacked layer axis: how LoRA and
# quantisation (lm/weights/quantize.py) view a kernel as a matrix.
KERNEL_AXES = {"w_q": (1, 2), "w_k": (1, 2), "w_v": (1, 2), "w_o": (2, 1),
               "w_gate": (1, 1), "w_up": (1, 1), "w_down": (1, 1), "unembed": (1, 1)}
_ATTENTION = r"(^|/)(attn|cross_attn)/w_[qkvo]$"
PRESETS = {
    "qv": r"(^|/)attn/w_[qv]$",                                     # PEFT's default for LLaMA
    "attention": _ATTENTION,
    "all-linear": _ATTENTION + r"|(^|/)mlp/w_(gate|up|down)$",     # every linear but the head
}


def lora_config(**overrides) -> ml_collections.ConfigDict:
    """The `lora` section of an LM config; rank 0 trains the whole model (no adapters)."""
    cfg = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": "all-linear",
                                     "rslora": False,
                                     # the frozen base's storage: "" float, or a format of
                                     # lm/weights/quantize.py ("nf4_dq": QLoRA, "int8", ...)
                                     "base_format": ""})
    cfg.update(overrides)
    return cfg


RANGES = {"rank": ">= 0", "alpha": "> 0"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"      # a preset name or a regex on paths like "layers/attn/w_q"
    rslora: bool = False             # s = alpha / sqrt(rank) (Kalajdzievski 2023)
    base_format: str = ""            # "": a float base; "nf4_dq": QLoRA (lm/weights/quantize.py)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def pattern(self) -> str:
        return PRESETS.get(self.targets, self.targets)

    @classmethod
    def from_config(cls, section) -> "LoraConfig":
        cfg = cls(rank=int(section.rank), alpha=float(section.alpha), targets=str(section.targets),
                  rslora=bool(section.rslora), base_format=str(section.get("base_format", "")))
        try:
            re.compile(cfg.pattern)
        except re.error as error:
            raise ConfigError(f"lora.targets {cfg.targets!r} is neither a preset "
                              f"({', '.join(PRESETS)}) nor a valid regex ({error})") from None
        return cfg


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraParams:
    """What a LoRA run's model reads: the frozen base, the trainable adapters and their config
    (static: not an array)."""
    base: Any
    adapters: Any
    config: LoraConfig = dataclasses.field(metadata=dict(static=True), default=LoraConfig())

    def merged(self) -> dict:
        return merge(self.base, self.adapters, self.config)


def plain(params: Any) -> Any:
    """A plain params tree for code that builds its own model (decoding, export): LoRA params
    merged, anything else unchanged."""
    return params.merged() if isinstance(params, LoraParams) else params


def param_path(path) -> str:
    """A tree path as "layers/mlp/w_up" (dict keys, dataclass fields or indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _names(leaf) -> tuple:
    return tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()


def targets(base: Any, cfg: LoraConfig) -> dict[str, tuple]:
    """Path -> shape of every kernel the config adapts; an error if none matches."""
    found, seen = {}, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            base, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        name = param_path(path)
        seen.append(name)
        if re.search(cfg.pattern, name):
            found[name] = tuple(nn.unbox(leaf).shape)
    if not found:
        kernels = [n for n in seen if n.rsplit("/", 1)[-1].startswith("w_")][:6]
        raise ConfigError(f"lora.targets {cfg.targets!r} matches no parameter; presets are "
                          f"{', '.join(PRESETS)}, or a regex on paths such as "
                          f"{', '.join(kernels) or ', '.join(seen[:6])}")
    return found


def _split(name: str, shape: tuple) -> tuple[tuple, tuple, tuple]:
    """(layer dims, input dims, output dims) of a kernel's shape."""
    lead = shape[:1] if _is_stacked(name) else ()
    rest = shape[len(lead):]
    n_in = KERNEL_AXES.get(name.rsplit("/", 1)[-1], (1, 1))[0]
    return lead, rest[:n_in], rest[n_in:]


def init_adapters(rng: jax.Array, base: Any, cfg: LoraConfig) -> dict:
    """Adapters for `base` (boxed or plain, arrays or shapes), boxed with logical names: a nested
    dict mirroring the adapted kernels' paths, each holding {"a": A, "b": B}."""
    flat_base = {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(
        base, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
    adapters: dict = {}
    for index, (name, shape) in enumerate(sorted(targets(base, cfg).items())):
        lead, ins, outs = _split(name, shape)
        names = _names(flat_base[name]) or (None,) * len(shape)
        lead_names, in_names = names[:len(lead)], names[len(lead):len(lead) + len(ins)]
        out_names = names[len(lead) + len(ins):]
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = jax.random.uniform(jax.random.fold_in(rng, index), (*lead, *ins, cfg.rank),
                               jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, cfg.rank, *outs), jnp.float32)
        node = adapters
        for key in name.split("/")[:-1]:
            node = node.setdefault(key, {})
        node[name.rsplit("/", 1)[-1]] = {
            "a": nn.LogicallyPartitioned(a, (*lead_names, *in_names, None)),
            "b": nn.LogicallyPartitioned(b, (*lead_names, None, *out_names))}
    return adapters


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A B over the rank axis: A (in..., r), B (r, out...) -> (in..., out...)."""
    return jnp.tensordot(a, b, axes=([a.ndim - 1], [0]))


def _is_stacked(name: str) -> bool:
    """Kernels of scanned layers (params["layers"]) carry a leading layer axis."""
    return name.startswith("layers/")


def _map_adapted(fn, params: dict, adapters: dict) -> dict:
    """A copy of a plain params tree with fn(kernel, A B) at every adapted kernel."""
    def walk(node, adapter, prefix):
        node = dict(node)
        for key, sub in adapter.items():
            name = prefix + key
            if set(sub) == {"a", "b"}:
                product = (jax.vmap(delta) if _is_stacked(name) else delta)(sub["a"], sub["b"])
                node[key] = fn(node[key], product.astype(node[key].dtype))
            else:
                node[key] = walk(node[key], sub, name + "/")
        return node
    return walk(params, adapters, "")


def scaled(adapters: dict, cfg: LoraConfig) -> dict:
    """Adapters with s folded into B: what the "lora" collection holds (the model adds A B)."""
    def walk(node):
        if set(node) == {"a", "b"}:
            return {"a": node["a"], "b": node["b"] * cfg.scale}
        return {key: walk(sub) for key, sub in node.items()}
    return walk(adapters)


def merge(base: dict, adapters: dict, cfg: LoraConfig) -> dict:
    """W + s A B at every adapted kernel: a plain model for decoding, export or scoring. A
    quantised W (QLoRA's base) adds as its dequantised kernel, so the merged model is float."""
    return _map_adapted(lambda w, d: w + d, base, scaled(adapters, cfg))


def unmerge(merged: dict, adapters: dict, cfg: LoraConfig) -> dict:
    """The inverse of merge (up to float rounding): W = W' - s A B."""
    return _map_adapted(jnp.subtract, merged, scaled(adapters, cfg))


def count(adapters: Any) -> int:
    """Trainable parameters of the adapters (boxed or plain)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(adapters)))


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A model whose apply() also takes LoraParams: the base as params, the scaled adapters as
    the "lora" collection. Plain params pass through, so the wrapper is transparent."""
    model: Any

    def init(self, *args, **kwargs):
        return self.model.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        params = variables.get("params")
        if isinstance(params, LoraParams):
            variables = {**variables, "params": params.base,
                         "lora": scaled(params.adapters, params.config)}
        return self.model.apply(variables, *args, **kwargs)

    def __getattr__(self, name):  # callers that read model.cfg see the inner model's
        return getattr(self.model, name)
