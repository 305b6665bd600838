"""One entry point for every launcher: `python -m launch {local,tpu,slurm,aot,memory} ...`.

    local   one process, or N on this machine joined by jax.distributed (launch/local.py)
    tpu     Cloud TPU VMs through gcloud: create, copy, run on every worker, logs, delete
    slurm   an sbatch script that sruns the entry point on every task of a GPU cluster
    aot     compile the real train step for a target topology (v5e-256, 8xH100, ...) on this
            machine and report whether it fits each device's memory, as JSON
    memory  estimate a train step's memory per device from the config, line by line
            (parameters, gradients, optimiser state, activations, logits; LoRA, sharding)

Each takes --help; each launcher has --dry-run, which prints the exact commands and runs nothing.
"""
from __future__ import annotations

import importlib
import sys

from core import cli

COMMANDS = {"local": "launch.local", "tpu": "launch.tpu", "slurm": "launch.slurm",
            "aot": "launch.aot", "memory": "launch.memory"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        raise cli.UsageError(f"unknown launcher {argv[0]!r}; choose one of "
                             f"{', '.join(COMMANDS)} (python -m launch --help)")
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    cli.main_entry(main)
