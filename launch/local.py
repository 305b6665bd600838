"""Single-host launcher: one process, or N processes on this machine joined by jax.distributed.

Several processes on one machine are how multi-host code is tested without a cluster: each gets
its own simulated CPU devices and a process id, and they meet at a coordinator on localhost.
    python -m launch local --processes 2 --devices-per-process 2 -- \
        train --config experiments/configs/lm/gpt.py:size=tiny --workdir runs/two
    python -m launch local --dry-run --processes 2 -- train ...   # print the commands only
(`python -m launch.local ...` is the same command.)
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile

from core import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_COMMAND = ("give the command to run after --, e.g. -- train --config "
              "experiments/configs/lm/gpt.py:size=tiny --workdir runs/tiny")


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the experiments.main arguments after the first `--`)."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return list(argv[:cut]), list(argv[cut + 1:])


def split_entry_args(parser: argparse.ArgumentParser, rest: list[str]) -> list[str]:
    """The experiments.main arguments after `--`; an error if there are none."""
    entry = rest[1:] if rest[:1] == ["--"] else rest
    if not entry:
        parser.error(NO_COMMAND)
    return entry


def commands(entry_args: list[str], processes: int, devices_per_process: int,
             port: int) -> list[list[str]]:
    """The exact command line of every process."""
    base = [sys.executable, "-m", "experiments.main", *entry_args]
    if processes == 1:
        return [base]
    return [[*base, "--config.distributed.enabled=true",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             f"--config.distributed.num_processes={processes}",
             f"--config.distributed.process_id={rank}",
             f"--config.distributed.local_device_count={devices_per_process}"]
            for rank in range(processes)]


def launch(entry_args: list[str], processes: int = 1, devices_per_process: int = 1,
           port: int = 0, env: dict | None = None, cwd: str | None = None,
           timeout: float | None = None) -> list[subprocess.CompletedProcess]:
    """Runs every process to completion and returns what each printed."""
    env = dict(os.environ if env is None else env)
    env.pop("XLA_FLAGS", None)  # each process sets its own device count
    cmds = commands(entry_args, processes, devices_per_process, port or free_port())
    # Output goes to files, not pipes: a full pipe would stall one process inside a collective
    # while we wait on another.
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/{rank}.out", "w+"), open(f"{logs}/{rank}.err", "w+"))
                 for rank in range(len(cmds))]
        procs = [subprocess.Popen(cmd, env=env, cwd=cwd, text=True, stdout=out, stderr=err)
                 for cmd, (out, err) in zip(cmds, files)]
        results = []
        for cmd, proc, (out, err) in zip(cmds, procs, files):
            proc.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
            out.close()
            err.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m launch local", description=__doc__)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("entry_args", nargs=argparse.REMAINDER,
                        help="-- then the arguments of experiments.main")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be at least 1")
    entry = split_entry_args(parser, args.entry_args)
    if args.dry_run:
        for cmd in commands(entry, args.processes, args.devices_per_process, args.port or 12345):
            print(shlex.join(cmd))
        return 0
    results = launch(entry, args.processes, args.devices_per_process, args.port)
    for rank, result in enumerate(results):
        sys.stdout.write(result.stdout if rank == 0 else "")
        if result.returncode:
            sys.stderr.write(f"--- process {rank} exited {result.returncode} ---\n{result.stderr}")
    return max(r.returncode for r in results)


if __name__ == "__main__":
    cli.main_entry(main)
