"""FLOP and MFU accounting.

MFU = achieved model FLOP/s / peak FLOP/s of the devices. Model FLOPs come from the task (for a
transformer 6N + 12·L·d·T per token, PaLM appendix B). Peak is the vendor's dense bf16 number for
accelerators; on CPU, where no such number is meaningful, it is measured: the best float32 matmul
rate this machine reaches.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip (DESIGN.md reference numbers).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12,
}


def known_peak_flops(device) -> float | None:
    kind = device.device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
        if name in kind:
            return peak
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 1024, dtype: str = "float32", repeats: int = 5,
                          chain: int = 4) -> float:
    """Best achieved FLOP/s of `chain` square matmuls run back to back inside one jit, on one
    local device (the measured peak). One matmul per call would time dispatch and the host
    round trip as much as the GEMM; a chain inside one program times the GEMMs."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    # scaled so that repeated products keep their magnitude (no overflow to inf on the way)
    a = jax.random.normal(key_a, (size, size), dtype)
    b = (jax.random.normal(key_b, (size, size), jnp.float32) / size ** 0.5).astype(dtype)

    @jax.jit
    def chained(x, w):
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x)

    chained(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chained(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * chain / best


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if override:
        return override, "config"
    device = jax.local_devices()[0]
    known = known_peak_flops(device)
    if known:
        return known, f"{device.device_kind} datasheet bf16"
    return measured_matmul_flops(), f"measured f32 matmul on {device.platform}"


def total_peak_flops(peak_per_device: float, num_devices: int | None = None) -> float:
    """Peak of the job's devices (default: all). CPU "devices" (often simulated) share one host's
    cores, and the measured CPU peak is already the host's, so CPU counts hosts, accelerators
    count the chips the mesh uses."""
    if jax.devices()[0].platform == "cpu":
        return peak_per_device * jax.process_count()
    return peak_per_device * (num_devices or jax.device_count())


def xla_flops(fn, *abstract_args) -> float:
    """FLOPs of `fn(*args)` as XLA's cost analysis counts them (a multiply-add is 2), from the
    lowered program without compiling it. A scanned loop's body is counted once: unroll layers
    (scan_layers=False) before counting a scanned model."""
    cost = jax.jit(fn).lower(*abstract_args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0
