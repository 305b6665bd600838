"""What a task gives the engine: parameters, a loss, and the shape of its batches.

`core/` knows nothing of text or images. A task (causal LM, masked LM, image classification, ...)
implements this protocol; the engine supplies the loop, sharding, checkpoints, optimiser and
metrics. Losses are returned as sums with their weight (e.g. the number of target tokens) so that
gradient accumulation over microbatches and evaluation over many batches weigh every token
exactly once, whatever the batch split.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import jax


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of a batch: its per-example shape, dtype and logical axis names (batch first)."""
    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str | None, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossSums:
    """Summed loss, its weight, and further summed metrics (each divided by weight when shown)."""
    loss: jax.Array
    weight: jax.Array
    extra: dict[str, jax.Array]

    def as_floats(self) -> dict[str, float]:
        """The sums on the host as {"loss", "weight", *extra}: what evaluators add up."""
        return {"loss": float(self.loss), "weight": float(self.weight),
                **{k: float(v) for k, v in self.extra.items()}}


class Task(Protocol):
    name: str

    def init_params(self, rng: jax.Array) -> Any:
        """Parameters as a pytree of logically-boxed arrays (nn.LogicallyPartitioned)."""

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
             train: bool) -> LossSums:
        """Summed loss over the batch, with its weight."""

    def batch_fields(self) -> Mapping[str, BatchField]:
        """The arrays of one example, to build abstract batches and their shardings."""

    def train_flops_per_example(self) -> float:
        """Forward + backward FLOPs for one example, for MFU."""

    def units_per_example(self) -> tuple[str, int]:
        """What throughput counts ("tokens", seq_len) or ("images", 1)."""


class StatefulTask(Task, Protocol):
    """A task with non-trainable variables that the forward pass updates (BatchNorm's running
    statistics). The engine keeps them in TrainState.model_state, shards and checkpoints them
    like parameters, threads them through microbatches in order, and hands them to evaluation."""

    def init_model_state(self, rng: jax.Array) -> Any:
        """The initial state, boxed with logical names like init_params (or plain: replicated)."""

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, train: bool,
             model_state: Any = None) -> tuple[LossSums, Any]:
        """(summed loss, the state after this batch); in eval (train=False) the state is read,
        and returned unchanged."""
