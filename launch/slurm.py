"""Multi-node GPU training on a SLURM cluster: one sbatch script whose body runs the same
`python -m experiments.main ...` on every task with srun.

Each task finds its coordinator (the job's first host), the process count and its process id in
the SLURM_* variables (core/distributed.initialize_kwargs), so the script passes nothing but
`--config.distributed.enabled=true`. One task per node owns all of that node's GPUs by default;
`--tasks-per-node` equal to `--gpus-per-node` gives one task per GPU instead.
    python -m launch slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 --partition gpu \
        --account myproj -- train --config experiments/configs/lm/gpt.py:size=gpt2_124m \
        --workdir /shared/runs/gpt2
    python -m launch slurm --dry-run ...   # print the script and the sbatch command only
The repository and the workdir must be on a file system every node sees.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

from core import cli
from core.config import UserError
from launch.local import NO_COMMAND, split_command

_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")


def script(entry_args: list[str], *, nodes: int, gpus_per_node: int, time: str,
           job_name: str = "genlab", tasks_per_node: int = 1, partition: str = "",
           account: str = "", output: str = "", port: int = 0, python: str = "",
           workdir: str = "", setup: str = "") -> str:
    """The sbatch script: resource requests, then one srun of the entry point on every task."""
    if nodes < 1 or gpus_per_node < 0 or tasks_per_node < 1:
        raise ValueError(f"--nodes ({nodes}) and --tasks-per-node ({tasks_per_node}) must be at "
                         f"least 1 and --gpus-per-node ({gpus_per_node}) at least 0")
    if gpus_per_node and tasks_per_node not in (1, gpus_per_node):
        raise ValueError(f"--tasks-per-node {tasks_per_node}: use 1 (one process per node, all "
                         f"its GPUs) or {gpus_per_node} (one process per GPU)")
    if not _TIME.match(time):
        raise ValueError(f"--time {time!r}: use SLURM's forms, e.g. 30, 04:00:00 or 2-00:00:00")
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={tasks_per_node}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    lines.append(f"#SBATCH --time={time}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines.append(f"#SBATCH --output={output or 'slurm-%x-%j.out'}")
    lines += ["", "set -euo pipefail"]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)}")
    if setup:
        lines.append(setup)
    command = [python or sys.executable, "-m", "experiments.main", *entry_args,
               "--config.distributed.enabled=true"]
    if port:
        command.append(f"--config.distributed.coordinator_port={port}")
    lines += ["# Every task reads its coordinator (first host of SLURM_JOB_NODELIST), process",
              "# count (SLURM_NTASKS) and id (SLURM_PROCID) in core/distributed.py.",
              "srun --kill-on-bad-exit=1 " + shlex.join(command), ""]
    return "\n".join(lines)


def sbatch_command(script_path: str) -> list[str]:
    return ["sbatch", script_path]


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m launch slurm [options] -- ENTRY_ARGS",
                                description=__doc__)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--tasks-per-node", type=int, default=1)
    parser.add_argument("--time", required=True, help="wall-clock limit, e.g. 04:00:00")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--job-name", default="genlab")
    parser.add_argument("--output", default="", help="log file pattern (default slurm-%%x-%%j.out)")
    parser.add_argument("--port", type=int, default=0,
                        help="coordinator port (0: derived from the job id)")
    parser.add_argument("--python", default="", help="interpreter on the nodes (default: this one)")
    parser.add_argument("--chdir", default=os.getcwd(), help="directory the tasks run in")
    parser.add_argument("--setup", default="", help="shell line run before srun, e.g. module load")
    parser.add_argument("--script-path", default="",
                        help="where to write the script (default runs/slurm/JOB_NAME.sbatch)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script and the sbatch command; submit nothing")
    own, entry = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not entry:
        parser.error(NO_COMMAND)
    try:
        text = script(entry, nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                      job_name=args.job_name, tasks_per_node=args.tasks_per_node,
                      partition=args.partition, account=args.account, output=args.output,
                      port=args.port, python=args.python, workdir=args.chdir, setup=args.setup)
    except ValueError as error:
        parser.error(str(error))
    path = args.script_path or str(pathlib.Path(args.chdir) / "runs" / "slurm"
                                   / f"{args.job_name}.sbatch")
    if args.dry_run:
        print(f"# {path}\n{text}")
        print(shlex.join(sbatch_command(path)))
        return 0
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text)
    try:
        return subprocess.call(sbatch_command(path))
    except FileNotFoundError:
        raise UserError(f"sbatch was not found on this machine; the script is in {path}") from None


if __name__ == "__main__":
    cli.main_entry(main)
