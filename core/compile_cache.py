"""Compiled XLA programs kept on disk between commands (JAX's persistent compilation cache).

A command compiles the same programs every time it runs: the next checkpoint's evaluation, a
resumed run, a sweep's next trial, the demo again. From the cache they load instead
(docs/performance.md times whole evaluation tasks both ways). An entry's key holds the program,
the jax and jaxlib versions, the backend and the XLA flags, so a stale entry is never used, and
an unreadable one is recompiled with a warning. The tests keep their own (tests/conftest.py).
"""
from __future__ import annotations

import os

from core import packages

OFF = ("off", "0", "false", "no")
# JAX's default of 1 s kept only 8 of the 27 ARC-Easy programs of an earlier scorer; 0.2 s kept all
MIN_COMPILE_SECONDS = 0.2


def enable(environ=os.environ) -> str:
    """Turns the cache on at $GENLAB_COMPILE_CACHE (default <cache root>/xla; `off` disables
    it). JAX_COMPILATION_CACHE_DIR, JAX's own setting, wins where set. Returns the folder, or
    "" when off."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    setting = environ.get("GENLAB_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF:
        return ""
    import jax
    folder = os.path.expanduser(setting) if setting else str(packages.cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder
