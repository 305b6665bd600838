"""Forward time and memory of full attention against the long-sequence variants of
lm/models/efficient_attention.py, as the sequence grows.

One layer's attention, B=1, N=K=4 heads of width 64, float32, non-causal (Linformer cannot be
causal, so all run as encoders), no padding. Variants: full (lm/models/attention.py),
sliding_window (window 256 each side + 4 global tokens), linformer (L=256), lsh (4 hashes,
64 buckets, chunks of 64 queries). Per point:
  memory  XLA's own account of the compiled function (memory_analysis: arguments + outputs +
          temporaries), known without running it: the peak the computation needs.
  time    median of --repeats jitted calls after one warm-up call (compilation excluded).
A point is not run (its memory is still reported, with the reason) when its temporaries reach
--max-temp-gib or the time extrapolated from the previous length (x4 per doubling for full
attention, x2 for the rest) exceeds --max-seconds. Timings on a shared machine are noisy: the
load average is recorded.

    python -m benchmarks.attention_scaling --out benchmarks/results/cpu_attention_scaling.json \
        --plot docs/attention_scaling.png
    python -m benchmarks.attention_scaling --lengths 512 1024 --repeats 2
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import emit
from lm.models import efficient_attention as ea

LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
N, H = 4, 64
WINDOW, NUM_GLOBAL = 256, 4
LINFORMER_L = 256
LSH = dict(n_hashes=4, n_buckets=64, chunk=64)
GROWTH = {"full": 4.0}  # time factor per doubling of T used to extrapolate; 2 for the others


def variant_calls(T: int, rng: np.random.Generator) -> dict[str, tuple]:
    """name -> (jitted function of the arrays, the arrays, the variant's settings)."""
    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    global_BT = np.zeros((1, T), bool)
    global_BT[0, np.linspace(0, T - 1, NUM_GLOBAL).astype(int)] = True
    e_SL = normal(T, LINFORMER_L, scale=LINFORMER_L ** -0.5)
    f_SL = normal(T, LINFORMER_L, scale=LINFORMER_L ** -0.5)
    return {
        "full": (lambda q, k, v: ea.full_attention(q, k, v, None, False), (), {}),
        "sliding_window": (
            lambda q, k, v, g: ea.sliding_window_attention(
                q, k, v, None, False, window=WINDOW, global_BT=g, max_global=NUM_GLOBAL),
            (jnp.asarray(global_BT),), {"window": WINDOW, "global_tokens": NUM_GLOBAL}),
        "linformer": (
            lambda q, k, v, e, f: ea.linformer_attention(q, k, v, None, False, e_SL=e, f_SL=f),
            (e_SL, f_SL), {"L": LINFORMER_L}),
        "lsh": (
            lambda q, k, v, key: ea.lsh_attention(q, k, v, None, False, rng_key=key, **LSH),
            (jax.random.key(0),), dict(LSH)),
    }


def measure(fn, args: tuple, repeats: int, max_temp: float, predicted_s: float | None,
            max_seconds: float) -> dict:
    """Compiles fn, reads its memory account and, unless a limit says skip, times it."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    point = {
        "compile_s": round(compile_s, 3),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }
    point["memory_bytes"] = point["temp_bytes"] + point["argument_bytes"] + point["output_bytes"]
    point["memory_mb"] = round(point["memory_bytes"] / 2 ** 20, 2)
    if mem.temp_size_in_bytes >= max_temp:
        point["skipped"] = (f"temporaries {mem.temp_size_in_bytes / 2 ** 30:.2f} GiB >= "
                            f"{max_temp / 2 ** 30:.0f} GiB; memory reported, not run")
        return point
    if predicted_s is not None and predicted_s * (repeats + 1) > max_seconds:
        point["skipped"] = (f"predicted {predicted_s:.1f} s per call x {repeats + 1} calls > "
                            f"{max_seconds:.0f} s; memory reported, not run")
        return point
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    point["time_ms"] = round(1e3 * statistics.median(times), 3)
    point["times_ms"] = [round(1e3 * t, 3) for t in times]
    return point


def run(lengths, repeats: int, max_temp_gib: float, max_seconds: float) -> dict:
    rng = np.random.default_rng(0)
    results: dict[str, dict] = {name: {} for name in ea.ATTENTION_VARIANTS}
    settings: dict[str, dict] = {}
    last: dict[str, tuple[int, float]] = {}  # name -> (T, seconds) of the last timed point
    for T in sorted(lengths):
        q = jnp.asarray(rng.standard_normal((1, T, N, H)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((1, T, N, H)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((1, T, N, H)), jnp.float32)
        for name, (fn, extra, config) in variant_calls(T, rng).items():
            settings[name] = config
            predicted = None
            if name in last:
                t_prev, s_prev = last[name]
                predicted = s_prev * GROWTH.get(name, 2.0) ** np.log2(T / t_prev)
            point = measure(fn, (q, k, v, *extra), repeats, max_temp_gib * 2 ** 30, predicted,
                            max_seconds)
            if "time_ms" in point:
                last[name] = (T, point["time_ms"] / 1e3)
            results[name][str(T)] = point
            print(f"T={T:6d} {name:15s} " + (f"{point['time_ms']:10.1f} ms" if "time_ms" in point
                                             else "   skipped   ")
                  + f" {point['memory_mb']:10.1f} MB", flush=True)
    return {"results": results, "settings": settings}


def plot(result: dict, path: str) -> None:
    """Two log-log panels, time and memory against T, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.6))
    all_lengths = sorted({int(t) for points in result["results"].values() for t in points})
    skip_label = "not run (memory only)"
    for name, points in result["results"].items():
        lengths = sorted(int(t) for t in points)
        timed = [t for t in lengths if "time_ms" in points[str(t)]]
        ax_t.plot(timed, [points[str(t)]["time_ms"] for t in timed], "o-", label=name)
        ax_m.plot(lengths, [points[str(t)]["memory_mb"] for t in lengths], "o-", label=name)
        skipped = [t for t in lengths if "skipped" in points[str(t)]]
        if skipped:
            ax_m.plot(skipped, [points[str(t)]["memory_mb"] for t in skipped], "x", color="black",
                      markersize=10, label=skip_label)
            skip_label = None
    for ax, title, label in (
            (ax_t, "forward time", "median ms per call"),
            (ax_m, "memory (XLA memory_analysis)", "MB: arguments + outputs + temporaries")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(all_lengths, [str(t) for t in all_lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    s = result["settings"]
    fig.suptitle(f"Attention forward on {result['device']} ({result['cpu_count']} cores): B=1, "
                 f"{N} heads x {H}, float32, non-causal\nsliding window "
                 f"{s['sliding_window']['window']} + {NUM_GLOBAL} global tokens; Linformer "
                 f"L={s['linformer']['L']}; LSH {s['lsh']['n_hashes']} hashes, "
                 f"{s['lsh']['n_buckets']} buckets, chunk {s['lsh']['chunk']}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-temp-gib", type=float, default=8.0,
                        help="skip running a point whose XLA temporaries reach this")
    parser.add_argument("--max-seconds", type=float, default=90.0,
                        help="skip running a point predicted to take longer (warm-up + repeats)")
    parser.add_argument("--out", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    start = time.perf_counter()
    result = run(args.lengths, args.repeats, args.max_temp_gib, args.max_seconds)
    result = {
        "benchmark": "attention_scaling",
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "shape": {"B": 1, "N": N, "K": N, "H": H, "dtype": "float32", "causal": False},
        "repeats": args.repeats,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - start, 1),
        **result,
    }
    if args.plot:
        plot(result, args.plot)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
