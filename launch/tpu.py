"""Cloud TPU VMs with gcloud: create, copy the code, run the same command on every worker, stream
the logs, delete.

    python -m launch tpu all --name gpt2 --zone us-west4-a --project my-proj \
        --accelerator-type v5e-16 --spot -- train \
        --config experiments/configs/lm/gpt.py:size=gpt2_124m --workdir /mnt/shared/gpt2
    python -m launch tpu run --dry-run ...   # print the exact commands, run nothing

Actions: create (a TPU VM, or with --queued a queued resource), copy (the code), run (the entry
point on every worker, `--worker=all`; each worker also appends its output to REMOTE_DIR/run.log),
logs (follow one worker's run.log), delete, and all (create, copy, run, delete).

The code travels as `git archive HEAD` (committed files only: commit first), copied to every worker
with `tpu-vm scp --worker=all`, unpacked into REMOTE_DIR and installed with pip next to jax[tpu].
Each worker calls `jax.distributed.initialize()` with no arguments: jax reads the TPU VM's metadata.
--workdir must be a directory every worker sees (an NFS/Filestore or gcsfuse mount of a bucket):
checkpoints are written together by all workers and the run's files by worker 0; gs:// URLs are
not supported by the run's own files yet.
Multislice: `--node-count N` asks for N slices through a queued resource (nodes NAME-0 ...
NAME-N-1); the queued resource puts the MEGASCALE_* variables jax needs into each node's metadata.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import threading
import time

from core import cli
from core.config import UserError
from launch.local import NO_COMMAND, split_command

JAX_TPU = "jax[tpu]==0.10.2"  # the jax this project pins, with the libtpu built for it
# gcloud's accelerator-type prefix and the default TPU VM image of each generation.
GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5litepod": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", "v2-alpha-tpuv5"),
    "v6e": ("v6e", "v2-alpha-tpuv6e"),
}
FAILED_STATES = ("FAILED", "SUSPENDED")  # a queued resource that will never become ACTIVE
ACTIONS = ("create", "copy", "run", "logs", "delete", "all")


@dataclasses.dataclass(frozen=True)
class Step:
    """Commands that run at once (one per slice) and what a dry run says about them."""
    title: str
    commands: tuple[tuple[str, ...], ...]
    until: str = ""  # poll the (single) command until it prints this
    always: bool = False  # run even after an earlier step failed (deleting what costs money)


@dataclasses.dataclass(frozen=True)
class Cluster:
    name: str
    accelerator_type: str
    zone: str = ""
    project: str = ""
    version: str = ""
    spot: bool = False
    preemptible: bool = False
    queued: bool = False
    node_count: int = 1
    remote_dir: str = "genlab"

    def __post_init__(self):
        gcloud_type(self.accelerator_type)  # fails early on an unknown type
        if self.spot and self.preemptible:
            raise ValueError("--spot and --preemptible exclude each other; spot is the newer kind")
        if self.node_count < 1:
            raise ValueError(f"--node-count {self.node_count} must be at least 1")
        if self.preemptible and self.uses_queue:
            raise ValueError("queued resources take --spot, not --preemptible")

    @property
    def uses_queue(self) -> bool:
        return self.queued or self.node_count > 1

    @property
    def queued_id(self) -> str:
        return f"{self.name}-qr"

    @property
    def nodes(self) -> list[str]:
        if self.node_count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.node_count)]

    def where(self) -> list[str]:
        return ([f"--zone={self.zone}"] if self.zone else []) + (
            [f"--project={self.project}"] if self.project else [])

    def runtime_version(self) -> str:
        return self.version or GENERATIONS[self.accelerator_type.split("-")[0]][1]


def gcloud_type(accelerator_type: str) -> str:
    """gcloud's name for a slice: v5e-16 -> v5litepod-16; v4-32, v5p-128, v6e-64 unchanged."""
    generation, _, size = accelerator_type.partition("-")
    if generation not in GENERATIONS or not size.isdigit():
        raise ValueError(f"--accelerator-type {accelerator_type!r}: expected GENERATION-SIZE with "
                         f"GENERATION one of {sorted(GENERATIONS)}, e.g. v5e-16 or v4-32")
    return f"{GENERATIONS[generation][0]}-{size}"


TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")
QUEUED = ("gcloud", "compute", "tpus", "queued-resources")


def create_steps(c: Cluster) -> list[Step]:
    if not c.uses_queue:
        cmd = [*TPU_VM, "create", c.name, *c.where(),
               f"--accelerator-type={gcloud_type(c.accelerator_type)}",
               f"--version={c.runtime_version()}"]
        cmd += ["--spot"] if c.spot else ["--preemptible"] if c.preemptible else []
        return [Step("create the TPU VM", (tuple(cmd),))]
    nodes = ([f"--node-count={c.node_count}", f"--node-prefix={c.name}"] if c.node_count > 1
             else [f"--node-id={c.name}"])
    cmd = [*QUEUED, "create", c.queued_id, *nodes, *c.where(),
           f"--accelerator-type={gcloud_type(c.accelerator_type)}",
           f"--runtime-version={c.runtime_version()}", *(["--spot"] if c.spot else [])]
    wait = [*QUEUED, "describe", c.queued_id, *c.where(), "--format=value(state.state)"]
    return [Step("ask for the slices", (tuple(cmd),)),
            Step("wait until the queued resource is ACTIVE", (tuple(wait),), until="ACTIVE")]


def ssh(c: Cluster, node: str, command: str, worker: str = "all") -> tuple[str, ...]:
    return (*TPU_VM, "ssh", node, *c.where(), f"--worker={worker}", f"--command={command}")


def copy_steps(c: Cluster, archive: str) -> list[Step]:
    remote = f"{c.remote_dir}.tar.gz"
    unpack = (f"mkdir -p {shlex.quote(c.remote_dir)} && tar -xzf {remote} -C "
              f"{shlex.quote(c.remote_dir)} && cd {shlex.quote(c.remote_dir)} && "
              f"python3 -m pip install -q -e . {shlex.quote(JAX_TPU)}")
    return [
        Step("pack the committed code", (("git", "archive", "--format=tar.gz",
                                          f"--output={archive}", "HEAD"),)),
        Step("copy it to every worker", tuple(
            (*TPU_VM, "scp", archive, f"{node}:{remote}", *c.where(), "--worker=all")
            for node in c.nodes)),
        Step("unpack and install on every worker", tuple(ssh(c, n, unpack) for n in c.nodes)),
    ]


def remote_command(c: Cluster, entry_args: list[str], python: str = "python3") -> str:
    command = shlex.join([python, "-m", "experiments.main", *entry_args,
                          "--config.distributed.enabled=true"])
    return (f"cd {shlex.quote(c.remote_dir)} && set -o pipefail && "
            f"{command} 2>&1 | tee -a run.log")


def run_steps(c: Cluster, entry_args: list[str]) -> list[Step]:
    command = remote_command(c, entry_args)
    return [Step("run on every worker of every slice",
                 tuple(ssh(c, node, command) for node in c.nodes))]


def logs_steps(c: Cluster, worker: int = 0, slice_index: int = 0) -> list[Step]:
    if not 0 <= slice_index < c.node_count:
        raise ValueError(f"--slice {slice_index}: there are {c.node_count} slices")
    follow = f"tail -n 200 -F {shlex.quote(c.remote_dir)}/run.log"
    return [Step(f"follow worker {worker}'s log", (ssh(c, c.nodes[slice_index], follow,
                                                       str(worker)),))]


def delete_steps(c: Cluster) -> list[Step]:
    if c.uses_queue:
        cmd = (*QUEUED, "delete", c.queued_id, *c.where(), "--force", "--quiet")
    else:
        cmd = (*TPU_VM, "delete", c.name, *c.where(), "--quiet")
    return [Step("delete the TPU VMs", (cmd,), always=True)]


