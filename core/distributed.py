"""Multi-host start-up and the assembly of global batches from process-local data.

Each process loads only its rows of every global batch; `jax.make_array_from_process_local_data`
stitches them into one sharded array, so the step sees the global batch.
"""
from __future__ import annotations

import logging

import jax
import ml_collections
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)


def distributed_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "enabled": False,            # call jax.distributed.initialize() at start
        "coordinator_address": "",   # "" = from the environment (TPU metadata, SLURM, ...)
        "num_processes": 0,          # 0 = from the environment
        "process_id": -1,            # -1 = from the environment
        "local_device_count": 0,     # CPU only: simulated devices per process (tests)
    })


def maybe_initialize(cfg: ml_collections.ConfigDict) -> None:
    """Joins the process group when the launch asks for it; a no-op for one process."""
    if cfg.local_device_count:
        jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
    if not cfg.enabled:
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def global_batch(local_batch: dict, shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Stitches every process's rows into global arrays laid out by `shardings`."""
    return {name: jax.make_array_from_process_local_data(shardings[name], value)
            for name, value in local_batch.items()}
