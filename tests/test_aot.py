"""Ahead-of-time compilation of the real train step for a target topology (launch/aot.py).

The CPU estimate runs everywhere (8 simulated devices); compiling with the target's own compiler
runs where libtpu or jax's CUDA plugin is installed and is skipped elsewhere."""
import importlib.util
import math

import jax
import pytest

from conftest import QUIET, REPO, tiny_config
from core import cli
from core.config import ConfigError, load_config
from core.engine import Engine
from launch import aot

GIB = 1024 ** 3
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
                   and importlib.util.find_spec("jax_plugins.xla_cuda13") is not None)


def shard_bytes(engine, global_batch: int) -> int:
    """Bytes one device holds of the state and the batch, from the shardings alone."""
    leaves = [*jax.tree_util.tree_leaves(engine.abstract_state),
              *engine.abstract_batch(global_batch).values()]
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


def expected_argument_bytes(config) -> int:
    engine = Engine(config, aot.make_task(config), jax.devices()[:8])
    return shard_bytes(engine, config.train.global_batch_size)


@pytest.mark.parametrize("name, devices, topology, hbm_gib", [
    ("v5e-256", 256, {"topology_name": "v5e:16x16"}, 16),
    ("v5e-8", 8, {"topology_name": "v5e:2x4"}, 16),
    ("v6e-64", 64, {"topology_name": "v6e:8x8"}, 32),
    ("v4-8", 4, {"topology_name": "v4:2x2x1", "chip_config_name": "megacore"}, 32),
    ("v4-128", 64, {"topology_name": "v4:4x4x4", "chip_config_name": "megacore"}, 32),
    ("v5p-512", 256, {"topology_name": "v5p:4x8x8", "chip_config_name": "megacore"}, 95),
])
def test_tpu_names_map_to_chip_grids_and_hbm(name, devices, topology, hbm_gib):
    target = aot.parse_target(name)
    assert (target.platform, target.num_devices, target.topology, target.hbm_bytes) == (
        "tpu", devices, topology, hbm_gib * GIB)


def test_multislice_and_gpu_hosts():
    two = aot.parse_target("v5e-16", num_slices=2)
    assert two.num_devices == 32 and two.topology["num_slices"] == 2
    gpu = aot.parse_target("2x8xH200")
    assert (gpu.platform, gpu.num_devices, gpu.hbm_bytes, gpu.topology["topology"]) == (
        "gpu", 16, 141 * GIB, "1x2x8")
    assert "core_count: 132" in gpu.topology["target_config"]
    assert aot.parse_target("8xA100-40").hbm_bytes == 40 * GIB


