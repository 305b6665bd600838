"""Ahead-of-time compilation of the real train step for a target topology, from this machine.

    python -m launch aot --config experiments/configs/lm/gpt.py:size=gpt2_124m --topology v5e-256
    python -m launch aot --config ...:size=gpt2_124m --topology 8xH100 --mesh data=2,fsdp=4

prints, as JSON, the memory each device needs (arguments, outputs, temporaries, generated code)
against the device's HBM, and exits 1 when the step does not fit (MaxText's train_compile).

Two methods. `target`: XLA's own compiler for the target, with compile-only devices and no
accelerator. TPU needs libtpu (`pip install libtpu==0.0.42.1`, the build jax 0.10.2 pins); GPU
needs jax's CUDA plugin (`pip install 'jax[cuda13]==0.10.2'`, the `gpu` extra), which compiles for
a GPU described by a target config (SM count, shared memory, ...) without one. `cpu-estimate`:
the same step compiled by XLA:CPU for as many simulated CPU devices as the target has, on the
target's mesh; argument and output bytes are the sharded arrays' sizes, but temporaries come from
the CPU compiler's fusion and scheduling and can differ a lot from the accelerator's. `auto` (the
default) takes `target` when its compiler is installed, else says so and estimates.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import time

import jax

from core import cli
from core import mesh as mesh_lib
from core.config import ConfigError, check_choice, load_config
from core.engine import Engine
from core.memory import GIB, memory_report

log = logging.getLogger(__name__)

METHODS = ("auto", "target", "cpu-estimate")
# HBM per device (a v4/v5p device is one chip, both TensorCores: megacore).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TPU_KIND = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """A GPU as XLA's compiler sees it (NVIDIA datasheets and the CUDA occupancy tables)."""
    kind: str                     # device_kind, as jax names the device
    compute_capability: tuple[int, int]
    sms: int
    fp32_lanes_per_sm: int
    shared_memory_per_sm: int     # bytes
    shared_memory_optin: int      # per block, bytes
    l2_bytes: int
    bandwidth: float              # bytes/s
    clock_ghz: float
    hbm_gib: int


_HOPPER = dict(compute_capability=(9, 0), sms=132, fp32_lanes_per_sm=128,
               shared_memory_per_sm=233472, shared_memory_optin=232448, l2_bytes=50 << 20,
               clock_ghz=1.98)
_AMPERE = dict(compute_capability=(8, 0), sms=108, fp32_lanes_per_sm=64,
               shared_memory_per_sm=167936, shared_memory_optin=166912, l2_bytes=40 << 20,
               clock_ghz=1.41)
GPU_SPECS = {
    "H100": GpuSpec("NVIDIA H100 80GB HBM3", bandwidth=3.35e12, hbm_gib=80, **_HOPPER),
    "H200": GpuSpec("NVIDIA H200", bandwidth=4.8e12, hbm_gib=141, **_HOPPER),
    "A100-40": GpuSpec("NVIDIA A100-SXM4-40GB", bandwidth=1.555e12, hbm_gib=40, **_AMPERE),
    "A100-80": GpuSpec("NVIDIA A100-SXM4-80GB", bandwidth=2.039e12, hbm_gib=80, **_AMPERE),
}
GPU_MEMORY_FRACTION = 0.75  # what JAX preallocates on a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION)
KNOWN = ("TPU: v4-N, v5p-N (N TensorCores, 2 per chip), v5e-N, v6e-N (N chips), N a power of two; "
         f"GPU: [HOSTSx]Nx{{{','.join(GPU_SPECS)}}}, e.g. 8xH100 or 2x8xH200")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str          # "tpu" or "gpu"
    device_kind: str
    num_devices: int
    hbm_bytes: int
    topology: dict         # what the target compiler's topology factory takes
    num_slices: int = 1


