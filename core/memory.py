"""Ahead-of-time compilation and the memory check that runs before step 1.

A run that will not fit fails in seconds with the number of bytes it needs per device, instead
of an out-of-memory crash an hour in (MaxText's train_compile does the same).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax

from core.config import UserError

log = logging.getLogger(__name__)

GIB = 1024 ** 3


class OutOfMemoryError(UserError, RuntimeError):
    """The compiled step needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Bytes live at once: inputs, outputs not donated into inputs, scratch and code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    def summary(self) -> str:
        return (f"{self.peak_bytes / GIB:.3f} GiB per device (arguments "
                f"{self.argument_bytes / GIB:.3f}, outputs {self.output_bytes / GIB:.3f}, "
                f"donated {self.alias_bytes / GIB:.3f}, temporaries {self.temp_bytes / GIB:.3f})")


def memory_report(compiled) -> MemoryReport | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return MemoryReport(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        code_bytes=int(getattr(analysis, "generated_code_size_in_bytes", 0)),
    )


def device_memory_bytes(device=None) -> int:
    """Usable memory of one device: the allocator's limit, or host RAM shared by CPU devices."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise rather than return None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, jax.local_device_count())


def compile_and_check(jitted, *abstract_args, limit_bytes: int = 0, what: str = "train step"):
    """Lowers and compiles ahead of time, logs the memory, and stops if it will not fit."""
    compiled = jitted.lower(*abstract_args).compile()
    report = memory_report(compiled)
    if report is None:
        log.info("%s compiled; this backend reports no memory analysis", what)
        return compiled, None
    limit = limit_bytes or device_memory_bytes()
    log.info("%s compiled: needs %s; device has %.3f GiB", what, report.summary(), limit / GIB)
    if report.peak_bytes > limit:
        raise OutOfMemoryError(
            f"the {what} needs {report.peak_bytes / GIB:.3f} GiB per device but only "
            f"{limit / GIB:.3f} GiB is available ({report.summary()}). Lower "
            "train.global_batch_size, raise train.microbatches, set model.remat='full', "
            "use bfloat16 compute, or shard more (mesh.ici.fsdp / mesh.ici.tensor).")
    return compiled, report
