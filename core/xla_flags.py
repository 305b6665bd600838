"""XLA flags every command starts with, set once before the backend starts.

XLA reads XLA_FLAGS when the first backend initialises, so these are added to the environment by
`core.cli.main_entry` before a command runs. A flag the user already set is left as it is.
Every flag here is measured (docs/performance.md); GPU flags are inert on other platforms. The
CPU has none: no XLA:CPU matmul library beat the default on the CPU bench's step.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

DEFAULTS = {
    # cuBLAS GEMMs instead of Triton's: +10% tokens/s for GPT-2 124M on an H100
    "xla_gpu_enable_triton_gemm": "false",
    # overlaps collectives with compute on multi-GPU meshes (MaxText's GPU default)
    "xla_gpu_enable_latency_hiding_scheduler": "true",
}


def with_defaults(flags: str, defaults: dict[str, str] = DEFAULTS) -> str:
    """`flags` with every default it does not name appended."""
    named = {part.lstrip("-").split("=", 1)[0] for part in flags.split()}
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in named]
    return " ".join([flags.strip(), *extra]).strip()


def apply(environ=os.environ) -> str:
    """Adds the defaults to XLA_FLAGS, unless a backend has already started (then they could no
    longer take effect, and the environment is left alone). Returns XLA_FLAGS."""
    from jax._src import xla_bridge  # no public way to ask whether a backend started
    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        log.warning("XLA backend already started; default XLA flags not applied")
        return environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""))
    return environ["XLA_FLAGS"]