def _tpu_grid(generation: str, chips: int) -> tuple[int, ...]:
    """The chip grid of a slice: 2-D for v5e/v6e (16x16), 3-D for v4/v5p (4x4x4, 2x2x1)."""
    if chips & (chips - 1):
        raise ConfigError(f"{chips} chips is not a power of two; known forms: {KNOWN}")
    if generation in ("v5e", "v6e"):
        if chips > 256:
            raise ConfigError(f"a {generation} slice has at most 256 chips, not {chips}")
        rows = 2 ** (int(math.log2(chips)) // 2)
        return rows, chips // rows
    if chips < 4:
        raise ConfigError(f"the smallest {generation} slice is {generation}-8 (4 chips)")
    dims = [2, 2, 1]
    while math.prod(dims) < chips:
        dims[dims.index(min(dims))] *= 2
    return tuple(sorted(dims, key=lambda d: (d == 1, d)))


def gpu_target_config(gpu: str) -> str:
    """A text GpuTargetConfigProto: what XLA's GPU compiler needs to know instead of a device."""
    spec = GPU_SPECS[gpu]
    major, minor = spec.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sms}
  fpus_per_core: {spec.fp32_lanes_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(spec.bandwidth)}
  l2_cache_size: {spec.l2_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.hbm_gib * GIB}
  shared_memory_per_block_optin: {spec.shared_memory_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
device_description_str: "{spec.kind}"
"""


def parse_target(name: str, num_slices: int = 1) -> Target:
    """A topology name (v5e-256, v4-128, 8xH100, 2x8xH200) as devices, HBM and compile options."""
    text = name.strip()
    if num_slices < 1:
        raise ConfigError(f"--num-slices {num_slices} must be at least 1")
    tpu = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", text, re.IGNORECASE)
    if tpu:
        generation, size = tpu.group(1).lower(), int(tpu.group(2))
        megacore = generation in ("v4", "v5p")
        if megacore and size % 2:
            raise ConfigError(f"{text}: {generation} sizes count TensorCores, 2 per chip")
        chips = size // 2 if megacore else size
        grid = _tpu_grid(generation, chips)
        topology = {"topology_name": f"{generation}:{'x'.join(map(str, grid))}"}
        if megacore:
            topology["chip_config_name"] = "megacore"
        elif chips < 4:  # libtpu assumes 2x2 chips per host; a smaller slice is one smaller host
            topology["chips_per_host_bounds"] = (*grid, 1)
        if num_slices > 1:
            topology["num_slices"] = num_slices
        return Target(text, "tpu", TPU_KIND[generation], chips * num_slices,
                      TPU_HBM_GIB[generation] * GIB, topology, num_slices)
    gpu = re.fullmatch(r"(?:(\d+)x)?(\d+)x([A-Za-z0-9-]+)", text)
    if gpu:
        kind = gpu.group(3).upper()
        if kind == "A100":
            raise ConfigError(f"{text}: say which A100, A100-40 or A100-80 (GiB of HBM)")
        if kind not in GPU_SPECS:
            raise ConfigError(f"unknown GPU {gpu.group(3)!r} in {text!r}; known: {KNOWN}")
        if num_slices > 1:
            raise ConfigError("--num-slices is for TPU multislice; write GPU hosts as 2x8xH100")
        hosts, per_host = int(gpu.group(1) or 1), int(gpu.group(2))
        if hosts < 1 or per_host < 1:
            raise ConfigError(f"{text}: host and device counts must be at least 1")
        # The topology is partitions x hosts x devices per host.
        return Target(text, "gpu", GPU_SPECS[kind].kind, hosts * per_host,
                      GPU_SPECS[kind].hbm_gib * GIB, {"topology": f"1x{hosts}x{per_host}",
                                                      "target_config": gpu_target_config(kind)})
    raise ConfigError(f"unknown topology {name!r}; known forms: {KNOWN}")


# --- devices ---------------------------------------------------------------------------------
class CompilerMissing(RuntimeError):
    """The target's own compiler is not installed here."""


def _version(package: str) -> str:
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


def target_devices(target: Target) -> tuple[list, str]:
    """(compile-only devices of the target, the compiler) or CompilerMissing."""
    from jax._src import xla_bridge
    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
            raise CompilerMissing("libtpu is not installed: pip install libtpu==0.0.42.1 "
                                  "(the build jax 0.10.2 pins)")
        from jax.experimental import topologies
        try:
            devices = topologies.get_topology_desc(platform="tpu", **target.topology).devices
        except jax.errors.JaxRuntimeError as error:
            raise ConfigError(f"libtpu does not know the topology {target.topology}: "
                              f"{error}") from error
        return list(devices), _version("libtpu")
    try:
        topology = xla_bridge.make_pjrt_topology("cuda", "", **target.topology)
    except NotImplementedError as error:  # no CUDA plugin registered
        raise CompilerMissing("jax's CUDA plugin is not installed (pip install "
                              "'jax[cuda13]==0.10.2'), or it failed to load: set "
                              "JAX_PLATFORMS=cpu on a machine without a GPU") from error
    return list(topology._make_compile_only_devices()), _version("jax-cuda13-plugin")


def cpu_devices(count: int) -> list:
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ConfigError(
            f"the CPU estimate needs {count} simulated CPU devices but jax has {len(devices)}; "
            "run `python -m launch aot` in a fresh process (it sets the count itself) or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return devices[:count]


def use_cpu_devices(count: int) -> None:
    """Asks for `count` simulated CPU devices, while jax has not started its backends yet."""
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized() and \
            "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", count)


# --- the step --------------------------------------------------------------------------------
def make_task(config):
    """The config's task, built without data: the model's shapes need only the vocabulary size
    (model.vocab_size, or when that follows the tokenizer, the size it is trained to)."""
    if "model" not in config or "tokenizer" not in config.get("data", {}):
        raise ConfigError(f"aot compiles configs that define their model (gpt.py, bert.py, "
                          f"t5.py, gato.py); task {config.task!r} has no model or "
                          "data.tokenizer section")
    from lm.objectives import registry
    from multimodal.commands import TASKS as MULTIMODAL_TASKS
    vocab_size = config.model.vocab_size or config.data.tokenizer.vocab_size
    if config.task in MULTIMODAL_TASKS:  # its module builds the task from the text vocabulary
        return importlib.import_module(MULTIMODAL_TASKS[config.task]).make_task(
            config, vocab_size)[0]
    return registry.make_task(config, vocab_size)


def compile_step(engine: Engine):
    """(memory report, library calls, seconds) of the engine's real train step compiled for its
    devices; the check against the target's HBM is the caller's (the engine's own would use
    this machine's)."""
    started = time.perf_counter()
    compiled = engine.lower_train_step().compile()
    return memory_report(compiled), library_calls(compiled.as_text()), \
        time.perf_counter() - started


def library_calls(hlo_text: str) -> dict[str, int]:
    """The compiled step's custom calls into kernel libraries, by target, e.g. cuDNN's fused
    attention (`__cudnn$fmhaSoftmax` and its backward): which kernels the step really runs."""
    return dict(sorted(collections.Counter(
        re.findall(r'custom_call_target="([^"]+)"', hlo_text)).items()))


def run(config, target: Target, method: str = "auto", memory_fraction: float = 0.0) -> dict:
    """Compiles for the target and returns the report (see the module docstring)."""
    check_choice("--method", method, METHODS)
    fraction = memory_fraction or (GPU_MEMORY_FRACTION if target.platform == "gpu" else 1.0)
    if not 0 < fraction <= 1:
        raise ConfigError(f"--memory-fraction {fraction} must be in (0, 1]")
    note = ""
    if method in ("auto", "target"):
        try:
            devices, compiler = target_devices(target)
            used = "target"
        except CompilerMissing as error:
            if method == "target":
                raise ConfigError(f"cannot compile for {target.name} here: {error}") from error
            log.warning("%s; estimating with XLA:CPU instead", error)
            note = f"{error}. "
            method = "cpu-estimate"
    if method == "cpu-estimate":
        if target.num_slices > 1:
            raise ConfigError("the CPU estimate has no slices: drop --num-slices, or install "
                              "libtpu to compile for the multislice target")
        devices, compiler, used = cpu_devices(target.num_devices), "XLA:CPU", "cpu-estimate"
        note += ("CPU-compiled estimate: arguments and outputs are the per-device sizes of the "
                 "sharded arrays (without the accelerator's layout padding); temporaries come "
                 "from XLA:CPU's fusion and scheduling, not the target compiler's.")
        if config.get("model", {}).get("attention_impl") == "cudnn":
            config = config.copy_and_resolve_references()
            config.model.attention_impl = "dot_product_attention"
            note += (" cuDNN attention does not compile for XLA:CPU, so the estimate uses "
                     "jax.nn's XLA attention, which keeps the scores the flash kernel does not: "
                     "an over-estimate.")
    engine = Engine(config, make_task(config), devices)
    usable = int(target.hbm_bytes * fraction)
    params = sum(math.prod(x.shape)
                 for x in jax.tree_util.tree_leaves(engine.abstract_state.params))
    head = {
        "topology": target.name, "platform": target.platform, "device_kind": target.device_kind,
        "num_devices": target.num_devices, "num_slices": target.num_slices,
        "method": used, "compiler": compiler, "note": note.strip(),
        "mesh": dict(engine.mesh.shape), "parameters": params,
        "global_batch_size": config.train.global_batch_size,
        "microbatches": config.train.microbatches,
        "hbm_bytes": target.hbm_bytes, "memory_fraction": fraction, "usable_bytes": usable}
    try:
        report, calls, seconds = compile_step(engine)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The TPU compiler refuses a program that cannot fit; its message says by how much.
        return {**head, "fits": False, "per_device_bytes": None,
                "compiler_error": str(error).strip()}
    return {
        **head,
        "per_device_bytes": {
            "arguments": report.argument_bytes, "outputs": report.output_bytes,
            "donated": report.alias_bytes, "temporaries": report.temp_bytes,
            "generated_code": report.code_bytes, "peak": report.peak_bytes},
        "library_calls": calls,
        "fits": report.peak_bytes <= usable, "headroom_bytes": usable - report.peak_bytes,
        "summary": (f"{report.summary()}; {usable / GIB:.3f} GiB usable of "
                    f"{target.hbm_bytes / GIB:.0f}"),
        "compile_seconds": round(seconds, 2),
    }


def mesh_overrides(spec: str) -> list[str]:
    """--mesh data=2,fsdp=4 as config overrides of mesh.ici."""
    overrides = []
    for item in filter(None, spec.split(",")):
        axis, sep, size = item.partition("=")
        if not sep or axis.strip() not in mesh_lib.MESH_AXES:
            raise ConfigError(f"--mesh {spec!r}: write AXIS=SIZE pairs, axes {mesh_lib.MESH_AXES}")
        overrides.append(f"mesh.ici.{axis.strip()}={size.strip()}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m launch aot", description=__doc__)
    parser.add_argument("--config", required=True,
                        help="e.g. experiments/configs/lm/gpt.py:size=gpt2_124m")
    parser.add_argument("--topology", required=True, help=KNOWN)
    parser.add_argument("--num-slices", type=int, default=1, help="TPU multislice")
    parser.add_argument("--mesh", default="", help="in-slice axis sizes, e.g. data=2,fsdp=4")
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument("--memory-fraction", type=float, default=0.0,
                        help="usable share of HBM (default 1 on TPU, "
                             f"{GPU_MEMORY_FRACTION} on GPU)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not os.environ.get("JAX_PLATFORMS"):
        # Compiling needs no accelerator, and a CUDA plugin on a machine without a GPU only
        # loads (for its compiler) when jax is not asked to run on it.
        jax.config.update("jax_platforms", "cpu")
    target = parse_target(args.topology, args.num_slices)
    if args.method != "target":
        use_cpu_devices(target.num_devices)
    config = load_config(args.config, [*mesh_overrides(args.mesh), *rest])
    result = run(config, target, args.method, args.memory_fraction)
    from core.metrics import emit
    emit(result, args.out)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    cli.main_entry(main)
