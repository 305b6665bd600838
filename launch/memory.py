"""How much memory a training step needs per device, estimated from the config alone.

    python -m launch memory --config experiments/configs/lm/gpt.py:size=gpt2_124m --devices 8
    python -m launch memory --config ...:size=gpt2_124m --devices 8 --compare
    python -m launch memory --config ... --config.lora.rank=16 --base-format nf4 --topology v5e-8

prints the estimate as JSON, then as a table (bytes per device, line by line): parameters
(sharded by the rules table over the mesh), gradients, optimiser state (AdamW: two moments, SGD:
one momentum trace, EMA: a float32 copy), the batch, weights cast to the compute dtype,
activations saved for the backward pass (per layer x layers, by model.remat), the backward's
working set, FSDP-gathered weights, and logits (B x T x V float32 and the softmax gradient).
The peak is the state plus the larger of the backward and the optimiser update. `--compare`
also compiles the real step on simulated CPU devices (launch/aot.py) and reports XLA's
memory_analysis() beside the estimate; docs/memory.md has both on nine configurations.

The per-layer activation terms count what JAX saves for the backward pass of this code's block
(lm/models/transformer.py) and the compiled scan keeps, per token:
 remat none  8 D (residual stream, norm inputs, outputs and float32 statistics), q, k, v and
             the attention output, 2 N x S float32 (masked scores and softmax), 6 F (MLP)
 remat dots  the block input and the outputs of matmuls without batch dimensions, which the
             policy saves: q, k, v, the attention output projection, the MLP up (and gate)
             projection (the TPU compiler keeps them all; XLA:CPU drops the MLP's)
 remat full  the block input only; the backward recomputes one layer at a time
LoRA (config.lora.rank > 0, lm/models/lora.py): the base is frozen (weights only, in
model.param_dtype or, as a what-if, --base-format: bf16, int8, nf4 at 4.126 bits), and the
adapters, r x (in + out) per target kernel, have gradients and moments.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import flax.linen as nn
import jax
import ml_collections

from core import cli
from core import mesh as mesh_lib
from core.config import ConfigError, load_config
from core.engine import Engine, ways
from core.memory import GIB, OutOfMemoryError
from core.train_state import has_frozen
from lm.models import transformer as model_lib

# Bits per parameter of a frozen base weight. nf4: 4-bit codes, an 8-bit scale per block of 64
# and a float32 scale per 256 scales (torchao to_nf4: 4.126 bits, DESIGN.md); int8: one byte
# (and a scale per output channel, not counted).
BASE_FORMATS = {"float32": 32.0, "bfloat16": 16.0, "int8": 8.0, "nf4": 4.126}
STATE_LINES = ("parameters", "frozen base weights", "LoRA adapters", "optimizer state",
               "batch")
MOMENT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def abstract_mesh(config: ml_collections.ConfigDict, num_devices: int):
    """The config's mesh over `num_devices` devices, as axis sizes only (no devices needed)."""
    dcn = mesh_lib.resolve_axis_sizes([config.mesh.dcn[a] for a in mesh_lib.MESH_AXES], 1, "dcn")
    ici = mesh_lib.resolve_axis_sizes([config.mesh.ici[a] for a in mesh_lib.MESH_AXES],
                                      num_devices, "ici")
    sizes = tuple(i * d for i, d in zip(ici, dcn))
    return jax.sharding.AbstractMesh(sizes, mesh_lib.MESH_AXES)


def _shard_elements(shape, logical_axes, mesh, rules, whole=()) -> int:
    """Elements of one device's shard; dimensions mapped to mesh axes in `whole` stay whole."""
    def split(axes):
        names = axes if isinstance(axes, tuple) else (() if axes is None else (axes,))
        return ways(mesh, tuple(n for n in names if n not in whole))
    mesh_axes = nn.logical_to_mesh_axes(logical_axes, rules)
    return math.prod(dim // split(axes) for dim, axes in zip(shape, mesh_axes))


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str
    shape: tuple[int, ...]
    logical_axes: tuple
    dtype: str
    local: int      # elements on one device
    gathered: int   # elements on one device once FSDP gathers it (tensor sharding kept)


def parameter_shards(init, mesh, rules, fsdp_axes=()) -> list[Shard]:
    """Every parameter `init(rng)` makes, with its per-device size, from the logical names the
    model gives it."""
    boxed = jax.eval_shape(init, jax.random.key(0))
    specs = jax.tree_util.tree_leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    out = []
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)), specs):
        names = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        axes = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        out.append(Shard(names, tuple(leaf.shape), axes, str(leaf.dtype),
                         _shard_elements(leaf.shape, axes, mesh, rules),
                         _shard_elements(leaf.shape, axes, mesh, rules, fsdp_axes)))
    return out


