"""What every benchmark ends with: its result as one JSON object on stdout, and in --out, with
the environment it was measured in (library versions, XLA and JAX flags, the devices), so a
number can be traced to what produced it."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

from core import metrics

# Versions recorded when installed (the distribution names of the registry packages).
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
            "orbax-checkpoint", "numpy", "torch", "transformers", "faiss-cpu", "bm25s",
            "lm-eval", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")
# Environment variables that change what XLA, JAX or the frameworks' thread pools do.
FLAG_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TF_CPP_", "NCCL_", "CUDA_VISIBLE", "OMP_", "MKL_",
                 "TORCH_", "TORCHINDUCTOR_")


def git_commit() -> str:
    """The checked-out commit, with "+changes" when the tree differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def environment() -> dict:
    """Versions, flags and devices of this process."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    env = {"versions": versions,
           "flags": {k: v for k, v in sorted(os.environ.items()) if k.startswith(FLAG_PREFIXES)},
           "host": {"machine": platform.machine(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "git_commit": git_commit(),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    if "jax" in sys.modules:  # never start a backend only to describe it
        import jax
        devices = jax.devices()
        env["jax_devices"] = {"platform": devices[0].platform, "kind": devices[0].device_kind,
                              "count": len(devices), "processes": jax.process_count(),
                              "runtime": getattr(devices[0].client, "platform_version", "")}
    if "torch" in sys.modules:
        import torch
        env["torch_runtime"] = {"threads": torch.get_num_threads(), "cuda": torch.version.cuda,
                                "cudnn": torch.backends.cudnn.version()
                                if torch.backends.cudnn.is_available() else None}
    return env


def emit(result: dict, out: str = "") -> dict:
    result = {**result, "environment": result.get("environment") or environment()}
    metrics.emit(result, out)
    return result
