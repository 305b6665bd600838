"""The three retrievers over one index: BM25, dense (cosine of sentence embeddings) and their
reciprocal-rank fusion. Each maps questions to the rows of their k best passages, best first.

Dense search is exact (every vector, shard by shard) unless the index holds an IVF index and
`exact` is False. Hybrid fuses the two rankings to `depth` with RRF (Cormack et al. 2009):
score(p) = sum over rankings of 1 / (rrf_k + rank of p), ranks from 1, rrf_k = 60.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lm.rag.index import Index
from lm.weights import embed

METHODS = ("bm25", "dense", "hybrid")
RRF_K = 60


def bm25(index: Index, questions: Sequence[str], k: int, encoder=None, exact: bool = False):
    return index.bm25.search(list(questions), k)[0]


def dense(index: Index, questions: Sequence[str], k: int, encoder=None, exact: bool = False):
    queries_QD = embed.embed(encoder, list(questions))
    if index.ivf is not None and not exact:
        return index.approximate_search(queries_QD, k)[0]
    return index.exact_search(queries_QD, k)[0]


def fuse(rankings: Sequence[np.ndarray], k: int, rrf_k: int = RRF_K) -> np.ndarray:
    """Reciprocal-rank fusion of several [Q, depth] rankings into [Q, k] rows (ties: lower row)."""
    out = np.zeros((rankings[0].shape[0], k), np.int64)
    for q in range(out.shape[0]):
        score: dict[int, float] = {}
        for ranking in rankings:
            for rank, row in enumerate(ranking[q]):
                if row >= 0:  # faiss marks missing neighbours with -1
                    score[int(row)] = score.get(int(row), 0.0) + 1.0 / (rrf_k + rank + 1)
        best = sorted(score, key=lambda r: (-score[r], r))[:k]
        out[q, :len(best)] = best
    return out


def hybrid(index: Index, questions: Sequence[str], k: int, encoder=None, exact: bool = False,
           depth: int = 100):
    depth = max(depth, k)
    return fuse([bm25(index, questions, depth), dense(index, questions, depth, encoder, exact)], k)


RETRIEVERS = {"bm25": bm25, "dense": dense, "hybrid": hybrid}


def retrieve(method: str, index: Index, questions: Sequence[str], k: int, encoder=None,
             exact: bool = False) -> np.ndarray:
    if method not in RETRIEVERS:
        raise ValueError(f"unknown retriever {method!r}; known: {', '.join(METHODS)}")
    if method != "bm25" and encoder is None:
        raise ValueError(f"the {method} retriever needs the query encoder")
    return RETRIEVERS[method](index, questions, k, encoder, exact)
