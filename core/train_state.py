"""The train state, created directly into its shardings so it never sits whole on one device."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def _boxed_state(task, optimizer, rng, frozen: bool = True) -> TrainState:
    params = task.init_params(rng)
    model_state = (task.init_model_state(jax.random.fold_in(rng, 1)) if has_model_state(task)
                   else {})
    frozen = (task.init_frozen(jax.random.fold_in(rng, 2)) if frozen and has_frozen(task)
              else {})
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
    rng = jax.random.key(seed)
    init = jax.jit(lambda r: nn.unbox(_boxed_state(task, optimizer, r, frozen=False)),
                   out_shardings=shardings.replace(frozen={}))
    state = init(rng)
    return state.replace(frozen=init_frozen(task, shardings.frozen, seed)) if has_frozen(task) \
        else state


def init_frozen(task, shardings: Any, seed: int) -> Any:
    """The frozen parameters alone (a restored run needs only these), in their shardings. They
    are made by one device and then placed: their init may run host code (QLoRA quantises its
    base through a host callback, which a sharded program would run on every device at once and
    deadlock its collectives on CPU)."""
    names = jax.tree_util.tree_leaves(shardings)[0].mesh.axis_names
    single = Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(names)), names)
    with jax.set_mesh(single):  # the model's sharding constraints then name one device
        frozen = jax.jit(lambda r: nn.unbox(task.init_frozen(jax.random.fold_in(r, 2))))(
            jax.random.key(seed))
    # Through the host, then a jitted identity: arrays committed to one device cannot enter a
    # program on the whole mesh.
    return jax.jit(lambda f: f, out_shardings=shardings)(jax.device_get(frozen))

