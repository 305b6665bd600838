"""The train state, created directly into its shardings so it never sits whole on one device."""
from __future__ import annotations

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


def _boxed_state(task, optimizer, rng) -> TrainState:
    params = task.init_params(rng)
    # optax maps over the boxes' values, so mu/nu inherit the parameters' logical names.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def state_shardings(task, optimizer, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its NamedShardings), without allocating anything."""
    boxed = jax.eval_shape(lambda r: _boxed_state(task, optimizer, r), jax.random.key(0))
    shardings = mesh_lib.tree_shardings(mesh, rules, boxed)
    abstract = nn.unbox(boxed)
    mesh_lib.check_divisible(abstract.params, shardings.params, "parameter")
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_state(task, optimizer, shardings: TrainState, seed: int) -> TrainState:
    """Initialises parameters and optimiser state straight into their shardings."""
    init = jax.jit(lambda r: nn.unbox(_boxed_state(task, optimizer, r)), out_shardings=shardings)
    return init(jax.random.key(seed))

