"""Answer and retrieval metrics: SQuAD v1.1's exact match and token F1 (its official answer
normalisation), recall@k of a gold document, and percentile-bootstrap 95% intervals of a mean."""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD v1.1 evaluation script)."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_in(answer: str, passage: str) -> bool:
    """Whether the passage holds the answer as whole words, both normalised (a non-empty one)."""
    wanted = normalize_answer(answer)
    return bool(wanted) and f" {wanted} " in f" {normalize_answer(passage)} "


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    return max(_f1(prediction, a) for a in answers)


def recall_at(ranked_docs_QK: np.ndarray, gold_Q: Sequence[str], ks: Sequence[int]) -> dict:
    """{k: share of questions whose gold document is among the first k retrieved}."""
    hit_QK = np.asarray(ranked_docs_QK) == np.asarray(gold_Q)[:, None]
    return {k: float(hit_QK[:, :k].any(1).mean()) for k in ks}


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> dict:
    """{mean, low, high}: the mean and its 95% percentile-bootstrap interval."""
    x = np.asarray(values, np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": len(x)}
