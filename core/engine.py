"""The engine: mesh, shardings, jitted steps and state restore, shared by train, eval and sample.

This is where the path of one training step lives (DESIGN.md): config -> mesh -> abstract state
with logical names -> NamedShardings -> state initialised (or restored) into them -> the step
jitted with explicit shardings, donated state, compiled ahead of time.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from core import distributed, memory, mesh as mesh_lib, optim, step as step_lib, train_state
from core.checkpoint import CheckpointMismatchError, Checkpointer
from core.config import ConfigError, check_ranges

log = logging.getLogger(__name__)


def train_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "steps": 1000,
        "global_batch_size": 16,
        "microbatches": 1,          # gradient accumulation: the batch is split into this many
        "seed": 0,
        "log_every": 50,
        "eval_every": 500,          # 0: only at the end
        "eval_batches": 0,          # 0: the whole validation split
        "checkpoint_every": 500,
        "keep_checkpoints": 3,
        "async_checkpoint": True,
        "memory_limit_bytes": 0,    # 0: what the device reports
        "peak_flops": 0.0,          # per device; 0: datasheet for accelerators, measured on CPU
        "max_wallclock_s": 0.0,     # 0: no limit; else stop (and save) after this many seconds
    })
    cfg.update(overrides)
    return cfg


# The numbers a train setting may take (core.config.in_range rules).
TRAIN_RANGES = {"steps": ">= 1", "global_batch_size": ">= 1", "microbatches": ">= 1",
                "log_every": ">= 0", "eval_every": ">= 0", "eval_batches": ">= 0",
                "checkpoint_every": ">= 0", "keep_checkpoints": ">= 1",
                "memory_limit_bytes": ">= 0", "peak_flops": ">= 0", "max_wallclock_s": ">= 0"}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything about the train, optim, mesh and sharding sections that can be refused from
    the config and the device count alone: commands call it before reading data or compiling."""
    check_ranges("train", config.train, TRAIN_RANGES)
    optim.check_config(config.optim, config.train.steps)
    mesh = mesh_lib.build_mesh(config.mesh)
    rules = mesh_lib.rules_from_config(config.sharding_rules)
    check_batch(config.train.global_batch_size, config.train.microbatches,
                ways(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0]), mesh)


def ways(mesh, axes) -> int:
    """How many devices a dimension mapped to `axes` (one mesh axis, a tuple, or None) spans."""
    names = axes if isinstance(axes, tuple) else (() if axes is None else (axes,))
    return math.prod(mesh.shape[n] for n in names)


def check_batch(global_batch: int, microbatches: int, ways: int, mesh) -> None:
    """The batch splits into microbatches, each over the `ways` devices that shard it."""
    if global_batch % microbatches:
        raise ConfigError(f"train.global_batch_size {global_batch} is not a multiple of "
                          f"train.microbatches {microbatches}")
    per_micro = global_batch // microbatches
    if per_micro % ways:
        raise ConfigError(
            f"the batch of {per_micro} examples per microbatch (train.global_batch_size "
            f"{global_batch} / train.microbatches {microbatches}) does not divide over the "
            f"{ways} devices that shard the batch (mesh {mesh_lib.describe(mesh)}); use a "
            f"multiple of {ways * microbatches} or change the mesh")
    if global_batch % jax.process_count():
        raise ConfigError(f"train.global_batch_size {global_batch} does not split over "
                          f"{jax.process_count()} processes")


