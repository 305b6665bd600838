"""The device mesh built from the config, and the one table mapping logical axis names to it.

Axes are `data`, `fsdp`, `tensor`, each with an in-slice (ICI) and an across-slice (DCN) size;
`-1` means "whatever is left". Model code only names logical axes ("batch", "embed", "mlp", ...);
the rules table here decides which mesh axes shard them, so every mix of data, FSDP and tensor
parallelism is a config change.
"""
from __future__ import annotations

import contextlib

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from core.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Priority order matters: a mesh axis already used by an earlier rule is skipped, so activations
# ("batch", "length", "embed") shard batch over (data, fsdp) and leave embed whole, while
# parameters ("embed", "mlp") shard embed over fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """The mesh section of a config: in-slice sizes, and across-slice sizes all 1."""
    return ml_collections.ConfigDict({
        "num_devices": 0,  # 0: every device; N: the first N (e.g. a 1-device reference run)
        "ici": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "dcn": {"data": 1, "fsdp": 1, "tensor": 1},
    })


def resolve_axis_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    """Fills the one `-1` so the product is `total`; errors say how to fix the sizes."""
    sizes = [int(s) for s in sizes]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh.{what}: at most one axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh.{what}: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if total % known:
            raise ConfigError(
                f"mesh.{what}: {total} devices cannot be split with fixed axes {sizes} "
                f"(product {known} does not divide {total})")
        sizes[unknown[0]] = total // known
    if math.prod(sizes) != total:
        raise ConfigError(
            f"mesh.{what}: axis sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} "
            f"devices but {total} are available; set one axis to -1 to use the rest")
    return tuple(sizes)


def build_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); multi-slice when any DCN size exceeds 1."""
    devices = list(jax.devices() if devices is None else devices)
    if cfg.get("num_devices"):
        if cfg.num_devices > len(devices):
            raise ConfigError(f"mesh.num_devices {cfg.num_devices} > {len(devices)} available")
        devices = devices[:cfg.num_devices]
    dcn_raw = [cfg.dcn[a] for a in MESH_AXES]
    num_slices = max(1, len({getattr(d, "slice_index", 0) for d in devices}))
    dcn = resolve_axis_sizes(dcn_raw, num_slices, "dcn")
    ici = resolve_axis_sizes([cfg.ici[a] for a in MESH_AXES], len(devices) // num_slices, "ici")
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Normalises the config's rules (lists from overrides become tuples)."""
    normalised = []
    for rule in rules:
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"sharding rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES}")
        normalised.append((name, axes))
    return tuple(normalised)


def logical_sharding(mesh: Mesh, rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of one array whose dimensions carry these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def tree_shardings(mesh: Mesh, rules, boxed_tree) -> Any:
    """NamedShardings for every leaf of a tree of (possibly) logically-boxed abstract arrays.

    A box around an empty subtree (optax's MaskedNode: a parameter outside an optimiser group)
    holds no array, so it stays empty rather than getting a sharding."""
    boxed_tree = jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.Partitioned) and not jax.tree_util.tree_leaves(
            x.value) else x, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, shardings, what: str) -> None:
    """Fails early, naming the array, when a dimension does not split evenly over its mesh axes."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
    sharding_leaves = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(leaves, sharding_leaves):
        shape = getattr(leaf, "shape", ())
        for dim, axes in zip(shape, sharding.spec):
            if axes is None:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            ways = math.prod(sharding.mesh.shape[n] for n in names)
            if dim % ways:
                raise ConfigError(
                    f"{what} {jax.tree_util.keystr(path)} of shape {tuple(shape)}: dimension "
                    f"{dim} does not divide over mesh axes {names} ({ways} ways; mesh "
                    f"{dict(sharding.mesh.shape)}). Change the size, the mesh, or the rules.")


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Mesh and rules in scope while tracing, so the model's logical activation constraints
    (`nn.with_logical_constraint`) take effect; without both they are silently no-ops."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel() -> tuple[NamedSharding, NamedSharding]:
    """(rows split over every device, replicated) on a 1-D mesh: for inference whose parameters
    fit one device, each batch divided among all of them."""
    mesh = Mesh(jax.devices(), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
