"""The one pure train step `(state, batch) -> (state, metrics)` and its eval twin.

Gradients are accumulated over microbatches as sums and divided once by the total weight, so a
step with 4 microbatches computes the same update as one big batch. Every metric is computed
inside the jitted step; the host only reads a small dict of scalars.

A task that learns several times from one batch (PPO's epochs over a rollout) says so with
`updates_per_batch() -> (epochs, minibatches)` and may add what every update reads, computed
once with the parameters the batch was drawn under, with `prepare_batch(params, batch, rng,
model_state) -> (batch, metrics, model_state)` (old and reference log-probs, values, advantages;
PPO's adaptive KL coefficient in the model state). One step is then the whole
learning phase: each epoch shuffles the rows and takes one optimiser update per minibatch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from core.task import LossSums
from core.train_state import TrainState, has_model_state, loss_params


def _split_microbatches(batch, microbatches: int):
    """[B, ...] -> [M, B/M, ...] taking strided rows, so every device feeds every microbatch."""
    def split(x):
        rows = x.shape[0]
        return x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree_util.tree_map(split, batch)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def task_loss(task, params, model_state, batch, rng, train: bool) -> tuple[LossSums, Any]:
    """(loss sums, updated model state): one calling convention for tasks with and without
    non-trainable state (core/task.py)."""
    if not has_model_state(task):
        return task.loss(params, batch, rng, train=train), model_state
    return task.loss(params, batch, rng, train=train, model_state=model_state)


def summed_loss_and_grads(task, params, batch, rng, microbatches: int,
                          model_state: Any = None, frozen: Any = None
                          ) -> tuple[LossSums, Any, Any]:
    """Loss sums, gradient of the summed loss (accumulated over microbatches) and the model
    state after the batch; microbatches update the state one after another. Gradients are taken
    with respect to `params` only, never the frozen parameters."""
    model_state = {} if model_state is None else model_state

    def loss_fn(p, mb, r, ms):
        sums, new_ms = task_loss(task, loss_params(task, p, frozen), ms, mb, r, train=True)
        return sums.loss, (sums, new_ms)

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches == 1:
        grads, (sums, model_state) = grad_fn(params, batch, rng, model_state)
        return sums, grads, model_state

    split = _split_microbatches(batch, microbatches)

    def body(carry, inputs):
        totals, ms = carry
        index, microbatch = inputs
        grads, (sums, ms) = grad_fn(params, microbatch, jax.random.fold_in(rng, index), ms)
        return (_add(totals, (grads, sums)), ms), None

    first = jax.tree_util.tree_map(lambda x: x[0], split)
    grad_shapes, (sum_shapes, _) = jax.eval_shape(grad_fn, params, first, rng, model_state)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, sum_shapes))
    ((grads, sums), model_state), _ = jax.lax.scan(body, (zeros, model_state),
                                                   (jnp.arange(microbatches), split))
    return sums, grads, model_state


def normalised_metrics(sums: LossSums) -> dict[str, jax.Array]:
    weight = jnp.maximum(sums.weight, 1.0)
    metrics = {"loss": sums.loss / weight, "weight": sums.weight}
    metrics.update({name: value / weight for name, value in sums.extra.items()})
    return metrics


def updates_per_batch(task) -> tuple[int, int]:
    """(epochs, minibatches) of optimiser updates one batch gives; (1, 1) for most tasks."""
    return task.updates_per_batch() if hasattr(task, "updates_per_batch") else (1, 1)


def _minibatch(batch, shuffle_rng, index, epochs_minibatches: tuple[int, int]):
    """Update `index`'s rows: epoch index // M shuffles the batch with its own key (drawn from
    `shuffle_rng`), and the update takes its M-th part of that order."""
    _, minibatches = epochs_minibatches
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
    size = rows // minibatches
    order = jax.random.permutation(jax.random.fold_in(shuffle_rng, index // minibatches), rows)
    picked = jax.lax.dynamic_slice(order, ((index % minibatches) * size,), (size,))
    return jax.tree_util.tree_map(lambda x: jnp.take(x, picked, axis=0), batch)


def make_train_step(task, optimizer: optax.GradientTransformation,
                    schedule: Callable, microbatches: int, seed: int):
    """Builds the pure step; the caller jits it with shardings and donation."""
    base_rng = jax.random.key(seed)
    plan = updates_per_batch(task)
    count = plan[0] * plan[1]

    def update(params, opt_state, model_state, frozen, batch, rng):
        sums, grads, model_state = summed_loss_and_grads(task, params, batch, rng, microbatches,
                                                          model_state, frozen)
        weight = jnp.maximum(sums.weight, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = normalised_metrics(sums)
        metrics.update({"grad_norm": optax.global_norm(grads),
                        "update_norm": optax.global_norm(updates)})
        return params, opt_state, model_state, metrics

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        # A lone update keys with rng (as always); of several, update k with fold_in(rng, k).
        # prepare's key is fold_in(rng, count); the epochs' shuffles draw from count + 1's.
        rng = jax.random.fold_in(base_rng, state.step)
        prepared, model_state = {}, state.model_state
        if hasattr(task, "prepare_batch"):
            batch, prepared, model_state = task.prepare_batch(
                loss_params(task, state.params, state.frozen), batch,
                jax.random.fold_in(rng, count), model_state)
        if count == 1:
            params, opt_state, model_state, metrics = update(
                state.params, state.opt_state, model_state, state.frozen, batch, rng)
        else:
            def body(carry, index):
                params, opt_state, model_state = carry
                params, opt_state, model_state, metrics = update(
                    params, opt_state, model_state, state.frozen,
                    _minibatch(batch, jax.random.fold_in(rng, count + 1), index, plan),
                    jax.random.fold_in(rng, index))
                return (params, opt_state, model_state), metrics
            (params, opt_state, model_state), per_update = jax.lax.scan(
                body, (state.params, state.opt_state, model_state), jnp.arange(count))
            metrics = jax.tree_util.tree_map(jnp.mean, per_update)  # over the step's updates
        metrics.update(prepared)
        metrics.update({"param_norm": optax.global_norm(params),
                        "learning_rate": schedule(state.step * count)})
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               model_state=model_state, frozen=state.frozen)
        return new_state, metrics

    return train_step


def host_eval(task, params, model_state=None) -> Callable[[Any], dict[str, float]]:
    """`run(batch) -> summed metrics as floats` of the task's eval loss on `params`, jitted
    once per task, without the engine's mesh (scores of a restored run, benchmarks)."""
    eval_step = _jitted_eval_step(task)
    return lambda batch: jax.device_get(eval_step(params, model_state or {}, batch)).as_floats()


@functools.lru_cache(maxsize=None)
def _jitted_eval_step(task):
    return jax.jit(make_eval_step(task))


def make_eval_step(task):
    """Summed loss and metrics of one batch; the caller adds them up over the eval set. `params`
    are what the loss reads (core.train_state.loss_params)."""
    def eval_step(params, model_state, batch) -> LossSums:
        return task_loss(task, params, model_state, batch, jax.random.key(0), train=False)[0]
    return eval_step
