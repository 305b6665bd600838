"""Okapi BM25 as one sparse matrix: every (term, passage) weight computed when indexing, so a query
is a sparse row times a matrix and a top-k.

The weights are rank_bm25's BM25Okapi (k1 1.5, b 0.75; a term in more than half of the passages,
whose idf would be negative, gets epsilon 0.25 times the mean idf), on lower-cased `\\w+` tokens,
and the tests check our scores against that library. Written here rather than taken from a
library because rank_bm25 scores a query in a Python loop over the whole corpus (seconds a query
at a million passages) and bm25s has no variant with that idf floor, so its rankings differ.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def top_k(scores_QN: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [Q, k], scores [Q, k]) of the k best per query, best first; ties by lower row."""
    k = min(k, scores_QN.shape[1])
    part_QK = np.argpartition(-scores_QN, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores_QN, part_QK, 1)
    order = np.lexsort((part_QK, -part_scores), axis=1)
    rows_QK = np.take_along_axis(part_QK, order, 1)
    return rows_QK, np.take_along_axis(scores_QN, rows_QK, 1)


class BM25:
    def __init__(self, vocab: dict[str, int], weights_VN: sp.csr_matrix, k1: float, b: float,
                 epsilon: float):
        self.vocab, self.weights_VN = vocab, weights_VN
        self.k1, self.b, self.epsilon = k1, b, epsilon

    @property
    def size(self) -> int:
        return self.weights_VN.shape[1]

    @classmethod
    def build(cls, texts: Iterable[str], k1: float = 1.5, b: float = 0.75,
              epsilon: float = 0.25) -> "BM25":
        vocab: dict[str, int] = {}
        rows, cols, counts, lengths = [], [], [], []
        for n, text in enumerate(texts):
            tokens = tokenize(text)
            lengths.append(len(tokens))
            ids, tf = np.unique([vocab.setdefault(t, len(vocab)) for t in tokens],
                                return_counts=True)
            rows.append(ids)
            cols.append(np.full(len(ids), n))
            counts.append(tf)
        N = len(lengths)
        if N == 0:
            raise ValueError("BM25 needs at least one passage")
        rows_, cols_ = np.concatenate(rows).astype(np.int64), np.concatenate(cols)
        tf_ = np.concatenate(counts).astype(np.float64)
        length_N = np.asarray(lengths, np.float64)
        df_V = np.bincount(rows_, minlength=len(vocab)).astype(np.float64)
        idf_V = np.log(N - df_V + 0.5) - np.log(df_V + 0.5)
        idf_V = np.where(idf_V < 0, epsilon * idf_V.mean(), idf_V)
        norm = k1 * (1 - b + b * length_N[cols_] / max(length_N.mean(), 1e-9))
        weights = idf_V[rows_] * tf_ * (k1 + 1) / (tf_ + norm)
        weights_VN = sp.csr_matrix((weights.astype(np.float32), (rows_, cols_)),
                                   shape=(len(vocab), N))
        return cls(vocab, weights_VN, k1, b, epsilon)

    def query_rows(self, queries: Sequence[str]) -> sp.csr_matrix:
        """Each query's term counts [Q, V] (a repeated term counts twice, as in rank_bm25)."""
        data, rows, cols = [], [], []
        for q, text in enumerate(queries):
            for token in tokenize(text):
                if token in self.vocab:
                    rows.append(q)
                    cols.append(self.vocab[token])
                    data.append(1.0)
        return sp.csr_matrix((np.asarray(data, np.float32), (rows, cols)),
                             shape=(len(queries), len(self.vocab)))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 scores [Q, N] of every passage."""
        return (self.query_rows(queries) @ self.weights_VN).toarray()

    def search(self, queries: Sequence[str], k: int, block: int = 0):
        """(rows [Q, k], scores [Q, k]), in blocks of queries so memory stays at ~128 MB."""
        block = block or max(1, 2 ** 25 // self.size)
        out = [top_k(self.scores(queries[i:i + block]), k) for i in range(0, len(queries), block)]
        return np.concatenate([r for r, _ in out]), np.concatenate([s for _, s in out])

    def save(self, folder: pathlib.Path) -> None:
        sp.save_npz(folder / "bm25.npz", self.weights_VN)
        terms = sorted(self.vocab, key=self.vocab.get)
        (folder / "bm25.json").write_text(json.dumps(
            {"k1": self.k1, "b": self.b, "epsilon": self.epsilon, "terms": terms}))

    @classmethod
    def load(cls, folder: pathlib.Path) -> "BM25":
        meta = json.loads((folder / "bm25.json").read_text())
        vocab = {t: i for i, t in enumerate(meta["terms"])}
        return cls(vocab, sp.load_npz(folder / "bm25.npz").tocsr(), meta["k1"], meta["b"],
                   meta["epsilon"])
