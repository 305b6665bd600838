"""Text data for training: the corpus split by document, the tokenizer, and packed windows read
from the token store (lm/data/token_store.py), one store per source of a mixture.

Every host of a multi-host run sees the same windows and takes only its rows of each global
batch; the batch order is a pure function of (seed, step), so the iterator's whole state is one
integer. Corpus specs: lm/data/documents.py; weighted mixtures: lm/data/mixture.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import zlib
from typing import Callable, Iterable, Iterator

import datasets
import numpy as np

from core.batches import arrays_crc, digest, scatter_rows, sum_batches
from core.config import DataError, check_ranges
from core.packages import atomic_write, cache_dir
from lm.data import corpora, documents, mixture, token_store
from lm.data.tokenizer import Tokenizer


def _texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- loading and splitting


def _iter_texts(texts: Iterable[str]) -> Iterator[str]:
    if isinstance(texts, getattr(datasets, "Column", ())):  # slices are fast, single items are not
        for k in range(0, len(texts), 4096):
            yield from texts[k:k + 4096]
    else:
        yield from texts


# The numbers a data setting may take (core.config.in_range rules).
RANGES = {"val_fraction": "[0, 1)", "seq_len": ">= 1", "test_fraction": "[0, 1)",
          "workers": ">= 0", "shard_mb": "> 0", "prefetch": ">= 0"}
TOKENIZER_RANGES = {"vocab_size": ">= 1", "max_train_chars": ">= 1"}


def check_config(data_cfg) -> None:
    """The data section, before anything is read: ranges, the corpus names and mixture weights,
    and that the files a 'files:' corpus names exist."""
    check_ranges("data", data_cfg, RANGES)
    if "tokenizer" in data_cfg:
        check_ranges("data.tokenizer", data_cfg.tokenizer, TOKENIZER_RANGES)
    for spec, _ in mixture.parse(data_cfg.get("corpus", "")):
        if spec.startswith("files:"):
            documents.expand_files(spec[6:])
        elif spec and not spec.startswith("hub:"):
            for name in spec.split("+"):
                corpora.check_name(name.strip())


def load_splits(data_cfg) -> dict[str, datasets.Dataset]:
    """{'train', 'validation'} datasets with columns id/source/text, split by document hash, in
    memory: for objectives that need the texts themselves (training streams the token store)."""
    spec = data_cfg.corpus.strip()
    frac = float(data_cfg.val_fraction)
    if len(mixture.parse(spec)) > 1:
        raise DataError(f"data.corpus '{spec}' is a weighted mixture, which only causal and "
                        "masked LM training reads; give one corpus")
    rows: dict[str, dict[str, list]] = {k: {"id": [], "source": [], "text": []}
                                        for k in token_store.SPLITS}
    for split, doc in documents.split_documents(data_cfg, cache_dir(data_cfg.cache_dir)):
        for column in ("id", "source", "text"):
            rows[split][column].append(getattr(doc, column))
    total = sum(len(r["text"]) for r in rows.values())
    if total == 0:
        raise DataError(f"data.corpus '{spec}' holds no non-empty documents")
    if frac > 0 and not all(r["text"] for r in rows.values()):
        raise DataError(f"data.corpus '{spec}' has only {total} documents: with val_fraction="
                        f"{frac} one split is empty; add documents or change val_fraction")
    return {split: datasets.Dataset.from_dict(r) for split, r in rows.items()}


def train_texts(data_cfg) -> Iterator[str]:
    """The train split's texts, streamed in corpus order; a mixture's sources take turns by
    weight (a sample for the tokenizer to train on then reflects the mixture)."""
    cache = cache_dir(data_cfg.cache_dir)
    parts = mixture.parse(data_cfg.corpus)
    streams = [(doc.text for split, doc in documents.split_documents(
        part_config(data_cfg, spec), cache) if split == "train") for spec, _ in parts]
    if len(streams) == 1:
        yield from streams[0]
        return
    weights = np.array([w for _, w in parts], float)
    taken = np.zeros(len(streams))
    while streams:
        k = int(np.argmin(taken / weights))  # the source furthest below its share of the chars
        text = next(streams[k], None)
        if text is None:
            del streams[k]
            weights, taken = np.delete(weights, k), np.delete(taken, k)
            continue
        taken[k] += len(text)
        yield text


def part_config(data_cfg, spec: str):
    part = data_cfg.copy_and_resolve_references()
    part.corpus = spec
    return part


# ---------------------------------------------------------------- tokenizer


def get_tokenizer(data_cfg, train_texts: Iterable[str],
                  workdir: str | pathlib.Path | None = None) -> Tokenizer:
    """Loads data.tokenizer.path, or trains on the train texts once and caches the model.

    The cache key hashes the training sample itself (plus kind and vocab size), so a changed file
    under 'files:' can never reuse a stale tokenizer.
    """
    tcfg = data_cfg.tokenizer
    if tcfg.path:
        path = pathlib.Path(tcfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"data.tokenizer.path={path} does not exist; "
                            "leave it empty to train one")
        tok = Tokenizer.load(path)
    else:
        sample, total = [], 0
        for text in _iter_texts(train_texts):
            sample.append(text[:max(0, tcfg.max_train_chars - total)])
            total += len(sample[-1])
            if total >= tcfg.max_train_chars:
                break
        key = digest(tcfg.kind, tcfg.vocab_size, _texts_digest(sample),
                     data_cfg.get("corpus", ""))[:16]
        name = f"{tcfg.kind}{tcfg.vocab_size}-{key}.model"
        path = cache_dir(data_cfg.cache_dir) / "tokenizers" / name
        if path.is_file():
            tok = Tokenizer.load(path)
        else:
            try:
                tok = Tokenizer.train(sample, path, tcfg.kind, tcfg.vocab_size)
            except (RuntimeError, ValueError) as e:
                raise DataError(f"training a {tcfg.kind} tokenizer of {tcfg.vocab_size} pieces on "
                                f"{total:,} chars failed: {e}. Change "
                                f"data.tokenizer.vocab_size as that says (smaller for little "
                                f"text, larger for many distinct characters).") from e
    if workdir is not None:
        dest = pathlib.Path(workdir) / "tokenizer.model"
        if not dest.is_file():  # never replaced: it is the tokenizer the run's checkpoints use
            atomic_write(dest, lambda f: f.write(path.read_bytes()), "wb")
    return tok


# ---------------------------------------------------------------- windows


@dataclasses.dataclass
class Windows:
    """Packed windows in memory (labelled sets, sentence pairs, tests)."""
    tokens: np.ndarray       # [N, T+1] int32, pad_id after the stream ends
    segment_ids: np.ndarray  # [N, T+1] int32, 1-based document index; 0 = padding
    num_bytes: int           # UTF-8 bytes of the split's document texts
    num_tokens: int          # real tokens in the stream, one BOS per document included
    num_docs: int = 0
    labels: np.ndarray | None = None       # [N] int32 per-window labels (classification)
    token_types: np.ndarray | None = None  # [N, T] int32 sentence A/B ids (classification)

    def __len__(self) -> int:
        return len(self.tokens)

    def content_crc(self) -> int:
        return arrays_crc(self.tokens)

    def describe_rows(self) -> tuple[str, str]:
        """(what a row is, what else shrinks the batch) for BatchIterator's errors."""
        return f"windows of {self.tokens.shape[1] - 1} tokens", " or seq_len"

    def rows(self, index) -> dict[str, np.ndarray]:
        """The batch fields of the chosen rows."""
        batch = {"tokens": self.tokens[index], "segment_ids": self.segment_ids[index]}
        for name in ("labels", "token_types"):
            if getattr(self, name) is not None:
                batch[name] = getattr(self, name)[index]
        return batch