def _bytes(dtype: str) -> int:
    return jax.numpy.dtype(dtype).itemsize


def _activation_terms(cfg, mesh, rules, seq_len: int) -> dict[str, tuple[int, int]]:
    """Per token of one device's batch: (elements, bytes each) of each tensor one layer keeps,
    by model.remat, heads and MLP width divided over the devices that shard them."""
    shard = lambda n, axis: n // ways(mesh, nn.logical_to_mesh_axes((axis,), rules)[0])
    D, H, T = cfg.d_model, cfg.resolved_head_dim, seq_len
    N, K, F = shard(cfg.num_heads, "heads"), shard(cfg.resolved_num_kv_heads, "kv_heads"), \
        shard(cfg.resolved_d_ff, "mlp")
    c = _bytes(cfg.dtype)
    S = {"sliding_window": min(T, 2 * cfg.window + 1),
         "linformer": cfg.linformer_len}.get(cfg.attention, T)  # lsh counted as full
    every = {"residual stream and norms": (8 * D, c),
             "q, k, v, attention output": (2 * N * H + 2 * K * H, c),
             "attention scores and softmax": (2 * N * S, 4),
             "MLP": (6 * F, c)}
    if cfg.remat == "none":
        return every
    if cfg.remat == "dots":
        up = 2 if cfg.mlp == "swiglu" else 1
        return {"block input and attention projection": (2 * D, c),
                "q, k, v": (N * H + 2 * K * H, c), "MLP up (and gate) projection": (up * F, c)}
    return {"block input": (D, c)}


def _gathered_bytes(shards: list[Shard], num_layers: int, copies: int, bits=None) -> int:
    """What FSDP gathers beside the shards: the embedding tables and other unstacked parameters
    whole, and `copies` layers' worth at a time (a layer's weights, and for trained ones their
    unreduced gradients), in `bits` per parameter if given."""
    total = 0
    for shard in shards:
        extra = (shard.gathered - shard.local) * (bits / 8 if bits else _bytes(shard.dtype))
        in_layer = (shard.logical_axes[:1] == ("layers",)
                    or re.match(r"layers_\d+/", shard.path) is not None)
        total += int(copies * extra / num_layers if in_layer else extra)
    return total


