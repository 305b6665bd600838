"""Multi-host start-up and the assembly of global batches from process-local data.

`jax.distributed.initialize()` gets its coordinator, process count and process id from one
explicit, tested choice (`initialize_kwargs`): values set in the config win; else a SLURM job's
variables; else nothing, and jax detects the platform itself (Cloud TPU metadata on a TPU VM).

Each process loads only its rows of every global batch; `jax.make_array_from_process_local_data`
stitches them into one sharded array, so the step sees the global batch.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Mapping

import jax
import ml_collections
from jax.sharding import NamedSharding

from core.config import ConfigError

log = logging.getLogger(__name__)


# --- SLURM -----------------------------------------------------------------------------------
SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets: "a[1-2,5],b" -> ["a[1-2,5]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"SLURM nodelist {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"SLURM nodelist {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range_set(body: str, nodelist: str) -> list[str]:
    """"01-03,07" -> ["01", "02", "03", "07"], keeping the zero padding of each range."""
    values = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"SLURM nodelist {nodelist!r}: cannot read range {item!r}")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ConfigError(f"SLURM nodelist {nodelist!r}: range {item!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a SLURM hostlist, in order, as `scontrol show hostnames` prints them:
    "gpu-[01-03,07]" -> gpu-01 gpu-02 gpu-03 gpu-07; "rack[1-2]-n[1-2]" -> 4 hosts."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        expanded = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            suffixes = _expand_range_set(body, nodelist) if body else [""]
            expanded = [f"{head}{literal}{tail}" for head in expanded for tail in suffixes]
        hosts.extend(expanded)
    if not hosts:
        raise ConfigError(f"SLURM nodelist {nodelist!r} names no host")
    return hosts


def slurm_port(job_id: str) -> int:
    """The coordinator port every task of a job derives alike (jax's own rule, in 61440..65535)."""
    return int(job_id) % 2 ** 12 + (65535 - 2 ** 12 + 1)


def _slurm_values(env: Mapping[str, str], port: int) -> dict:
    nodelist_var = next((v for v in SLURM_NODELIST_VARS if env.get(v)), None)
    needed = {"SLURM_NTASKS": env.get("SLURM_NTASKS"), "SLURM_PROCID": env.get("SLURM_PROCID"),
              "SLURM_STEP_NODELIST or SLURM_JOB_NODELIST": nodelist_var}
    if not port:
        needed["SLURM_JOB_ID (or set distributed.coordinator_port)"] = env.get("SLURM_JOB_ID")
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise ConfigError(f"a SLURM job was detected but {', '.join(missing)} is not set: run the "
                          "command under srun (python -m launch slurm writes such a script), or "
                          "set --config.distributed.coordinator_address/num_processes/process_id")
    hosts = expand_nodelist(env[nodelist_var])
    kwargs = {"coordinator_address": f"{hosts[0]}:{port or slurm_port(env['SLURM_JOB_ID'])}",
              "num_processes": int(env["SLURM_NTASKS"]), "process_id": int(env["SLURM_PROCID"])}
    # Several tasks on one node (one per GPU): each task drives the GPU of its local rank.
    if kwargs["num_processes"] > len(hosts) and env.get("SLURM_LOCALID"):
        kwargs["local_device_ids"] = [int(env["SLURM_LOCALID"])]
    return kwargs


def initialize_kwargs(cfg: ml_collections.ConfigDict,
                      env: Mapping[str, str]) -> tuple[str, dict]:
    """(where the values came from, kwargs for jax.distributed.initialize).

    Explicit config values win field by field; the rest come from SLURM when the environment is a
    SLURM job step; otherwise they are left out and jax detects them (TPU VM metadata, ...).
    When the values are ours, jax's own detection is switched off: under SLURM it would otherwise
    show each process only the GPU of its local rank, even a process that owns the whole node."""
    explicit = {}
    if cfg.coordinator_address:
        explicit["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        explicit["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        explicit["process_id"] = cfg.process_id
    ours = {"cluster_detection_method": "deactivate"}
    if len(explicit) == 3:
        return "config", {**explicit, **ours}
    if "SLURM_JOB_ID" in env or "SLURM_PROCID" in env:
        return "slurm", {**_slurm_values(env, cfg.get("coordinator_port", 0)), **explicit, **ours}
    return ("config" if explicit else "auto"), explicit


# --- start-up --------------------------------------------------------------------------------
class ProcessLogFilter(logging.Filter):
    """Tags every record with its process (`record.process_index`, and a "[process i/n] " prefix
    on the message) and, unless told otherwise, lets only process 0 log below WARNING."""

    def __init__(self, index: int, count: int, all_processes: bool = False):
        super().__init__()
        self.index, self.count, self.all_processes = index, count, all_processes

    def filter(self, record: logging.LogRecord) -> bool:
        if self.index and not self.all_processes and record.levelno < logging.WARNING:
            return False
        if not hasattr(record, "process_index"):
            record.process_index = self.index
            record.msg = f"[process {self.index}/{self.count}] {record.msg}"
        return True


def install_process_logging(index: int, count: int, all_processes: bool = False,
                            logger: logging.Logger | None = None) -> ProcessLogFilter:
    """Puts a ProcessLogFilter on every handler of `logger` (the root logger by default)."""
    log_filter = ProcessLogFilter(index, count, all_processes)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(log_filter)
    return log_filter


def maybe_initialize(cfg: ml_collections.ConfigDict,
                     env: Mapping[str, str] | None = None) -> None:
    """Joins the process group when the launch asks for it; a no-op for one process."""
    if cfg.local_device_count:
        jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
    if not cfg.enabled:
        return
    source, kwargs = initialize_kwargs(cfg, os.environ if env is None else env)
    jax.distributed.initialize(**kwargs)
    if jax.process_count() > 1:
        install_process_logging(jax.process_index(), jax.process_count(),
                                cfg.get("log_all_processes", False))
    log.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(),
             jax.process_count(), source, jax.local_device_count(), jax.device_count())


def global_batch(local_batch: dict, shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Stitches every process's rows into global arrays laid out by `shardings`."""
    return {name: jax.make_array_from_process_local_data(shardings[name], value)
            for name, value in local_batch.items()}