def row_indices(index, n: int) -> np.ndarray:
    """The rows a slice or an index array picks out of n, without an index of all n rows."""
    if isinstance(index, slice):
        return np.arange(*index.indices(n), dtype=np.int64)
    rows = np.asarray(index, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row index out of range [0, {n})")
    return rows


class StoreWindows:
    """Windows over a token stream on disk: row i is stream[i*T : i*T+T+1], padded after the
    stream ends, so every real token is a target once. Nothing is materialised: a batch reads
    its rows' tokens and derives their segment ids (1-based document index; 0 = padding)."""

    def __init__(self, store: token_store.TokenStore, split: str, seq_len: int, pad_id: int):
        self.store, self.split, self.seq_len, self.pad_id = store, split, seq_len, pad_id
        self.stream = store.stream(split)
        self.num_tokens, self.num_docs = self.stream.num_tokens, self.stream.num_docs
        self.num_bytes = self.stream.num_bytes
        self._len = max(1, math.ceil((self.num_tokens - 1) / seq_len))

    def __len__(self) -> int:
        return self._len

    def describe_rows(self) -> tuple[str, str]:
        return f"windows of {self.seq_len} tokens", " or seq_len"

    def _tokens(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), T+1] windows: one read for a run of consecutive rows, else one a row."""
        t, end = self.seq_len, self.num_tokens
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
            lo = int(rows[0]) * t
            span = self.stream.read(lo, min((int(rows[-1]) + 1) * t + 1, end))
            positions = rows[:, None] * t + np.arange(t + 1) - lo
            tokens = np.full(positions.shape, self.pad_id, np.int32)
            real = positions < len(span)
            tokens[real] = span[positions[real]]
            return tokens
        tokens = np.full((len(rows), t + 1), self.pad_id, np.int32)
        for row, i in enumerate(rows.tolist()):
            span = self.stream.read(i * t, min(i * t + t + 1, end))
            tokens[row, :len(span)] = span
        return tokens

    def rows(self, index) -> dict[str, np.ndarray]:
        rows = row_indices(index, self._len)
        positions = rows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        real = positions < self.num_tokens
        segment_ids = np.zeros(positions.shape, np.int32)
        segment_ids[real] = self.stream.document_index(positions[real])
        return {"tokens": self._tokens(rows), "segment_ids": segment_ids}

    def content_crc(self) -> int:
        """CRC-32 of the windows as one [N, T+1] int32 array (as Windows.content_crc), computed
        once per split and window length (one pass over the stream) and kept beside the store."""
        path = self.store.root / f"crc-{self.split}-{self.seq_len}-{self.pad_id}.json"
        if path.is_file():
            return json.loads(path.read_text())["crc"]
        crc, step = 0, max(1, (1 << 22) // (self.seq_len + 1))
        for first in range(0, self._len, step):
            rows = np.arange(first, min(first + step, self._len), dtype=np.int64)
            crc = zlib.crc32(self._tokens(rows).data, crc)
        atomic_write(path, lambda f: json.dump({"crc": crc}, f))
        return crc


class ConcatRows:
    """Several row sources as one (a mixture's validation windows, evaluated together)."""

    def __init__(self, sources: list):
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.num_bytes = sum(s.num_bytes for s in sources)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def content_crc(self) -> int:
        return zlib.crc32(json.dumps([s.content_crc() for s in self.sources]).encode())

    def rows(self, index) -> dict[str, np.ndarray]:
        rows = row_indices(index, len(self))
        if not len(rows):  # a host's share of the last evaluation batch may be empty
            return self.sources[0].rows(rows)
        owner = np.searchsorted(self.offsets, rows, "right") - 1
        return scatter_rows([(owner == k, self.sources[k].rows(rows[owner == k] - self.offsets[k]))
                             for k in np.unique(owner)], len(rows))


@dataclasses.dataclass
class CorpusWindows:
    """Each source's train windows with its weight (one source unless data.corpus is a
    weighted mixture), and the validation windows of them all."""
    train: list[StoreWindows]
    weights: list[float]
    names: list[str]
    validation: StoreWindows | ConcatRows


def prepare_store(data_cfg, tokenizer: Tokenizer, progress: bool = True) -> pathlib.Path:
    """Builds (or finds) the token store of a single-source data.corpus. On many hosts, process
    0 builds it and the others wait for its publication; where the cache folder is not shared
    each host then builds its own."""
    import jax
    cache = cache_dir(data_cfg.cache_dir)
    build = dict(cache=cache, workers=int(data_cfg.get("workers", 0)),
                 shard_mb=float(data_cfg.get("shard_mb", 256)), progress=progress)
    if jax.process_count() == 1:
        return token_store.build(data_cfg, tokenizer, **build)
    from jax.experimental import multihost_utils
    failure = None
    if jax.process_index() == 0:
        try:
            root = token_store.build(data_cfg, tokenizer, **build)
            StoreWindows(token_store.TokenStore(root), "train", int(data_cfg.seq_len),
                         tokenizer.pad_id).content_crc()
        except Exception as error:  # the others must hear of it, not wait at the barrier forever
            failure = error
    built = multihost_utils.broadcast_one_to_all(np.int32(failure is None))
    if failure is not None:
        raise failure
    if not built:
        raise DataError("process 0 failed to build the token store of data.corpus "
                        f"'{data_cfg.corpus}'; its log says why")
    return token_store.build(data_cfg, tokenizer, **build)


def corpus_windows(data_cfg, tokenizer: Tokenizer) -> CorpusWindows:
    """The windows of data.corpus, each source tokenized into its store once (built if missing)."""
    parts = mixture.parse(data_cfg.corpus)
    train, validation = [], []
    for spec, _ in parts:
        part = part_config(data_cfg, spec)
        store = token_store.TokenStore(prepare_store(part, tokenizer))
        windows = {split: StoreWindows(store, split, int(data_cfg.seq_len), tokenizer.pad_id)
                   for split in token_store.SPLITS}
        if not windows["validation"].num_docs:
            raise DataError(f"the validation split of data.corpus '{spec}' is empty "
                            f"({windows['train'].num_docs} documents, val_fraction="
                            f"{data_cfg.val_fraction}): add documents or raise val_fraction")
        train.append(windows["train"])
        validation.append(windows["validation"])
    return CorpusWindows(train, [w for _, w in parts], [spec for spec, _ in parts],
                         validation[0] if len(validation) == 1 else ConcatRows(validation))


# ---------------------------------------------------------------- batches


def evaluator(windows: Windows, batch_size: int, metrics: Callable):
    """evaluate(run_batch, max_batches) -> the objective's metrics over the windows (causal LM:
    loss, perplexity, accuracy, bits per byte)."""
    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        totals, seen = sum_batches(windows, batch_size, run_batch, max_batches)
        # With max_batches the bytes are pro-rated by windows seen (an estimate); else exact.
        num_bytes = windows.num_bytes * seen / max(len(windows), 1)
        return metrics(totals, num_bytes)
    return evaluate
