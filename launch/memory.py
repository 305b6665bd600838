"""How much memory a training step needs per device, estimated from the config alone.

    python -m launch memory --config experiments/configs/lm/gpt.py:size=gpt2_124m --devices 8
    python -m launch memory --config ... --devices 8 --lora-rank 16 --base-format nf4 --compare

prints a table (bytes per device, line by line) and, with --json, the same as JSON. Lines:
parameters (sharded by the rules table over the mesh), gradients, optimiser state (AdamW: two
moments, SGD: one momentum trace, EMA: a float32 copy), the batch, activations saved for the
backward pass (per layer x layers, by model.remat), logits (B x T x V float32 and the softmax
gradient beside it), and the backward's working set (one layer's activations and their
gradients). `--compare` also compiles the real step on simulated CPU devices (launch/aot.py)
and reports XLA's memory_analysis() beside the estimate.

The per-layer activation terms count what JAX saves for the backward pass of this code's block
(lm/models/transformer.py) at the jaxpr level, which is what a scanned stack keeps per layer:
 remat none  8 D (residual stream, norm inputs, outputs and float32 statistics), q, k, v and
             the attention output, 2 N x S float32 (masked scores and softmax), 6 F (MLP)
 remat dots  the block input and the outputs of matmuls without batch dimensions (q, k, v)
 remat full  the block input only; the backward recomputes one layer at a time
LoRA (what-if until the step trains adapters): the base weights are frozen (stored in
--base-format, no gradients or moments) and each target kernel gets r x (in + out) trainable
float32 parameters with gradients and moments.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import flax.linen as nn
import jax
import ml_collections

from core import cli
from core import mesh as mesh_lib
from core.config import ConfigError, load_config
from core.engine import ways
from core.memory import GIB, OutOfMemoryError

log = logging.getLogger(__name__)

# Bits per parameter of a frozen base weight. nf4: 4-bit codes, a bf16... scale per block of
# 64 and a float32 scale per 256 scales (torchao to_nf4: 4.126 bits, DESIGN.md); int8: one byte
# and a float32 scale per output channel (counted as one byte).
BASE_FORMATS = {"float32": 32.0, "bfloat16": 16.0, "int8": 8.0, "nf4": 4.126}
# LoRA targets: the block kernels by their parameter names (peft's q_proj ... down_proj).
LORA_TARGETS = ("w_q", "w_k", "w_v", "w_o", "w_up", "w_gate", "w_down")
STATE_LINES = ("parameters", "frozen base weights", "LoRA adapters", "optimizer state",
               "batch")
MOMENT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int
    targets: tuple[str, ...] = ("w_q", "w_v")
    base_format: str = "float32"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--lora-rank {self.rank} must be at least 1")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets {unknown or 'none'}: choose from {LORA_TARGETS}")
        if self.base_format not in BASE_FORMATS:
            raise ConfigError(f"--base-format {self.base_format!r}: choose one of "
                              f"{', '.join(BASE_FORMATS)}")


def abstract_mesh(config: ml_collections.ConfigDict, num_devices: int):
    """The config's mesh over `num_devices` devices, as axis sizes only (no devices needed)."""
    dcn = mesh_lib.resolve_axis_sizes([config.mesh.dcn[a] for a in mesh_lib.MESH_AXES], 1, "dcn")
    ici = mesh_lib.resolve_axis_sizes([config.mesh.ici[a] for a in mesh_lib.MESH_AXES],
                                      num_devices, "ici")
    sizes = tuple(i * d for i, d in zip(ici, dcn))
    return jax.sharding.AbstractMesh(sizes, mesh_lib.MESH_AXES)


