"""The train state, created directly into its shardings so it never sits whole on one device."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from core import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Non-trainable variables the loss updates (BatchNorm statistics); {} for most tasks.
    model_state: Any = dataclasses.field(default_factory=dict)
    # Parameters the loss reads but never trains (a LoRA run's base): sharded like params, but
    # outside the optimiser and outside checkpoints, which point to them instead; {} for most.
    frozen: Any = dataclasses.field(default_factory=dict)


def has_model_state(task) -> bool:
    """Tasks with non-trainable state implement init_model_state(rng) (core/task.py)."""
    return hasattr(task, "init_model_state")


def has_frozen(task) -> bool:
    """Tasks that train a function of frozen parameters implement init_frozen(rng) and
    combine(params, frozen) -> what their loss reads (lm/objectives/lora_task.py)."""
    return hasattr(task, "init_frozen")


def loss_params(task, params: Any, frozen: Any) -> Any:
    """What the task's loss reads: its trainable params, combined with the frozen ones if any."""
    return task.combine(params, frozen) if has_frozen(task) else params


def _boxed_state(task, optimizer, rng) -> TrainState:
    params = task.init_params(rng)
    model_state = (task.init_model_state(jax.random.fold_in(rng, 1)) if has_model_state(task)
                   else {})
    frozen = task.init_frozen(jax.random.fold_in(rng, 2)) if has_frozen(task) else {}
    # optax maps over the boxes' values, so mu/nu inherit the parameters' logical names.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), model_state=model_state, frozen=frozen)


def state_shardings(task, optimizer, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its NamedShardings), without allocating anything."""
    boxed = jax.eval_shape(lambda r: _boxed_state(task, optimizer, r), jax.random.key(0))
    shardings = mesh_lib.tree_shardings(mesh, rules, boxed)
    abstract = nn.unbox(boxed)
    mesh_lib.check_divisible(abstract.params, shardings.params, "parameter")
    mesh_lib.check_divisible(abstract.frozen, shardings.frozen, "frozen parameter")
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_state(task, optimizer, shardings: TrainState, seed: int) -> TrainState:
    """Initialises parameters and optimiser state straight into their shardings."""
    init = jax.jit(lambda r: nn.unbox(_boxed_state(task, optimizer, r)), out_shardings=shardings)
    return init(jax.random.key(seed))

