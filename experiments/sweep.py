"""Sweeps: the members of a `get_sweep(arg)` beside a config, run one after another or N at a time.

A config file may define `get_sweep(arg)` returning a list of members, each a dict of overrides
built from axes with `product` and `zipped`:

    def get_sweep(arg):
        return product(axis("model.pos_emb", ["learned", "rope"]),
                       axis("model.norm", ["layernorm", "rmsnorm"]))

A key is a config key (`train.steps`) or, with the prefix `arg.`, a field of the config file's own
argument (`arg.depth` runs `scaling.py:depth=...`): that is how one knob that derives several
fields (a model size, a token budget) is swept. Every member trains in WORKDIR/<name> with
`python -m experiments.main train`. A member whose summary says it reached its step count is
skipped; one with checkpoints but no finished summary resumes; every member is checked against
its config before anything runs, so a typo fails in seconds rather than after the first members.

    python -m experiments.sweep --config experiments/configs/lm/gpt.py:size=small \\
        --workdir runs/ablation [--parallel 2] [--metric eval_loss] [--dry-run] \\
        [--processes 2 --devices-per-process 2] [--config.train.steps=100 ...]

The table (sweep.csv, sweep.json) and one plot per swept axis (PNG) are written to WORKDIR.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

from core import cli
from core.config import ConfigError, load_config, load_config_module

log = logging.getLogger(__name__)
ARG_PREFIX = "arg."


# ---------------------------------------------------------------- defining a sweep

def axis(key: str, values: Iterable[Any]) -> list[dict[str, Any]]:
    """One swept key: a member per value."""
    values = list(values)
    if not values:
        raise ConfigError(f"sweep axis {key!r} has no values")
    return [{key: value} for value in values]


def _merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        clash = merged.keys() & part.keys()
        if clash:
            raise ConfigError(f"sweep key(s) {sorted(clash)} are set by two axes")
        merged.update(part)
    return merged


def product(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' members (the first axis varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*axes)]


def zipped(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The axes' members taken together, position by position (all axes equally long)."""
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ConfigError(f"zipped sweep axes have different lengths {sorted(lengths)}")
    return [_merge(combo) for combo in zip(*axes)]


# ---------------------------------------------------------------- members

def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    overrides: dict[str, Any]
    config_spec: str          # path.py:arg with the member's arg.* fields merged in
    config_overrides: tuple[str, ...]  # --config.key=value

    @functools.cached_property
    def config(self):
        """The member's loaded config (loaded once: validation and status both read it)."""
        return load_config(self.config_spec, self.config_overrides)

    def entry_args(self, workdir: pathlib.Path) -> list[str]:
        """The arguments of `python -m experiments.main` that train this member."""
        return ["train", "--config", self.config_spec, "--workdir", str(workdir),
                *self.config_overrides]


def _parse_arg(arg: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in arg.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"config argument {arg!r} is not key=value,key=value")
    return dict(pairs)


def member_names(members: Sequence[dict[str, Any]]) -> list[str]:
    """Directory names from the swept values: the last part of each key, or the whole key where
    two keys share a last part."""
    keys = list(dict.fromkeys(k for m in members for k in m))
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k.replace(ARG_PREFIX, "", 1) for k in keys}
    names = []
    for member in members:
        name = ",".join(f"{short[k]}={_text(v)}" for k, v in member.items()) or "base"
        names.append(re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name))
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"sweep members repeat: {sorted(dupes)}; every member must differ")
    return names


def build_members(config_spec: str, members: Sequence[dict[str, Any]],
                  common_overrides: Sequence[str] = ()) -> list[Member]:
    path, _, base_arg = config_spec.partition(":")
    result = []
    for name, overrides in zip(member_names(members), members):
        arg = _parse_arg(base_arg)
        config_overrides = list(common_overrides)
        for key, value in overrides.items():
            if key.startswith(ARG_PREFIX):
                arg[key[len(ARG_PREFIX):]] = _text(value)
            else:
                config_overrides.append(f"--config.{key}={_text(value)}")
        spec = path + (":" + ",".join(f"{k}={v}" for k, v in arg.items()) if arg else "")
        result.append(Member(name, dict(overrides), spec, tuple(config_overrides)))
    return result


def load_sweep(config_spec: str, common_overrides: Sequence[str] = ()) -> list[Member]:
    """The members of the config file's get_sweep(arg), each checked by loading its config."""
    module, path, arg = load_config_module(config_spec)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{path} defines no get_sweep(arg); a sweep is a get_sweep() returning "
                          "the list of override dicts, beside get_config()")
    members = build_members(config_spec, module.get_sweep(arg), common_overrides)
    if not members:
        raise ConfigError(f"{path}: get_sweep({arg!r}) returned no members")
    for member in members:
        try:
            member.config
        except ConfigError as error:
            raise ConfigError(f"sweep member {member.name}: {error}") from None
    return members


# ---------------------------------------------------------------- running

