"""Resumable batches over any indexable set of examples (text windows, images).

Every host builds the same examples on its own and takes only its rows of each global batch;
the order is a pure function of (seed, step), so the iterator's whole state is one integer.
A source is anything with `len()`, `rows(index) -> {field: array}` and `content_crc()`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import zlib
from typing import Callable, Iterator, Protocol

import jax
import numpy as np

from core.config import DataError


class RowSource(Protocol):
    def __len__(self) -> int: ...

    def rows(self, index) -> dict[str, np.ndarray]:
        """The batch fields of the chosen rows."""

    def content_crc(self) -> int:
        """A checksum of the examples: a resumed run must see the same data."""


def arrays_crc(*arrays: np.ndarray) -> int:
    """CRC-32 of the arrays' bytes in turn: a RowSource's content_crc."""
    crc = 0
    for values in arrays:
        crc = zlib.crc32(np.ascontiguousarray(values).data, crc)
    return crc


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class StepBatches:
    """Endless training batches whose batch `step` is a pure function `batch(step)`, so that the
    whole state is the step (guarded by a fingerprint of the data, batch size and seed)."""

    step: int
    _fingerprint: str
    _mismatch = "other data (examples, batch size or seed differ)"  # what a foreign state means

    def batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.step += 1
        return self.batch(self.step - 1)

    def get_state(self) -> dict:
        return {"step": self.step, "fingerprint": self._fingerprint}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise DataError(f"data iterator state {state} was saved for {self._mismatch}: "
                            f"fingerprint {self._fingerprint} expected; restore with the config "
                            "the checkpoint was written with")
        self.step = int(state["step"])


def scatter_rows(parts: list[tuple[np.ndarray, dict[str, np.ndarray]]],
                 size: int) -> dict[str, np.ndarray]:
    """One batch of `size` rows from parts of it: (where its rows go, their fields)."""
    out = {}
    for name, values in parts[0][1].items():
        out[name] = np.empty((size, *values.shape[1:]), values.dtype)
        for at, rows in parts:
            out[name][at] = rows[name]
    return out


class BatchIterator(StepBatches):
    """Endless training batches; batch `step` is a pure function of (seed, step).

    Epoch e = step // (N // B) visits the rows in np.random.default_rng([seed, e])
    .permutation(N); each epoch drops the last N % B rows of its permutation.
    """

    def __init__(self, source: RowSource, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True):
        n, b = len(source), int(global_batch_size)
        if b <= 0 or b % process_count:
            raise DataError(f"global batch size {b} must be a positive multiple of the "
                            f"process count {process_count}")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        if n < b:
            what, fix = getattr(source, "describe_rows", lambda: ("examples", ""))()
            raise DataError(f"only {n} {what} exist, fewer than the global batch size {b}: "
                            f"use a smaller batch{fix} or more data")
        self.source, self.global_batch_size, self.seed, self.shuffle = source, b, seed, shuffle
        self.local_batch_size = b // process_count
        self._lo = process_index * self.local_batch_size
        self.batches_per_epoch = n // b
        self.step = 0
        self._epoch, self._perm = -1, None
        self._fingerprint = digest(n, b, seed, shuffle, source.content_crc())[:16]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = len(self.source)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                          if self.shuffle else np.arange(n))
            self._epoch = epoch
        return self._perm

    def batch_rows(self, step: int) -> np.ndarray:
        """Row indices of this process's rows of global batch `step`."""
        epoch, k = divmod(step, self.batches_per_epoch)
        start = k * self.global_batch_size + self._lo
        return self._permutation(epoch)[start:start + self.local_batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`."""
        return self.source.rows(self.batch_rows(step))


class Prefetched:
    """A StepBatches (BatchIterator, MixtureIterator) read `depth` batches ahead in a background
    thread, so that reading from disk overlaps the device's work. Its state is the inner one at
    the batch consumed last."""

    def __init__(self, inner, depth: int = 2):
        self.inner, self.depth = inner, max(1, int(depth))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._ahead: collections.deque = collections.deque()  # (step, future)

    @property
    def step(self) -> int:
        return self.inner.step

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step = self.inner.step
        if not self._ahead or self._ahead[0][0] != step:
            self._ahead.clear()
        while len(self._ahead) < self.depth + 1:
            at = step + len(self._ahead)
            self._ahead.append((at, self._pool.submit(self.inner.batch, at)))
        batch = self._ahead.popleft()[1].result()
        self.inner.step = step + 1
        return batch

    def host_metrics(self) -> dict:
        return getattr(self.inner, "host_metrics", dict)()

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)
        self._ahead.clear()


def eval_batches(source: RowSource, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order; the last batch is filled with all-zero rows, which the
    source's own fields mark as padding (segment id 0, mask 0)."""
    b = int(global_batch_size)
    if b <= 0 or b % process_count:
        raise DataError(f"global batch size {b} must be a positive multiple of the "
                        f"process count {process_count}")
    local = b // process_count
    lo = process_index * local
    n = len(source)
    for start in range(0, n, b):
        batch = {}
        for name, rows in source.rows(slice(start + lo, min(start + lo + local, n))).items():
            full = np.zeros((local, *rows.shape[1:]), rows.dtype)
            full[:len(rows)] = rows
            batch[name] = full
        yield batch


def sum_batches(source: RowSource, global_batch_size: int,
                run_batch: Callable[[dict], dict[str, float]],
                max_batches: int = 0) -> tuple[dict[str, float], int]:
    """(run_batch's summed metrics added up over this process's eval batches of `source`, the
    number of rows they covered); max_batches > 0 stops early (an estimate, for periodic evals)."""
    totals: dict[str, float] = {}
    seen = 0
    for index, batch in enumerate(eval_batches(source, global_batch_size, jax.process_index(),
                                               jax.process_count())):
        if max_batches and index >= max_batches:
            break
        for key, value in run_batch(batch).items():
            totals[key] = totals.get(key, 0.0) + value
        seen = min(len(source), (index + 1) * global_batch_size)
    return totals, seen


class ArrayRows:
    """A RowSource over ready arrays that share their first dimension."""

    def __init__(self, fields: dict[str, np.ndarray]):
        lengths = {len(v) for v in fields.values()}
        if len(lengths) != 1:
            raise DataError(f"fields {sorted(fields)} have different lengths {sorted(lengths)}")
        self.fields = fields

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def rows(self, index) -> dict[str, np.ndarray]:
        return {name: values[index] for name, values in self.fields.items()}

    def content_crc(self) -> int:
        return arrays_crc(*(self.fields[name] for name in sorted(self.fields)))


# Lengths and batch sizes bucketed so that jit compiles few distinct shapes.

def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_length(n: int, granule: int = 16) -> int:
    """n rounded up to a multiple of `granule`, or of a quarter of the power of two below n when
    that is larger: at most 25% padding (or granule - 1 tokens), and few distinct shapes to
    compile. A smaller granule suits short rows (answers of a few tokens)."""
    return round_up(max(n, 1), max(granule, (1 << (max(n, 1).bit_length() - 1)) // 4))