def plan(action: str, c: Cluster, entry_args: list[str], archive: str = "",
         worker: int = 0, slice_index: int = 0) -> list[Step]:
    """Every step of an action, in order."""
    archive = archive or f"/tmp/{c.name}-code.tar.gz"
    if action in ("run", "all") and not entry_args:
        raise ValueError(NO_COMMAND)
    steps = {"create": lambda: create_steps(c), "copy": lambda: copy_steps(c, archive),
             "run": lambda: run_steps(c, entry_args),
             "logs": lambda: logs_steps(c, worker, slice_index),
             "delete": lambda: delete_steps(c)}
    if action == "all":
        return [s for name in ("create", "copy", "run", "delete") for s in steps[name]()]
    return steps[action]()


def describe(steps: list[Step]) -> str:
    """The dry run: every command, shell-quoted, under a comment saying what it does."""
    lines = []
    for step in steps:
        note = (f" (repeated every 30 s until it prints {step.until})" if step.until else
                " (these run at once)" if len(step.commands) > 1 else "")
        lines.append(f"# {step.title}{note}")
        lines += [shlex.join(cmd) for cmd in step.commands]
    return "\n".join(lines)


def _stream(cmd: tuple[str, ...], prefix: str, codes: list, index: int) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
    codes[index] = proc.wait()


def _poll(cmd: tuple[str, ...], until: str, poll_seconds: float) -> int:
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True)
        state = out.stdout.strip()
        if out.returncode or state in FAILED_STATES:
            sys.stderr.write(out.stderr or f"state {state}\n")
            return out.returncode or 1
        if state == until:
            return 0
        print(f"  state {state or '?'}; waiting", flush=True)
        time.sleep(poll_seconds)


def execute(steps: list[Step], poll_seconds: float = 30.0) -> int:
    """Runs the steps in order, the commands of one step at once, their output streamed with a
    prefix per command. After a failure only the `always` steps (deletion) still run; returns the
    first failure's exit code."""
    failed = 0
    for step in steps:
        if failed and not step.always:
            continue
        print(f"# {step.title}", flush=True)
        if step.until:
            failed = failed or _poll(step.commands[0], step.until, poll_seconds)
            continue
        codes = [None] * len(step.commands)
        threads = [threading.Thread(target=_stream, args=(
            cmd, f"[{i}] " if len(step.commands) > 1 else "", codes, i))
            for i, cmd in enumerate(step.commands)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = failed or next((code for code in codes if code), 0)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m launch tpu ACTION [options] -- ENTRY_ARGS",
                                description=__doc__)
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--name", required=True, help="TPU VM name (node prefix for multislice)")
    parser.add_argument("--accelerator-type", required=True, help="e.g. v5e-16, v4-32, v6e-64")
    parser.add_argument("--zone", default="")
    parser.add_argument("--project", default="")
    parser.add_argument("--version", default="",
                        help="TPU VM runtime image (default: the generation's usual one)")
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--preemptible", action="store_true")
    parser.add_argument("--queued", action="store_true", help="create through a queued resource")
    parser.add_argument("--node-count", type=int, default=1, help="slices (multislice; queued)")
    parser.add_argument("--remote-dir", default="genlab", help="code directory on the workers")
    parser.add_argument("--archive", default="", help="local path of the code archive")
    parser.add_argument("--worker", type=int, default=0, help="logs: which worker")
    parser.add_argument("--slice", type=int, default=0, help="logs: which slice")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    own, entry = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if entry and args.action not in ("run", "all"):
        parser.error(f"{args.action} takes no command after --")
    try:
        cluster = Cluster(args.name, args.accelerator_type, args.zone, args.project, args.version,
                          args.spot, args.preemptible, args.queued, args.node_count,
                          args.remote_dir)
        steps = plan(args.action, cluster, entry, args.archive, args.worker, args.slice)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        print(describe(steps))
        return 0
    try:
        return execute(steps)
    except FileNotFoundError as error:
        raise UserError(f"{error.filename} was not found: install the Google Cloud CLI "
                        "(gcloud)") from None


if __name__ == "__main__":
    cli.main_entry(main)
