"""The training loop: restore or init, then step, log, evaluate and checkpoint.

The data side is given as a `TaskData`: a resumable iterator of process-local batches, an
evaluator, and the metadata that must match between a checkpoint and the run that restores it.
SIGTERM (preemption) saves a checkpoint at the next step boundary and stops cleanly.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from core import flops as flops_lib
from core.checkpoint import Checkpointer
from core.config import ConfigError
from core.engine import Engine, check_config
from core.metrics import MetricsWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TaskData:
    # Also has get_state() / set_state(state). A source whose batches depend on the policy (online
    # RL's rollouts) has next_for(params, step) instead of __next__: it is handed the parameters
    # the step will start from, as the loss reads them; host_metrics() -> {name: float}, if it
    # has it, joins the logged metrics (rollout time, reward).
    train: Iterator[dict[str, np.ndarray]]
    # evaluate(run_batch, max_batches) -> metrics; run_batch(local_batch) -> summed floats.
    evaluate: Callable[[Callable[[dict], dict], int], dict[str, float]] | None
    eval_batch_size: int
    meta: dict[str, Any]                         # saved with every checkpoint
    check_meta: Callable[[dict[str, Any]], None] | None = None


class _StopSignal:
    """Turns SIGTERM into a flag the loop reads at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True

    def any_process_requested(self, step: int, every: int, also: bool = False) -> bool:
        """True if any process got SIGTERM (or has `also` set): all processes stop together.
        Across processes this is a blocking gather, which would stall asynchronous dispatch
        every step; it runs every `every` steps (the log interval) and the flag waits till then."""
        flag = self.requested or bool(also)
        if jax.process_count() == 1:
            return flag
        if every > 1 and step % every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# What a resumed run may change: how long it trains, how it logs, evaluates and checkpoints, and
