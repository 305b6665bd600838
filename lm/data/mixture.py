"""Weighted mixtures of corpora: 'austen:0.2+files:/data/web:0.8'.

Global batch t takes floor((t+1) B c_s) - floor((t+1) B c_{s-1}) less the same at t rows from
source s (c: the cumulative normalised weights), so after any number of steps every source has
had its share of the rows to within one row, every batch is a pure function of (seed, step), and
resumption is exact. Each source walks its own windows in epochs of fresh permutations.
"""
from __future__ import annotations

import fractions
import re
import threading
import numpy as np

from core.batches import StepBatches, digest, scatter_rows
from core.config import DataError

_WEIGHT = re.compile(r"^(?P<spec>.+):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse(corpus: str) -> list[tuple[str, float]]:
    """[(spec, weight)]: one (corpus, 1.0) unless there are several '+'-parts, each ending in
    ':<weight>' (a lone 'hub:name:2023' is a hub config, not a weight)."""
    corpus = corpus.strip()
    parts = [p.strip() for p in corpus.split("+")]
    matches = [_WEIGHT.match(p) for p in parts]
    if len(parts) == 1 or not any(matches):
        return [(corpus, 1.0)]
    if not all(matches):
        missing = [p for p, m in zip(parts, matches) if not m]
        raise DataError(f"data.corpus '{corpus}': give every part of a mixture a weight "
                        f"('name:0.3'); {missing[0]!r} has none")
    mix = [(m["spec"].strip(), float(m["weight"])) for m in matches]
    if any(w <= 0 for _, w in mix):
        raise DataError(f"data.corpus '{corpus}': mixture weights must be positive")
    return mix


class MixtureIterator(StepBatches):
    """Endless training batches drawn from several row sources by weight (see module doc).

    Each process reads only its rows of the global batch (after a fixed shuffle of the batch, so
    every process sees every source)."""

    _mismatch = "another mixture (sources, weights, batch size or seed differ)"

    def __init__(self, sources: list, weights: list[float], names: list[str],
                 global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        b = int(global_batch_size)
        if b <= 0 or b % process_count:
            raise DataError(f"global batch size {b} must be a positive multiple of the "
                            f"process count {process_count}")
        total = sum(weights)
        shares = [fractions.Fraction(w / total).limit_denominator(1 << 20) for w in weights]
        for name, share in zip(names, shares):
            if b * share < 1:  # fewer could make a batch's count for a source negative
                raise DataError(f"mixture source '{name}' has weight {float(share):.4g}, under "
                                f"one row of the global batch of {b}: raise its weight or the "
                                "batch size")
        self.cumulative = [sum(shares[:k + 1]) for k in range(len(shares))]
        self.cumulative[-1] = fractions.Fraction(1)
        self.sources, self.names, self.seed = sources, names, seed
        self.global_batch_size = b
        self.local_batch_size = b // process_count
        self._lo = process_index * self.local_batch_size
        self.step = 0
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)
        self.tokens_seen = np.zeros(len(sources))
        self._tokens_at: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._fingerprint = digest([len(s) for s in sources], [str(c) for c in self.cumulative],
                                   b, seed, [s.content_crc() for s in sources])[:16]

    def rows_before(self, step: int) -> np.ndarray:
        """Rows each source has given to global batches 0..step-1."""
        upto = [step * self.global_batch_size * c for c in self.cumulative]
        floors = np.array([0] + [f.numerator // f.denominator for f in upto], np.int64)
        return np.diff(floors)

    def _source_rows(self, k: int, positions: np.ndarray) -> np.ndarray:
        """Row indices of source k at its stream positions (epoch e: permutation [seed, k, e])."""
        n = len(self.sources[k])
        epochs, offsets = np.divmod(positions, n)
        out = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            if self._perms.get(k, (None,))[0] != epoch:
                self._perms[k] = (epoch, np.random.default_rng([self.seed, k, int(epoch)])
                                  .permutation(n))
            out[epochs == epoch] = self._perms[k][1][offsets[epochs == epoch]]
        return out

    def batch_rows(self, step: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(source, where its rows go in the local batch, its row indices) for this process's
        rows of global batch `step`."""
        first, last = self.rows_before(step), self.rows_before(step + 1)
        owner = np.repeat(np.arange(len(self.sources)), last - first)
        position = np.concatenate([np.arange(a, b) for a, b in zip(first, last)])
        order = np.random.default_rng([self.seed, step, len(self.sources)]).permutation(
            self.global_batch_size)[self._lo:self._lo + self.local_batch_size]
        owner, position = owner[order], position[order]
        return [(k, owner == k, self._source_rows(k, position[owner == k]))
                for k in np.unique(owner)]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`."""
        parts = [(k, at, self.sources[k].rows(rows)) for k, at, rows in self.batch_rows(step)]
        batch = scatter_rows([(at, rows) for _, at, rows in parts], self.local_batch_size)
        tokens = np.zeros(len(self.sources))
        for k, _, rows in parts:
            tokens[k] = int((rows["segment_ids"] != 0).sum())
        with self._lock:
            self._tokens_at[step] = tokens  # counted once consumed (a prefetcher reads ahead)
            self._fold()
        return batch

    def _fold(self) -> None:
        for step in [s for s in self._tokens_at if s < self.step]:
            self.tokens_seen += self._tokens_at.pop(step)

    def host_metrics(self) -> dict[str, float]:
        """Each source's share of the real tokens of the batches this process has consumed since
        it started."""
        with self._lock:
            self._fold()
        seen = max(1.0, self.tokens_seen.sum())
        return {f"mix/{name}": float(t / seen) for name, t in zip(self.names, self.tokens_seen)}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        with self._lock:
            self._tokens_at.clear()