@pytest.mark.parametrize("name, message", [
    ("v7x-8", "unknown topology 'v7x-8'; known forms: TPU: v4-N"),
    ("8xB200", "unknown GPU 'B200'"),
    ("8xA100", "A100-40 or A100-80"),
    ("v4-9", "2 per chip"),
    ("v5e-12", "not a power of two"),
    ("v5e-512", "at most 256 chips"),
])
def test_unknown_or_impossible_topologies_are_clear_errors(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        aot.parse_target(name)


def test_cli_unknown_topology_exits_2_with_the_known_forms(capsys):
    code = cli.run(aot.main, ["--config", "experiments/configs/lm/gpt.py:size=tiny",
                              "--topology", "tpu-9000"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown topology 'tpu-9000'" in err and "8xH100" in err


def test_cpu_estimate_of_8_h100_reports_exact_argument_bytes():
    config = tiny_config()
    result = aot.run(config, aot.parse_target("8xH100"), method="cpu-estimate")
    per_device = result["per_device_bytes"]
    assert result["method"] == "cpu-estimate" and "estimate" in result["note"]
    assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    # XLA:CPU's argument size is the state and the batch, sharded: compare with the shardings.
    assert per_device["arguments"] == expected_argument_bytes(tiny_config())
    assert per_device["temporaries"] > 0
    assert per_device["peak"] == (per_device["arguments"] + per_device["outputs"]
                                  - per_device["donated"] + per_device["temporaries"]
                                  + per_device["generated_code"])
    assert result["usable_bytes"] == int(80 * GIB * 0.75) and result["fits"]


def test_fsdp_mesh_shrinks_the_state_and_a_tiny_budget_does_not_fit(capsys):
    overrides = aot.mesh_overrides("data=1,fsdp=8")
    config = tiny_config(*overrides)
    result = aot.run(config, aot.parse_target("8xH100"), method="cpu-estimate",
                     memory_fraction=1e-6)
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert result["per_device_bytes"]["arguments"] == expected_argument_bytes(
        tiny_config(*overrides))
    assert result["per_device_bytes"]["arguments"] < expected_argument_bytes(tiny_config()) / 2
    assert not result["fits"] and result["headroom_bytes"] < 0


def test_bad_mesh_and_method_target_without_its_compiler(monkeypatch):
    with pytest.raises(ConfigError, match="AXIS=SIZE"):
        aot.mesh_overrides("model=8")
    if HAS_CUDA_PLUGIN:  # take the plugin away, so the missing-compiler path still runs
        def missing(target):
            raise aot.CompilerMissing("jax's CUDA plugin is not installed")
        monkeypatch.setattr(aot, "target_devices", missing)
    with pytest.raises(ConfigError, match="cannot compile for 8xH100 here: jax's CUDA plugin"):
        aot.run(tiny_config(), aot.parse_target("8xH100"), method="target")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu==0.0.42.1)")
def test_tpu_compile_for_v5e_8_without_a_tpu():
    result = aot.run(tiny_config(), aot.parse_target("v5e-8"))
    per_device = result["per_device_bytes"]
    assert result["method"] == "target" and result["compiler"].startswith("libtpu")
    assert result["device_kind"] == "TPU v5 lite" and result["num_devices"] == 8
    # TPU layouts pad arrays to tiles, so arguments are at least the sharded sizes.
    assert per_device["arguments"] >= expected_argument_bytes(tiny_config())
    assert per_device["generated_code"] > 0 and result["fits"]


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu==0.0.42.1)")
def test_tpu_compiler_refusing_a_step_that_cannot_fit_is_reported_not_raised():
    # 262,144 examples per chip: the logits alone are ~34 GB against v5e's 16 GiB.
    config = tiny_config("--config.train.global_batch_size=2097152")
    result = aot.run(config, aot.parse_target("v5e-8"))
    assert not result["fits"] and result["per_device_bytes"] is None
    assert "RESOURCE_EXHAUSTED" in result["compiler_error"]


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is not installed")
def test_gpu_compile_for_8_h100_without_a_gpu():
    result = aot.run(tiny_config(), aot.parse_target("8xH100"), method="target")
    assert result["method"] == "target" and result["compiler"].startswith("jax-cuda13-plugin")
    assert result["per_device_bytes"]["arguments"] == expected_argument_bytes(tiny_config())
    assert result["fits"]


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is not installed")
def test_the_gpu_preset_runs_cudnn_flash_attention_in_the_compiled_step():
    """One fused cuDNN attention forward and backward per layer in the step the GPU compiler
    builds for an H100 (no GPU needed)."""
    gpt = str(REPO / "experiments/configs/lm/gpt.py")
    config = load_config(gpt + ":size=tiny,platform=gpu", QUIET)
    result = aot.run(config, aot.parse_target("1xH100"), method="target")
    layers = config.model.num_layers
    assert result["library_calls"]["__cudnn$fmhaSoftmax"] == layers
    assert result["library_calls"]["__cudnn$fmhaSoftmaxBackward"] == layers


def test_the_gpu_preset_compiles_with_bf16_activations_and_unrolled_layers():
    """platform=gpu: bf16 compute, float32 parameters (the arguments stay float32), no layer
    scan, cuDNN attention, no document mask; the step compiles for the target (XLA:CPU's
    estimate swaps in jax.nn's XLA attention, and says so)."""
    gpt = str(REPO / "experiments/configs/lm/gpt.py")
    config = load_config(gpt + ":size=tiny,platform=gpu", QUIET)
    assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
    assert not config.model.scan_layers and not config.data.document_masking
    assert config.model.attention_impl == "cudnn"
    result = aot.run(config, aot.parse_target("8xH100"), method="cpu-estimate")
    assert "cuDNN attention does not compile for XLA:CPU" in result["note"]
    cpu = aot.run(load_config(gpt + ":size=tiny", QUIET), aot.parse_target("8xH100"),
                  method="cpu-estimate")
    assert result["fits"] and result["parameters"] == cpu["parameters"]
    # float32 parameters and optimizer state: the same argument bytes as the float32 preset
    assert result["per_device_bytes"]["arguments"] == cpu["per_device_bytes"]["arguments"]