def estimate(config: ml_collections.ConfigDict, num_devices: int, task=None,
             base_format: str = "", moment_dtype: str = "") -> dict:
    """Bytes per device of one train step of `config` over `num_devices` devices, line by line
    (see the module docstring), with the counts behind them. With config.lora.rank > 0 the
    trained parameters are the adapters and the base is frozen, stored in `base_format`
    (default: model.param_dtype); `moment_dtype` stores the optimiser moments in another dtype."""
    if task is None:
        from launch.aot import make_task
        task = make_task(config)
    if base_format and base_format not in BASE_FORMATS:
        raise ConfigError(f"base format {base_format!r}: choose one of {', '.join(BASE_FORMATS)}")
    if moment_dtype and moment_dtype not in MOMENT_BYTES:
        raise ConfigError(f"moment dtype {moment_dtype!r}: choose one of "
                          f"{', '.join(MOMENT_BYTES)}")
    model = getattr(task, "model", None)
    if not isinstance(getattr(model, "model", model), model_lib.Transformer):  # LoraModel
        raise ConfigError(f"the estimate models the Transformer's layers (gpt.py, bert.py and "
                          f"their objectives); task {config.task!r} runs the "
                          f"model {type(model).__name__}: compile it with `python -m launch aot` instead")
    cfg, train = task.model_cfg, config.train
    mesh = abstract_mesh(config, num_devices)
    rules = mesh_lib.rules_from_config(config.sharding_rules)
    batch_ways = ways(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0])
    micro = train.microbatches
    if train.global_batch_size % (micro * batch_ways):
        raise ConfigError(f"train.global_batch_size {train.global_batch_size} does not split "
                          f"into {micro} microbatches over {batch_ways} devices")
    b, T = train.global_batch_size // (micro * batch_ways), task.seq_len
    tokens = b * T  # per device, per microbatch

    # FSDP (ZeRO-3): parameters split over an axis that also splits the batch are gathered
    # whole for their matmuls, one layer at a time.
    batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0] or ()
    fsdp_axes = tuple(a for a in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
                      if mesh.shape[a] > 1)
    trained = parameter_shards(task.init_params, mesh, rules, fsdp_axes)
    trainable_local = sum(s.local for s in trained)
    pbytes = _bytes(trained[0].dtype)
    lines = {}
    stored_bits = BASE_FORMATS[base_format] if base_format else 8 * _bytes(cfg.param_dtype)
    if has_frozen(task):  # LoRA: a frozen base, stored in base_format, and the adapters
        frozen = parameter_shards(task.init_frozen, mesh, rules, fsdp_axes)
        lines["frozen base weights"] = int(sum(s.local for s in frozen) * stored_bits / 8)
        lines["LoRA adapters"] = sum(s.local * _bytes(s.dtype) for s in trained)
        gathered = (_gathered_bytes(frozen, cfg.num_layers, 1, stored_bits)
                    + _gathered_bytes(trained, cfg.num_layers, 2))
    else:
        if base_format:
            raise ConfigError("a base format is for LoRA's frozen base: set "
                              "--config.lora.rank above 0 too")
        frozen = trained
        lines["parameters"] = sum(s.local * _bytes(s.dtype) for s in trained)
        gathered = _gathered_bytes(trained, cfg.num_layers, 2)
    optim = config.optim
    moments = {"adamw": 2, "sgd": 1 if optim.momentum else 0}[optim.name]
    moment_bytes = MOMENT_BYTES[moment_dtype] if moment_dtype else pbytes
    # Gradients are accumulated over microbatches beside each microbatch's own.
    lines["gradients"] = trainable_local * pbytes * (2 if micro > 1 else 1)
    lines["optimizer state"] = trainable_local * (moments * moment_bytes
                                                  + (4 if optim.ema_decay else 0))
    batch_bytes = sum(math.prod(f.shape) * _bytes(f.dtype)
                      for f in task.batch_fields().values())
    lines["batch"] = batch_bytes * b * micro
    compute = _bytes(cfg.dtype)
    if stored_bits != 8 * compute:
        # Weights stored in another dtype than the compute dtype: XLA hoists the cast of the
        # whole stacked weights out of the layer loop, one copy in the compute dtype. (A base
        # quantised to int8 or nf4, a what-if, is counted as dequantised one layer at a time.)
        cast = sum(s.local for s in frozen) * compute
        lines["weights cast to compute dtype"] = (
            cast // cfg.num_layers if base_format in ("int8", "nf4") else cast)
    if has_frozen(task) and cfg.remat != "full":
        # Each adapted kernel W + s A B is formed in the layer and kept for the backward pass.
        adapted = {s.path.rsplit("/", 1)[0] for s in trained if s.path.endswith("/a")}
        lines["LoRA merged kernels"] = sum(s.local for s in frozen if s.path in adapted) * compute
    per_layer = _activation_terms(cfg, mesh, rules, T)
    layer_bytes = tokens * sum(n * size for n, size in per_layer.values())
    lines["activations saved"] = cfg.num_layers * layer_bytes
    # One layer's backward: the gradients it passes through (two F wide, the scores, four D
    # wide) and, under remat, part of the layer recomputed: XLA recomputes and frees a piece at
    # a time, holding between none and a third of the layer beside the gradients in XLA:CPU's
    # buffer assignments of tiny models; an eighth is counted. The least certain line.
    full = _activation_terms(dataclasses.replace(cfg, remat="none"), mesh, rules, T)
    F, NS = full["MLP"][0] // 6, full["attention scores and softmax"][0] // 2
    working = tokens * (2 * F * full["MLP"][1] + NS * 4 + 4 * cfg.d_model * 4)
    if cfg.remat != "none":
        working += tokens * sum(n * size for n, size in full.values()) // 8
    lines["backward working set"] = working
    if gathered:
        lines["FSDP-gathered weights"] = gathered
    vocab = cfg.vocab_size // ways(mesh, nn.logical_to_mesh_axes(("vocab",), rules)[0])
    lines["logits"] = 2 * tokens * vocab * 4
    # The peak is in the backward pass (gradients, activations, logits) or, when those are
    # small, in the optimiser update: the gradients and a parameter-sized update beside the state.
    state = sum(v for k, v in lines.items() if k in STATE_LINES)
    backward = sum(v for k, v in lines.items() if k not in STATE_LINES)
    update = lines["gradients"] + trainable_local * pbytes
    return {"num_devices": num_devices, "mesh": dict(mesh.shape),
            "parameters": sum(math.prod(s.shape) for s in frozen),
            "trainable_parameters": sum(math.prod(s.shape) for s in trained),
            "tokens_per_device": tokens, "microbatches": micro,
            "activations_per_layer": {k: tokens * n * s for k, (n, s) in per_layer.items()},
            "bytes": lines, "state_bytes": state, "backward_bytes": backward,
            "update_bytes": update, "peak_phase": "backward" if backward >= update else "update",
            "total_bytes": state + max(backward, update)}


def compiled(config: ml_collections.ConfigDict, num_devices: int, task=None) -> dict:
    """XLA's memory_analysis() of the real step compiled for `num_devices` simulated CPU
    devices (launch/aot.py's CPU estimate): what the estimate is checked against."""
    from launch import aot
    report, _, seconds = aot.compile_step(Engine(config, task or aot.make_task(config),
                                              aot.cpu_devices(num_devices)))
    return {"arguments": report.argument_bytes, "outputs": report.output_bytes,
            "donated": report.alias_bytes, "temporaries": report.temp_bytes,
            "peak": report.peak_bytes, "compile_seconds": round(seconds, 2)}


def table(result: dict) -> str:
    """The estimate as a text table, GiB per device."""
    rows = [(name, size) for name, size in result["bytes"].items()]
    rows += [("state (parameters, optimizer, batch)", result["state_bytes"]),
             ("backward phase", result["backward_bytes"]),
             ("optimizer-update phase", result["update_bytes"]),
             (f"peak ({result['peak_phase']})", result["total_bytes"])]
    if "compiled" in result:
        rows.append(("XLA memory_analysis peak", result["compiled"]["peak"]))
    width = max(len(name) for name, _ in rows)
    unit, scale = ("GiB", GIB) if result["total_bytes"] >= GIB else ("MiB", 1 << 20)
    lines = [f"{result['parameters']:,} parameters ({result['trainable_parameters']:,} "
             f"trained), {result['tokens_per_device']:,} tokens per device per microbatch, mesh "
             f"{result['mesh']}"]
    lines += [f"{name:<{width}}  {size / scale:10.3f} {unit}" for name, size in rows]
    if "compiled" in result:
        lines.append(f"{'estimate / XLA':<{width}}  {result['ratio']:10.3f}")
    return "\n".join(lines)


def check_fits(result: dict, usable_bytes: int, where: str) -> None:
    """A one-line OutOfMemoryError, with what to change, when the estimate exceeds the device."""
    need = result["total_bytes"]
    if need <= usable_bytes:
        return
    biggest = max(result["bytes"], key=result["bytes"].get)
    raise OutOfMemoryError(
        f"the step needs about {need / GIB:.2f} GiB per device on {where} but "
        f"{usable_bytes / GIB:.2f} GiB is usable (largest line: {biggest}, "
        f"{result['bytes'][biggest] / GIB:.2f} GiB); shard more (--mesh fsdp=N), raise "
        "train.microbatches, set model.remat=full or train LoRA adapters (config.lora.rank)")


def main(argv: list[str] | None = None) -> int:
    from launch import aot
    parser = cli.ArgumentParser(prog="python -m launch memory", description=__doc__)
    parser.add_argument("--config", required=True,
                        help="e.g. experiments/configs/lm/gpt.py:size=gpt2_124m")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--devices", type=int, default=0, help="devices of the mesh (default 1)")
    where.add_argument("--topology", default="", help=f"check against its HBM; {aot.KNOWN}")
    parser.add_argument("--mesh", default="", help="in-slice axis sizes, e.g. data=2,fsdp=4")
    parser.add_argument("--base-format", default="", choices=("", *BASE_FORMATS),
                        help="storage of a LoRA run's frozen base (--config.lora.rank > 0); "
                             "default model.param_dtype")
    parser.add_argument("--moment-dtype", default="", choices=("", *MOMENT_BYTES),
                        help="optimiser moments in this dtype (default: the parameters')")
    parser.add_argument("--compare", action="store_true",
                        help="also compile the step on simulated CPU devices: memory_analysis()")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if args.devices < 0:
        raise ConfigError(f"--devices {args.devices} must be at least 1")
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), force=True)
    target = aot.parse_target(args.topology) if args.topology else None
    devices = target.num_devices if target else (args.devices or 1)
    if args.compare:
        if args.base_format or args.moment_dtype:
            raise ConfigError("--compare compiles the step the config trains, which has no "
                              "--base-format or --moment-dtype; drop them to compare")
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        aot.use_cpu_devices(devices)
    config = load_config(args.config, [*aot.mesh_overrides(args.mesh), *rest])
    task = aot.make_task(config)
    result = estimate(config, devices, task, args.base_format, args.moment_dtype)
    if args.compare:
        result["compiled"] = compiled(config, devices, task)
        result["ratio"] = round(result["total_bytes"] / result["compiled"]["peak"], 4)
    from core.metrics import emit
    emit(result, args.out)
    print(table(result))
    if target:
        fraction = aot.GPU_MEMORY_FRACTION if target.platform == "gpu" else 1.0
        check_fits(result, int(target.hbm_bytes * fraction), target.name)
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
