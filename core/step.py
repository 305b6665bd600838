"""The one pure train step `(state, batch) -> (state, metrics)` and its eval twin.

Gradients are accumulated over microbatches as sums and divided once by the total weight, so a
step with 4 microbatches computes the same update as one big batch. Every metric is computed
inside the jitted step; the host only reads a small dict of scalars.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from core.task import LossSums
from core.train_state import TrainState


def _split_microbatches(batch, microbatches: int):
    """[B, ...] -> [M, B/M, ...] taking strided rows, so every device feeds every microbatch."""
    def split(x):
        rows = x.shape[0]
        return x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree_util.tree_map(split, batch)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def summed_loss_and_grads(task, params, batch, rng, microbatches: int) -> tuple[LossSums, Any]:
    """Loss sums and gradient of the summed loss, accumulated over microbatches."""
    def loss_fn(p, mb, r):
        sums = task.loss(p, mb, r, train=True)
        return sums.loss, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches == 1:
        grads, sums = grad_fn(params, batch, rng)
        return sums, grads

    split = _split_microbatches(batch, microbatches)

    def body(carry, inputs):
        index, microbatch = inputs
        grads, sums = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        return _add(carry, (grads, sums)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], split), rng)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), split))
    return sums, grads


def normalised_metrics(sums: LossSums) -> dict[str, jax.Array]:
    weight = jnp.maximum(sums.weight, 1.0)
    metrics = {"loss": sums.loss / weight, "weight": sums.weight}
    metrics.update({name: value / weight for name, value in sums.extra.items()})
    return metrics


def make_train_step(task, optimizer: optax.GradientTransformation,
                    schedule: Callable, microbatches: int, seed: int):
    """Builds the pure step; the caller jits it with shardings and donation."""
    base_rng = jax.random.key(seed)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(base_rng, state.step)
        sums, grads = summed_loss_and_grads(task, state.params, batch, rng, microbatches)
        weight = jnp.maximum(sums.weight, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = normalised_metrics(sums)
        metrics.update({
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "update_norm": optax.global_norm(updates),
            "learning_rate": schedule(state.step),
        })
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(task):
    """Summed loss and metrics of one batch; the caller adds them up over the eval set."""
    def eval_step(params, batch) -> LossSums:
        return task.loss(params, batch, jax.random.key(0), train=False)
    return eval_step