# how the same computation is laid out (mesh, sharding, accumulation, rematerialisation).
# fnmatch patterns on dotted keys; data.tokenizer.path is compared by content (lm/pipeline.py).
RESUME_SAFE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
               "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
               "train.memory_limit_bytes", "train.peak_flops", "train.max_wallclock_s",
               "train.microbatches", "mesh.*", "sharding_rules", "distributed.*",
               "data.cache_dir", "data.tokenizer.path", "model.remat", "model.attention_impl",
               "model.loss_chunk")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf; an empty section is a leaf too, so filling it is a difference."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items()
                for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_resume(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run whose saved config.json differs from `config` in a key outside
    RESUME_SAFE, listing the keys. Keys the saved config lacks (options added since) pass."""
    saved_path = pathlib.Path(workdir) / "config.json"
    if not saved_path.is_file():
        return
    try:
        saved = _flat(json.loads(saved_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{saved_path} is not readable JSON ({error}); restore it from a backup "
                          "or train in a new --workdir") from None
    wanted = _flat(json.loads(config.to_json_best_effort()))
    differing = sorted((key for key in saved
                        if saved[key] != wanted.get(key)
                        and not any(fnmatch.fnmatchcase(key, safe) for safe in RESUME_SAFE)),
                       key=lambda key: (key != "task", key))  # another objective: say so first
    if differing:
        def now(key: str) -> str:
            if key in wanted:
                return repr(wanted[key])
            return "(filled in)" if any(w.startswith(key + ".") for w in wanted) else "(absent)"
        shown = "; ".join(f"{k}: {saved[k]!r} -> {now(k)}" for k in differing[:8])
        raise ConfigError(f"{workdir} is a run trained with another config ({shown}"
                          f"{'; ...' if len(differing) > 8 else ''}); resuming may change only "
                          f"steps, logging, evaluation, checkpointing and layout: use its own "
                          f"values or a new --workdir")


def write_run_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2))
        tmp.replace(workdir / "config.json")


def build_and_train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                    build: Callable) -> dict[str, Any]:
    """The train command of a task family: the config and the workdir are checked before
    `build(config, workdir)` reads any data, then its (.task, .data) are trained."""
    check_config(config)
    check_resume(workdir, config)
    setup = build(config, workdir)
    return train(config, workdir, setup.task, setup.data)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, task,
          data: TaskData) -> dict[str, Any]:
    """Runs (or resumes) training to config.train.steps; returns the last metrics."""
    workdir = pathlib.Path(workdir)
    check_resume(workdir, config)
    cfg = config.train
    engine = Engine(config, task)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints,
                                async_save=cfg.async_checkpoint)
    state, meta = engine.restore_or_init(checkpointer, data.check_meta)
    # Only now: a resume that the checkpoint refused must not overwrite the run's own config.
    write_run_config(workdir, config)
    if meta is not None:
        data.train.set_state(meta["data"])
    step = int(jax.device_get(state.step))
    log.info("mesh %s; %s parameters; starting at step %d", dict(engine.mesh.shape),
             f"{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,}", step)

    compiled = engine.compiled_train_step()
    unit, units_per_example = task.units_per_example()
    peak, peak_source = flops_lib.peak_flops_per_device(cfg.peak_flops)
    flops_per_step = task.train_flops_per_example() * cfg.global_batch_size
    total_peak = flops_lib.total_peak_flops(peak, engine.mesh.devices.size)
    writer = MetricsWriter(workdir, cfg.steps, start_step=step)
    eval_run = engine.eval_runner(data.eval_batch_size) if data.evaluate else None

    def save(at_step: int) -> None:
        checkpointer.save(at_step, engine.saved_state(state),
                          {**data.meta, **engine.frozen_meta(), "data": data.train.get_state(),
                           "step": at_step})

    def evaluate(at_step: int, whole: bool = False) -> dict[str, float]:
        """Periodic evals may look at train.eval_batches batches; the final one sees them all."""
        metrics = data.evaluate(lambda b: eval_run(engine.loss_params(state), b,
                                                   state.model_state),
                                0 if whole else cfg.eval_batches)
        writer.write(at_step, metrics, prefix="eval")
        return metrics

    last: dict[str, Any] = {}
    started = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    with _StopSignal() as stop:
        while step < cfg.steps:
            if hasattr(data.train, "next_for"):
                with engine.scope():
                    local = data.train.next_for(engine.loss_params(state), step)
            else:
                local = next(data.train)
            batch = engine.global_batch(local)
            with engine.scope():
                state, metrics = compiled(state, batch)
            step += 1
            window_steps += 1
            if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                rate = window_steps / elapsed
                last = {k: float(v) for k, v in metrics.items()}
                last.update(getattr(data.train, "host_metrics", dict)())
                last.update({
                    f"{unit}_per_s": rate * cfg.global_batch_size * units_per_example,
                    "steps_per_s": rate,
                    "mfu": rate * flops_per_step / total_peak,
                })
                writer.write(step, last)
                window_start, window_steps = time.perf_counter(), 0
            writer.advance(step)
            evaluating = (eval_run and cfg.eval_every and step % cfg.eval_every == 0
                          and step < cfg.steps)
            saving = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
            if evaluating or saving:  # steps still queued on the device are training time
                jax.block_until_ready(state)
            paused = time.perf_counter()
            if evaluating:
                last.update({f"eval_{k}": v for k, v in evaluate(step).items()})
            if saving:
                save(step)
            window_start += time.perf_counter() - paused  # tokens/s and MFU count steps only
            out_of_time = cfg.max_wallclock_s and time.perf_counter() - started > cfg.max_wallclock_s
            if stop.any_process_requested(step, cfg.log_every, also=out_of_time):
                log.warning("stopping at step %d (%s); saving a checkpoint", step,
                            "SIGTERM" if stop.requested or not out_of_time
                            else "train.max_wallclock_s reached")
                break
        save(step)
        checkpointer.wait()  # the last checkpoint is on disk before the final eval starts
    if eval_run and (step == cfg.steps or cfg.max_wallclock_s):
        last.update({f"eval_{k}": v for k, v in evaluate(step, whole=True).items()})
    checkpointer.close()
    writer.close()
    summary = {"step": step, "finished": step >= cfg.steps,
               "num_params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
               # what a scaling-law fit needs: the data and compute this run trained on
               f"{unit}_seen": step * cfg.global_batch_size * units_per_example,
               "train_flops": step * flops_per_step,
               **(task.describe() if hasattr(task, "describe") else {}),
               "peak_flops_per_device": peak, "peak_source": peak_source,
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "memory": engine.memory_report.summary() if engine.memory_report else None, **last}
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