def _shard_elements(shape, logical_axes, mesh, rules) -> int:
    mesh_axes = nn.logical_to_mesh_axes(logical_axes, rules)
    return math.prod(dim // ways(mesh, axes) for dim, axes in zip(shape, mesh_axes))


def parameter_shards(task, mesh, rules) -> list[tuple[str, int, int, str]]:
    """(path, global elements, elements on one device, dtype) of every parameter."""
    boxed = jax.eval_shape(task.init_params, jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    out = []
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    for (path, leaf), spec in zip(leaves, spec_leaves):
        names = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        axes = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        out.append((names, math.prod(leaf.shape),
                    _shard_elements(leaf.shape, axes, mesh, rules), str(leaf.dtype)))
    return out


def _bytes(dtype: str) -> int:
    return jax.numpy.dtype(dtype).itemsize


def lora_shards(task, mesh, rules, lora: Lora) -> tuple[int, int]:
    """(global, per-device) adapter parameters: r x (in + out) per target kernel, each factor
    sharded like the kernel's matching side (A: in x r, B: r x out)."""
    boxed = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    specs = nn.get_partition_spec(jax.eval_shape(task.init_params, jax.random.key(0)))
    total = local = 0
    for (path, leaf), spec in zip(
            jax.tree_util.tree_leaves_with_path(boxed),
            jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(
                x, jax.sharding.PartitionSpec))):
        name = str(path[-1].key)
        if name not in lora.targets:
            continue
        stacked = "layers" in spec[:1]
        layers = leaf.shape[0] if stacked else 1
        shape, axes = (leaf.shape[1:], tuple(spec)[1:]) if stacked else (leaf.shape, tuple(spec))
        split = 1 if name in ("w_q", "w_k", "w_v", "w_up", "w_gate") else len(shape) - 1
        a_shape, b_shape = (math.prod(shape[:split]), lora.rank), (lora.rank,
                                                                  math.prod(shape[split:]))
        a_axes, b_axes = (axes[0], None), (None, axes[split])
        total += layers * (math.prod(a_shape) + math.prod(b_shape))
        local += layers * (_shard_elements(a_shape, a_axes, mesh, rules)
                           + _shard_elements(b_shape, b_axes, mesh, rules))
    return total, local


def _activation_terms(cfg, mesh, rules, seq_len: int) -> dict[str, tuple[int, int]]:
    """Per token of one device's batch: (elements, bytes each) of each tensor one layer keeps,
    by model.remat, heads and MLP width divided over the devices that shard them."""
    shard = lambda n, axis: n // ways(mesh, nn.logical_to_mesh_axes((axis,), rules)[0])
    D, H, T = cfg.d_model, cfg.resolved_head_dim, seq_len
    N, K, F = shard(cfg.num_heads, "heads"), shard(cfg.resolved_num_kv_heads, "kv_heads"), \
        shard(cfg.resolved_d_ff, "mlp")
    c = _bytes(cfg.dtype)
    S = min(T, 2 * cfg.window + 1) if cfg.attention == "sliding_window" else T
    every = {"residual stream and norms": (8 * D, c),
             "q, k, v, attention output": (2 * N * H + 2 * K * H, c),
             "attention scores and softmax": (2 * N * S, 4),
             "MLP": (6 * F, c)}
    if cfg.remat == "none":
        return every
    if cfg.remat == "dots":
        return {"block input": (D, c), "q, k, v": (N * H + 2 * K * H, c)}
    return {"block input": (D, c)}


def estimate(config: ml_collections.ConfigDict, num_devices: int, task=None,
             lora: Lora | None = None, moment_dtype: str = "") -> dict:
    """Bytes per device of one train step of `config` over `num_devices` devices, line by line
    (see the module docstring), with the counts behind them."""
    if task is None:
        from launch.aot import make_task
        task = make_task(config)
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

    shards = parameter_shards(task, mesh, rules)
    params_global = sum(n for _, n, _, _ in shards)
    params_bytes = sum(local * _bytes(dtype) for _, _, local, dtype in shards)
    pbytes = _bytes(cfg.param_dtype)
    trainable_local = sum(local for _, _, local, _ in shards)
    lines = {}
    if lora is None:
        lines["parameters"] = params_bytes
        trainable_global = params_global
    else:  # frozen base in its storage format; adapters trained in float32
        lines["frozen base weights"] = int(trainable_local * BASE_FORMATS[lora.base_format] / 8)
        trainable_global, trainable_local = lora_shards(task, mesh, rules, lora)
        lines["LoRA adapters"] = trainable_local * 4
        pbytes = 4
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
    per_layer = _activation_terms(cfg, mesh, rules, T)
    layer_bytes = tokens * sum(n * size for n, size in per_layer.values())
    lines["activations saved"] = cfg.num_layers * layer_bytes
    # One layer's backward: the gradients it passes through (two F wide, the scores, four D
    # wide) and, under remat, about a quarter of the layer recomputed (XLA recomputes and frees
    # a piece at a time; a quarter is what XLA:CPU's buffer assignment shows on tiny models).
    full = _activation_terms(dataclasses.replace(cfg, remat="none"), mesh, rules, T)
    F, NS = full["MLP"][0] // 6, full["attention scores and softmax"][0] // 2
    working = tokens * (2 * F * full["MLP"][1] + NS * 4 + 4 * cfg.d_model * 4)
    if cfg.remat != "none":
        working += tokens * sum(n * size for n, size in full.values()) // 4
    lines["backward working set"] = working
    vocab = cfg.vocab_size // ways(mesh, nn.logical_to_mesh_axes(("vocab",), rules)[0])
    lines["logits"] = 2 * tokens * vocab * 4
    # The peak is in the backward pass (gradients, activations, logits) or, when those are
    # small, in the optimiser update: the gradients and a parameter-sized update beside the state.
    state = sum(v for k, v in lines.items() if k in STATE_LINES)
    backward = sum(v for k, v in lines.items() if k not in STATE_LINES)
    update = lines["gradients"] + trainable_local * pbytes
    return {"num_devices": num_devices, "mesh": dict(mesh.shape),
            "parameters": params_global, "trainable_parameters": trainable_global,
            "tokens_per_device": tokens, "microbatches": micro,
            "activations_per_layer": {k: tokens * n * s for k, (n, s) in per_layer.items()},
            "bytes": lines, "state_bytes": state, "backward_bytes": backward,
            "update_bytes": update, "peak_phase": "backward" if backward >= update else "update",
            "total_bytes": state + max(backward, update)}


def compiled(config: ml_collections.ConfigDict, num_devices: int, task=None) -> dict:
    """XLA's memory_analysis() of the real step compiled for `num_devices` simulated CPU
    devices (launch/aot.py's CPU estimate): what the estimate is checked against."""
    from launch import aot
    report, seconds = aot.compile_step(aot.Engine(config, task or aot.make_task(config),
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
        "train.microbatches, set model.remat=full or train LoRA adapters (--lora-rank)")


def main(argv: list[str] | None = None) -> int:
    from launch import aot
    parser = cli.ArgumentParser(prog="python -m launch memory", description=__doc__)
    parser.add_argument("--config", required=True,
                        help="e.g. experiments/configs/lm/gpt.py:size=gpt2_124m")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--devices", type=int, default=0, help="devices of the mesh (default 1)")
    where.add_argument("--topology", default="", help=f"check against its HBM; {aot.KNOWN}")
    parser.add_argument("--mesh", default="", help="in-slice axis sizes, e.g. data=2,fsdp=4")
    parser.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA adapters")
    parser.add_argument("--lora-targets", default="w_q,w_v",
                        help=f"comma-separated, from {','.join(LORA_TARGETS)}")
    parser.add_argument("--base-format", default="float32", choices=tuple(BASE_FORMATS),
                        help="storage of LoRA's frozen base weights")
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
    lora = (Lora(args.lora_rank, tuple(filter(None, args.lora_targets.split(","))),
                 args.base_format) if args.lora_rank else None)
    if args.compare:
        if lora:
            raise ConfigError("--compare compiles the full fine-tuning step; drop --lora-rank "
                              "(the estimate of adapters is analytic until the step trains them)")
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        aot.use_cpu_devices(devices)
    config = load_config(args.config, [*aot.mesh_overrides(args.mesh), *rest])
    task = aot.make_task(config)
    result = estimate(config, devices, task, lora, args.moment_dtype)
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
