"""The benchmarks' shared tools: the environment every result records, the measured matmul peak,
the profile's buckets on a real compiled training step; and the default XLA flags every command
starts with, and the compilation cache every command keeps."""
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from benchmarks import cpu_gemm, cpu_profile, report
from benchmarks import train_throughput as bench
from conftest import REPO
from core import compile_cache, flops, xla_flags


def test_emit_records_versions_flags_and_devices(tmp_path, monkeypatch, capsys):
    jax.devices()  # the backend starts with the suite's flags, before the patch below
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = tmp_path / "result.json"
    report.emit({"tokens_per_s": 1.0}, str(out))
    saved = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == saved
    env = saved["environment"]
    assert env["versions"]["jax"] == jax.__version__
    assert env["flags"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "xla_force_host_platform_device_count=8" in env["flags"]["XLA_FLAGS"]
    assert env["jax_devices"]["platform"] == "cpu" and env["jax_devices"]["count"] == 8
    assert re.fullmatch(r"[0-9a-f]+(\+changes)?|unknown", env["git_commit"])


def test_measured_peak_times_a_chain_of_matmuls():
    one = flops.measured_matmul_flops(256, chain=1, repeats=2)
    chained = flops.measured_matmul_flops(256, chain=8, repeats=2)
    assert 1e8 < one < 1e14 and 1e8 < chained < 1e14


def test_gemm_shapes_cover_the_bench_and_its_gradients():
    shapes = cpu_gemm.bench_shapes()
    # per step: 6 layers x (q, k, v, out, up, down) plus the unembedding, each run three ways
    assert sum(count for *_, count in shapes.values()) == 6 * 6 + 1
    M, K, N, _ = shapes["mlp up"]
    assert cpu_gemm.operands("forward", M, K, N)[:2] == ((M, K), (K, N))
    assert cpu_gemm.operands("dX", M, K, N)[:2] == ((M, N), (K, N))
    assert cpu_gemm.operands("dW", M, K, N)[:2] == ((M, K), (M, N))


@pytest.fixture(scope="module")
def compiled_bench_step():
    args = bench.arguments(["--seq", "32", "--batch", "2", "--vocab", "512", "--no-torch"])
    trainer = bench.JaxTrainer(bench.model_config(args), args)
    return trainer.step.lower(trainer.state, trainer.batch).compile().as_text(), 2 * 32


def test_profile_buckets_a_compiled_step(compiled_bench_step):
    """Every kind of work a step does is found in the compiled HLO: forward, dX and dW matmuls,
    attention, the optimizer; and a linear layer's forward and gradients are told apart."""
    text, rows = compiled_bench_step
    lines, bodies = cpu_profile.hlo_instructions(text), cpu_profile.fused_bodies(text)
    buckets = {name: cpu_profile.jax_bucket(line, bodies, rows) for name, line in lines.items()}
    found = set(buckets.values())
    for bucket in ("forward matmul", "dX matmul", "dW matmul", "attention", "optimizer"):
        assert bucket in found, bucket
    assert found <= set(cpu_profile.BUCKETS)
    # the weight gradient of the MLP's up projection has the weight's shape, [384, 1536]
    dw_shapes = {re.match(r"\s*\w+\[([\d,]*)\]", lines[n]).group(1)
                 for n, b in buckets.items() if b == "dW matmul"}
    assert "384,1536" in dw_shapes or "1536,384" in dw_shapes


def test_default_xla_flags_keep_what_the_user_set():
    user = "--xla_gpu_enable_triton_gemm=true --xla_force_host_platform_device_count=8"
    flags = xla_flags.with_defaults(user)
    assert flags.startswith(user)  # the user's value stays, first and unchanged
    assert "--xla_gpu_enable_triton_gemm=false" not in flags
    assert flags.count("xla_gpu_enable_latency_hiding_scheduler") == 1
    assert xla_flags.with_defaults(flags) == flags  # applying twice adds nothing
    assert xla_flags.with_defaults("") == " ".join(
        f"--{k}={v}" for k, v in xla_flags.DEFAULTS.items())


def test_default_xla_flags_are_not_set_once_a_backend_runs(monkeypatch):
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_flags.apply() == "--xla_force_host_platform_device_count=8"


def test_commands_keep_compiled_programs_in_the_cache_folder(tmp_path):
    """$GENLAB_COMPILE_CACHE points JAX's persistent cache at a folder (a fresh process, as a
    command is); `off` turns it off; JAX's own variable wins."""
    assert compile_cache.enable({"GENLAB_COMPILE_CACHE": "off"}) == ""
    assert compile_cache.enable({"JAX_COMPILATION_CACHE_DIR": "/x",
                                 "GENLAB_COMPILE_CACHE": "off"}) == "/x"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    script = ("import jax, jax.numpy as jnp; from core import compile_cache; "
              "print(compile_cache.enable()); "
              "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
              "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, env={**env, "GENLAB_COMPILE_CACHE": str(tmp_path / "xla")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "xla")
    assert any(path.name.startswith("jit_") for path in (tmp_path / "xla").iterdir())


def test_an_operation_split_over_threads_counts_its_wall_time_once():
    assert cpu_profile.wall_time([(0, 10), (0, 10)]) == 10        # two threads, same span
    assert cpu_profile.wall_time([(0, 10), (5, 15), (20, 30)]) == 25
    assert cpu_profile.wall_time([(0, 10), (2, 3)]) == 10


def test_the_compiled_cpu_step_copies_few_bytes_per_layer():
    """XLA lays matmul operands out with explicit copies and transposes that PyTorch does not
    make. Per layer of the bench's step (B1 T256), the pure layout operations write 11
    activations' worth (B x T x D float32) today; attention's scores einsums without query
    blocks wrote 16. A change that brings copies back fails here."""
    args = bench.arguments(["--seq", "256", "--batch", "1", "--vocab", "512", "--no-torch"])
    cfg = bench.model_config(args)
    trainer = bench.JaxTrainer(cfg, args)
    text = trainer.step.lower(trainer.state, trainer.batch).compile().as_text()
    copies = cpu_profile.layout_copies(text)
    per_layer = sum(size for size, op_name in copies.values()
                    if re.search(r"/layers_\d+/", op_name)) / cfg.num_layers
    activation = args.batch * args.seq * cfg.d_model * 4
    assert 0 < per_layer <= 12 * activation, per_layer / activation