class Engine:
    """Everything about a run that depends on the config and the task but not on the data."""

    def __init__(self, config: ml_collections.ConfigDict, task, devices=None):
        """`devices`: this process's by default; a target topology's for ahead-of-time
        compilation (launch/aot.py)."""
        self.config = config
        self.task = task
        self.mesh = mesh_lib.build_mesh(config.mesh, devices)
        self.rules = mesh_lib.rules_from_config(config.sharding_rules)
        # The schedule counts optimiser updates: several per step for a task that learns more
        # than once from a batch (core/step.py).
        self.optimizer, self.schedule = optim.build_optimizer(
            config.optim, config.train.steps * math.prod(step_lib.updates_per_batch(task)))
        # Shapes only: outside scope(), where boxed params would try to constrain abstract values.
        self.abstract_state, self.state_shardings = train_state.state_shardings(
            task, self.optimizer, self.mesh, self.rules)
        self.batch_shardings = {
            name: mesh_lib.logical_sharding(self.mesh, self.rules, field.logical_axes)
            for name, field in task.batch_fields().items()}
        check_batch(config.train.global_batch_size, config.train.microbatches, self.batch_ways(),
                    self.mesh)

    def scope(self):
        """Mesh and logical rules in effect (see core.mesh.activate): trace and run inside it."""
        return mesh_lib.activate(self.mesh, self.rules)

    # --- batches -------------------------------------------------------------------------
    def batch_ways(self) -> int:
        sharding = next(iter(self.batch_shardings.values()))
        return ways(self.mesh, sharding.spec[0] if sharding.spec else None)

    def abstract_batch(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {name: jax.ShapeDtypeStruct((global_batch, *field.shape), field.dtype,
                                           sharding=self.batch_shardings[name])
                for name, field in self.task.batch_fields().items()}

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return distributed.global_batch(local_batch, self.batch_shardings)

    # --- state ---------------------------------------------------------------------------
    def init_state(self) -> train_state.TrainState:
        """A fresh state; subtrees the task supplies (`task.pretrained_params()`: top-level key
        -> host arrays, e.g. a fine-tuned model's encoder; `task.pretrained_frozen()` likewise
        for frozen parameters, e.g. a LoRA run's base) replace the initialised ones."""
        with self.scope():
            state = train_state.init_state(self.task, self.optimizer, self.state_shardings,
                                           self.config.train.seed)
        return state.replace(
            params=self._pretrained(state.params, self.state_shardings.params,
                                    getattr(self.task, "pretrained_params", dict)()),
            frozen=self._frozen(state.frozen))

    def _frozen(self, initialised) -> dict:
        """The frozen parameters: initialised ones, or the task's pretrained subtrees."""
        return self._pretrained(initialised, self.state_shardings.frozen,
                                getattr(self.task, "pretrained_frozen", dict)())

    @staticmethod
    def _pretrained(params, shardings, pretrained: dict):
        if not pretrained:
            return params
        params = dict(params)
        for key, tree in pretrained.items():
            if key not in params:
                raise ConfigError(f"pretrained parameters for {key!r}, which the model lacks "
                                  f"(it has {sorted(params)})")
            want = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), params[key])
            have = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
            if want != have:
                raise ConfigError(f"pretrained parameters for {key!r} do not fit the model: "
                                  f"structure, shapes or dtypes differ (model {want}, "
                                  f"given {have})")
            params[key] = jax.device_put(tree, shardings[key])
        return params

    # --- checkpoints: frozen parameters are pointed to, not saved ---------------------------
    def frozen_meta(self) -> dict:
        """What a checkpoint records about the frozen parameters (a LoRA base) so that a restore
        onto another base is refused."""
        if not train_state.has_frozen(self.task):
            return {}
        return {"frozen": self.task.describe_frozen()}

    @staticmethod
    def saved_state(state: train_state.TrainState) -> dict:
        """What a checkpoint holds: every field but the frozen parameters, as a dict, the same
        tree that checkpoints had before TrainState.frozen existed (they restore unchanged)."""
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                "model_state": state.model_state}

    def restore_or_init(self, checkpointer: Checkpointer,
                        check_meta: Callable[[dict], None] | None = None):
        """(state, meta of the restored checkpoint or None)."""
        def check(meta: dict) -> None:
            if meta.get("frozen", {}) != self.frozen_meta().get("frozen", {}):
                raise CheckpointMismatchError(
                    f"the checkpoints in {checkpointer.directory} were trained on frozen "
                    f"parameters {meta.get('frozen')}, but this run has "
                    f"{self.frozen_meta().get('frozen')}; use the run's own base model or a "
                    "new --workdir")
            if check_meta is not None:
                check_meta(meta)

        restored = checkpointer.restore_latest_good(self.saved_state(self.abstract_state), check)
        if restored is None:
            return self.init_state(), None
        saved, meta, step = restored
        log.info("restored step %d from %s", step, checkpointer.directory)
        frozen = {}
        if train_state.has_frozen(self.task):  # not saved: made again (or loaded) as at the start
            with self.scope():
                frozen = self._frozen(train_state.init_frozen(
                    self.task, self.state_shardings.frozen, self.config.train.seed))
        return train_state.TrainState(**saved, frozen=frozen), meta

    def loss_params(self, state: train_state.TrainState):
        """What the task's loss (and evaluation) reads from a state."""
        return train_state.loss_params(self.task, state.params, state.frozen)

    # --- steps ---------------------------------------------------------------------------
    def jitted_train_step(self):
        """The train step, jitted with its shardings and the state donated (not yet compiled)."""
        train = self.config.train
        step_fn = step_lib.make_train_step(self.task, self.optimizer, self.schedule,
                                           train.microbatches, train.seed)
        replicated = mesh_lib.replicated(self.mesh)
        return jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=0)

    def lower_train_step(self):
        """The step lowered for the abstract state and batch: compile() it for any target."""
        jitted = self.jitted_train_step()  # outside scope(): building it may run eager ops
        with self.scope():
            return jitted.lower(self.abstract_state,
                                self.abstract_batch(self.config.train.global_batch_size))

    def compiled_train_step(self):
        """Compiled ahead of time and checked against this device's memory before step 1."""
        train = self.config.train
        jitted = self.jitted_train_step()
        with self.scope():
            compiled, report = memory.compile_and_check(
                jitted, self.abstract_state,
                self.abstract_batch(train.global_batch_size), limit_bytes=train.memory_limit_bytes)
        self.memory_report = report
        return compiled

    def eval_runner(self, global_batch: int) -> Callable[..., dict[str, float]]:
        """`run(params, local_batch, model_state={}) -> summed metrics as floats`, jitted once
        per batch size; `params` as the loss reads them (`loss_params`)."""
        check_batch(global_batch, 1, self.batch_ways(), self.mesh)
        jitted = jax.jit(step_lib.make_eval_step(self.task),
                         in_shardings=(self.loss_params(self.state_shardings),
                                       self.state_shardings.model_state, self.batch_shardings),
                         out_shardings=mesh_lib.replicated(self.mesh))

        def run(params, local_batch, model_state=None):
            with self.scope():
                sums = jitted(params, {} if model_state is None else model_state,
                              self.global_batch(local_batch))
            return jax.device_get(sums).as_floats()
        return run


def restore_state(config: ml_collections.ConfigDict, task, workdir,
                  check_meta: Callable[[dict], None] | None = None):
    """(engine, train state, step) of the newest good checkpoint of a run; a CheckpointError
    if the run has none."""
    import pathlib
    from core.checkpoint import CheckpointError
    engine = Engine(config, task)
    checkpointer = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    restored = engine.restore_or_init(checkpointer, check_meta) if checkpointer.steps() else None
    checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint to restore in {workdir}/checkpoints")
    state, _ = restored
    return engine, state, int(jax.device_get(state.step))


def restore_params(config: ml_collections.ConfigDict, task, workdir,
                   check_meta: Callable[[dict], None] | None = None):
    """(engine, params, step) of the newest good checkpoint of a run, for evaluation: the params
    as the task's loss reads them (with a LoRA run's base)."""
    engine, state, step = restore_state(config, task, workdir, check_meta)
    return engine, engine.loss_params(state), step
