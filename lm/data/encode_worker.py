"""The tokenizing worker process: numpy and sentencepiece only, so that it starts in a blink
(spawned, never forked: the parent runs JAX's threads)."""
from __future__ import annotations

import numpy as np
import sentencepiece as spm

_processor: spm.SentencePieceProcessor | None = None


def start(proto: bytes) -> None:
    global _processor
    _processor = spm.SentencePieceProcessor(model_proto=proto)


def encode(texts: list[str], bos: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """([BOS] + ids for each text, concatenated; each document's length in tokens)."""
    return pack(_processor.encode(texts, num_threads=1), bos, dtype)


def pack(ids: list[list[int]], bos: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(d) + 1 for d in ids), np.int64, len(ids))
    tokens = np.empty(int(lengths.sum()), dtype)
    starts = np.cumsum(lengths) - lengths
    tokens[starts] = bos
    for start, doc in zip(starts, ids):
        tokens[start + 1:start + 1 + len(doc)] = doc
    return tokens, lengths
