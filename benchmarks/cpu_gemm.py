"""The matmuls of one training step of the CPU bench, in each XLA:CPU matmul library and in
torch.mm: which library to use is picked by measurement, not by flag name.

Every linear layer of the 6x384 bench (benchmarks/train_throughput.py's model, B16 x T256, so
M = 4,096 rows) runs three matmuls per step: forward y = x W, the input gradient dX = dY W^T and
the weight gradient dW = X^T dY, written as JAX's autodiff writes them (dot_general with the
contraction on the transposed side, no explicit transpose). Each library is a set of XLA flags,
which only take effect before the backend starts, so each runs in its own process; torch.mm runs
in this one. Each matmul is timed per call (at these sizes a call is tens of milliseconds, far
above dispatch), median of --repeats after a warm-up.

    python -m benchmarks.cpu_gemm --out benchmarks/results/cpu_gemm.json
Prints one JSON object: GFLOP/s per matmul and library, and each library's time for all the
step's matmuls (weighted by how often the step runs them) against torch.mm's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LIBRARIES = {  # name: XLA_FLAGS
    "xla_default": "",
    "xla_no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_xnnpack=false --xla_cpu_use_onednn=true",
    "onednn_custom_call": ("--xla_cpu_use_xnnpack=false "
                           "--xla_cpu_experimental_onednn_custom_call=true"),
}


def bench_shapes(layers: int = 6, width: int = 384, vocab: int = 8192, rows: int = 4096,
                 mlp: int = 4) -> dict[str, tuple[int, int, int, int]]:
    """name -> (M, K, N, times per step) of every linear layer's forward matmul; q, k and v as
    our model runs them (three matmuls) and fused (one, as the PyTorch peer runs them)."""
    return {"q|k|v|out": (rows, width, width, 4 * layers),
            "qkv fused": (rows, width, 3 * width, 0),
            "mlp up": (rows, width, mlp * width, layers),
            "mlp down": (rows, mlp * width, width, layers),
            "unembed": (rows, width, vocab, 1)}


def operands(kind: str, M: int, K: int, N: int) -> tuple[tuple, tuple, str]:
    """(shape a, shape b, contraction) of one of a layer's three matmuls."""
    return {"forward": ((M, K), (K, N), "ab"),       # X W
            "dX": ((M, N), (K, N), "abT"),            # dY W^T
            "dW": ((M, K), (M, N), "aTb")}[kind]      # X^T dY


KINDS = ("forward", "dX", "dW")


def matmuls():
    """(name, M*K*N, shape a, shape b, contraction) of every matmul timed: each layer's three."""
    for name, (M, K, N, _) in bench_shapes().items():
        for kind in KINDS:
            yield f"{name} {kind}", M * K * N, *operands(kind, M, K, N)


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jax(repeats: int) -> dict:
    import jax
    from jax import lax
    dims = {"ab": ((1,), (0,)), "abT": ((1,), (1,)), "aTb": ((0,), (0,))}
    out = {}
    for key, _, shape_a, shape_b, contraction in matmuls():
        a = jax.random.normal(jax.random.key(0), shape_a)
        b = jax.random.normal(jax.random.key(1), shape_b)
        matmul = jax.jit(lambda x, y, c=dims[contraction]: lax.dot_general(x, y, (c, ((), ()))))
        out[key] = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    return out


def time_torch(repeats: int) -> dict:
    import torch
    out = {}
    for key, _, shape_a, shape_b, contraction in matmuls():
        a, b = torch.randn(*shape_a), torch.randn(*shape_b)
        x, y = {"ab": (a, b), "abT": (a, b.t()), "aTb": (a.t(), b)}[contraction]
        out[key] = median_seconds(lambda: torch.mm(x, y), repeats)
    return out


def summary(seconds: dict) -> dict:
    """GFLOP/s per matmul, and the step's matmul seconds: our layout (q, k, v apart) and the
    same with q, k and v fused into one matmul."""
    shapes = bench_shapes()
    gflops = {key: 2 * size / seconds[key] / 1e9 for key, size, *_ in matmuls()}
    per_step = sum(seconds[f"{name} {kind}"] * count for name, (*_, count) in shapes.items()
                   for kind in KINDS)
    layers = shapes["mlp up"][3]
    fused = per_step + layers * sum(seconds[f"qkv fused {k}"] - 3 * seconds[f"q|k|v|out {k}"]
                                    for k in KINDS)
    return {"gflops": gflops, "step_matmul_seconds": per_step,
            "step_matmul_seconds_qkv_fused": fused}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.worker:  # one library: this process's XLA_FLAGS
        print(json.dumps(time_jax(args.repeats)))
        return {}
    from benchmarks.report import emit
    import torch
    result = {"shapes": {k: dict(zip(("M", "K", "N", "per_step"), v))
                         for k, v in bench_shapes().items()},
              "repeats": args.repeats, "flags": {}, "libraries": {}}
    for name in args.libraries.split(","):
        flags = LIBRARIES[name]
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([sys.executable, "-m", "benchmarks.cpu_gemm", "--worker",
                              "--repeats", str(args.repeats)], env=env, capture_output=True,
                             text=True)
        if run.returncode:
            result["libraries"][name] = {"error": run.stderr.strip().splitlines()[-1]}
            continue
        result["flags"][name] = flags
        result["libraries"][name] = summary(json.loads(run.stdout.strip().splitlines()[-1]))
        print(name, round(result["libraries"][name]["step_matmul_seconds"], 3), file=sys.stderr)
    result["libraries"]["torch.mm"] = summary(time_torch(args.repeats))
    result["torch_threads"] = torch.get_num_threads()
    torch_step = result["libraries"]["torch.mm"]["step_matmul_seconds"]
    result["step_matmul_seconds_over_torch"] = {
        name: r["step_matmul_seconds"] / torch_step
        for name, r in result["libraries"].items() if "step_matmul_seconds" in r}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