def _config_changes(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ; a key the saved run lacks is a field added to the code since,
    which a resume takes at its default, so it is not a change."""
    keys = []
    for key in sorted(saved.keys()):
        a, b = saved[key], wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, (list, tuple))
                             and list(a) == [list(x) if isinstance(x, tuple) else x for x in b]):
            keys.append(f"{prefix}{key}")
    return keys


def status(member: Member, workdir: pathlib.Path) -> str:
    """finished (reached its configured steps), interrupted (has checkpoints) or new.

    A member directory that holds a run of another config is an error, never a silent skip or a
    resume: the sweep's name for it would describe a run it is not."""
    config = member.config
    saved = workdir / "config.json"
    if saved.is_file():
        # train.steps may grow (a longer horizon resumes); the process layout may change; a
        # resumed run records the tokenizer it saved in its workdir where none was given.
        wanted = json.loads(config.to_json_best_effort())
        changed = [k for k in _config_changes(json.loads(saved.read_text()), wanted)
                   if k != "train.steps" and not k.startswith("distributed.")
                   and not (k == "data.tokenizer.path"
                            and not wanted.get("data", {}).get("tokenizer", {}).get("path"))]
        if changed:
            raise ConfigError(f"{workdir} holds a run whose config differs from sweep member "
                              f"{member.name} in {changed}; use another --workdir for a changed "
                              "sweep (nothing was run or deleted)")
    summary = workdir / "summary.json"
    if summary.is_file():
        if json.loads(summary.read_text()).get("step", 0) >= config.train.steps:
            return "finished"
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return "interrupted"
    return "new"


def member_commands(member: Member, workdir: pathlib.Path, processes: int = 1,
                    devices_per_process: int = 1) -> list[list[str]]:
    """One command per process (launch.local joins several with jax.distributed)."""
    from launch import local
    return local.commands(member.entry_args(workdir), processes, devices_per_process,
                          local.free_port() if processes > 1 else 0)


def run(members: Sequence[Member], root: pathlib.Path, parallel: int = 1, processes: int = 1,
        devices_per_process: int = 1, dry_run: bool = False) -> dict[str, str]:
    """Runs every unfinished member, `parallel` at a time; returns each member's outcome."""
    outcomes: dict[str, str] = {}
    pending = []
    states = [status(member, root / member.name) for member in members]  # all checked first
    for member, state in zip(members, states):
        if state == "finished":
            outcomes[member.name] = "skipped (finished)"
            log.info("%s: finished, skipped", member.name)
        else:
            pending.append((member, state))
    if dry_run:
        for member, state in pending:
            for cmd in member_commands(member, root / member.name, processes, devices_per_process):
                print(f"# {member.name} ({state})\n{shlex.join(cmd)}")
        return {**outcomes, **{m.name: f"dry run ({s})" for m, s in pending}}
    env = dict(os.environ)
    if processes > 1:
        env.pop("XLA_FLAGS", None)  # each process sets its own device count
    running: list[tuple[Member, list[subprocess.Popen], list]] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                member, state = pending.pop(0)
                workdir = root / member.name
                workdir.mkdir(parents=True, exist_ok=True)
                log.info("%s: %s", member.name, "resuming" if state == "interrupted" else "starting")
                cmds = member_commands(member, workdir, processes, devices_per_process)
                logs = [open(workdir / (f"train.{rank}.log" if processes > 1 else "train.log"),
                             "a") for rank in range(len(cmds))]
                procs = [subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
                         for cmd, f in zip(cmds, logs)]
                running.append((member, procs, logs))
            time.sleep(0.2)
            for entry in list(running):
                member, procs, logs = entry
                if any(p.poll() is None for p in procs):
                    continue
                running.remove(entry)
                for f in logs:
                    f.close()
                codes = [p.returncode for p in procs]
                ok = all(c == 0 for c in codes)
                outcomes[member.name] = "trained" if ok else f"failed (exit {codes})"
                (log.info if ok else log.error)(
                    "%s: %s; log in %s", member.name, outcomes[member.name], root / member.name)
    finally:
        for _, procs, _ in running:  # Ctrl-C: members checkpoint on SIGTERM and can resume
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="a config file with get_sweep(), [:arg]")
    parser.add_argument("--workdir", required=True, help="members train in WORKDIR/<name>")
    parser.add_argument("--parallel", type=int, default=1, help="members run at once")
    parser.add_argument("--metric", default="eval_loss", help="the summary field to plot")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes per member (jax.distributed on localhost)")
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--only", default="", help="a regular expression: run and tabulate only "
                        "the members whose name it matches")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild table and plots")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if args.parallel < 1 or args.processes < 1:
        parser.error("--parallel and --processes must be at least 1")
    from experiments import sweep_table
    root = pathlib.Path(args.workdir)
    try:
        only = re.compile(args.only)
    except re.error as error:
        raise ConfigError(f"--only {args.only!r} is not a regular expression ({error})") from None
    members = [m for m in load_sweep(args.config, rest) if only.search(m.name)]
    if not members:
        raise ConfigError(f"--only {args.only!r} matches no member of the sweep")
    outcomes = {} if args.collect_only else run(
        members, root, args.parallel, args.processes, args.devices_per_process, args.dry_run)
    if args.dry_run:
        return 0
    rows = sweep_table.collect(members, root, outcomes)
    sweep_table.write(rows, root, members, args.metric)
    print(json.dumps(rows, indent=2))
    return 0 if not any(str(o).startswith("failed") for o in outcomes.values()) else 1


if __name__ == "__main__":
    cli.main_entry(main)
