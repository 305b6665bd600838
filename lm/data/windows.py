"""Text data: load documents, split them by document, tokenize once (cached), pack into windows.

Every step is a pure function of the config, so every host of a multi-host run builds the same
windows on its own and takes only its rows of each global batch; the batch order is a pure
function of (seed, step), so the iterator's whole state is one integer.

Corpus specs (data.corpus): '+'-joined built-in names (see lm.data.corpora.KNOWN_CORPORA);
'files:<path-or-glob-or-dir>' (.txt: one doc per file; .jsonl/.json/.parquet: one doc per row);
'hub:<dataset>[:<config>]' (datasets.load_dataset by name; needs internet or the HF cache; if the
dataset has a 'validation' split it is used as is, else its 'train' split is split by document).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import math
import os
import pathlib
from typing import Callable, Iterable, Iterator

import datasets
import numpy as np

from core.batches import arrays_crc, digest, sum_batches
from core import textfiles
from core.config import DataError, check_ranges
from core.packages import atomic_write, cache_dir
from lm.data import corpora
from lm.data.tokenizer import Tokenizer

_TOKENS_VERSION = 1  # bump when the on-disk token stream format changes
_FILE_EXTS = (".txt", ".jsonl", ".json", ".parquet")


def _texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- loading and splitting


def _column(ds: datasets.Dataset, name: str) -> list:
    """A whole column as a Python list (iterating a datasets Column item by item is slow)."""
    return ds[name][:]


def _iter_texts(texts: Iterable[str]) -> Iterator[str]:
    if isinstance(texts, getattr(datasets, "Column", ())):  # slices are fast, single items are not
        for k in range(0, len(texts), 4096):
            yield from texts[k:k + 4096]
    else:
        yield from texts


def _expand_files(spec: str) -> list[str]:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in _FILE_EXTS)
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
    else:
        files = [str(path)] if path.is_file() else []
    if not files:
        raise DataError(f"data.corpus 'files:{spec}': no such file, or no {'/'.join(_FILE_EXTS)} "
                        f"files match {path}")
    bad = [f for f in files if pathlib.Path(f).suffix not in _FILE_EXTS]
    if bad:
        raise DataError(f"unsupported file type {bad[0]}: use one of {', '.join(_FILE_EXTS)}")
    return files


def _normalize(ds: datasets.Dataset, text_column: str, source: str, where: str) -> datasets.Dataset:
    """Keeps columns text/id/source (all strings), drops empty documents.

    Rows without an id get a hash of their text, so the split survives reordering or adding
    files, and duplicate documents always land in the same split.
    """
    if text_column not in ds.column_names:
        raise DataError(f"{where} has no column '{text_column}' (data.text_column); "
                        f"columns are {ds.column_names}")
    texts = _column(ds, text_column)
    ids = (_column(ds, "id") if "id" in ds.column_names else
           [hashlib.sha1(t.encode("utf-8")).hexdigest()[:16] if t else "" for t in texts])
    sources = _column(ds, "source") if "source" in ds.column_names else [source] * len(ds)
    keep = [k for k, t in enumerate(texts) if t]
    return datasets.Dataset.from_dict({"id": [str(ids[k]) for k in keep],
                                       "source": [str(sources[k]) for k in keep],
                                       "text": [texts[k] for k in keep]})


def _load_files(spec: str, text_column: str, cache: pathlib.Path) -> datasets.Dataset:
    files = _expand_files(spec)
    for path in files:
        if not path.endswith(".txt"):  # .txt files are checked by read_text as they are read
            textfiles.refuse_blank(path)
        if path.endswith((".jsonl", ".json")):
            textfiles.check_utf8(path)  # Arrow's JSON reader lets bad bytes through to later
    parts = []
    txt = [f for f in files if f.endswith(".txt")]
    if txt:
        texts = [textfiles.read_text(f) for f in txt]
        base = os.path.commonpath([os.path.dirname(f) for f in txt])
        parts.append(datasets.Dataset.from_dict({"id": [os.path.relpath(f, base) for f in txt],
                                                 "source": ["files"] * len(txt), "text": texts}))
    for builder, exts in (("json", (".jsonl", ".json")), ("parquet", (".parquet",))):
        group = [f for f in files if f.endswith(exts)]
        if group:
            ds = _read_rows(builder, group, cache)
            parts.append(_normalize(ds, text_column, "files", f"files {group[:3]}"))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return _normalize(ds, "text", "files", f"files:{spec}")


def _read_rows(builder: str, files: list[str], cache: pathlib.Path) -> datasets.Dataset:
    """The files' rows through datasets' Arrow reader; when it fails, the file (and line) at
    fault, found by reading the JSON-lines files again line by line."""
    reader_log = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = reader_log.level
    reader_log.setLevel(logging.CRITICAL)  # its failure is reported below, naming the line
    try:
        return datasets.load_dataset(builder, data_files=files, split="train",
                                     cache_dir=str(cache / "hf"))
    except Exception as error:  # pyarrow's and datasets' many error types: one user error here
        for path in files:
            if path.endswith(".jsonl"):
                textfiles.check_jsonl(path)
        raise DataError(f"datasets could not read {files[:3]} as {builder}: "
                        f"{' '.join(str(error).split())[:300]}") from error
    finally:
        reader_log.setLevel(level)


def _load_hub(spec: str, text_column: str) -> dict[str, datasets.Dataset]:
    name, _, config = spec.partition(":")
    try:
        dd = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, gated, ...: all one user-facing error
        raise DataError(f"datasets.load_dataset('{name}', {config or None!r}) failed: {e}. "
                        f"Without internet, use a built-in corpus or 'files:<path>'.") from e
    if "train" not in dd:
        raise DataError(f"hub dataset '{spec}' has no 'train' split (splits: {list(dd)})")
    return {k: _normalize(dd[k], text_column, f"hub:{name}", f"hub:{spec}[{k}]")
            for k in ("train", "validation") if k in dd}


def _is_validation(seed: int, source: str, doc_id: str, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}\x00{source}\x00{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2.0 ** 64


# The numbers a data setting may take (core.config.in_range rules).
RANGES = {"val_fraction": "[0, 1)", "seq_len": ">= 1", "test_fraction": "[0, 1)"}
TOKENIZER_RANGES = {"vocab_size": ">= 1", "max_train_chars": ">= 1"}


def check_config(data_cfg) -> None:
    """The data section, before anything is read: ranges, the corpus names, and that the files
    a 'files:' corpus names exist."""
    check_ranges("data", data_cfg, RANGES)
    if "tokenizer" in data_cfg:
        check_ranges("data.tokenizer", data_cfg.tokenizer, TOKENIZER_RANGES)
    spec = data_cfg.get("corpus", "").strip()
    if spec.startswith("files:"):
        _expand_files(spec[6:])
    elif spec and not spec.startswith("hub:"):
        for name in spec.split("+"):
            corpora.check_name(name.strip())


def load_splits(data_cfg) -> dict[str, datasets.Dataset]:
    """{'train', 'validation'} datasets with columns id/source/text, split by document hash."""
    spec, cache = data_cfg.corpus.strip(), cache_dir(data_cfg.cache_dir)
    frac, seed = float(data_cfg.val_fraction), int(data_cfg.split_seed)
    if not 0.0 <= frac < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {frac}")
    if spec.startswith("hub:"):
        given = _load_hub(spec[4:], data_cfg.text_column)
        if "validation" in given:
            return given
        ds = given["train"]
    elif spec.startswith("files:"):
        ds = _load_files(spec[6:], data_cfg.text_column, cache)
    else:
        names = [corpora.check_name(n.strip()) for n in spec.split("+")]
        paths = [str(corpora.prepare(n, cache)) for n in names]
        ds = datasets.load_dataset("json", data_files=paths, split="train",
                                   cache_dir=str(cache / "hf"))
        ds = _normalize(ds, "text", "", f"corpus '{spec}'")
    if len(ds) == 0:
        raise DataError(f"data.corpus '{spec}' holds no non-empty documents")
    keys = zip(_column(ds, "source"), _column(ds, "id"))
    is_val = [_is_validation(seed, source, doc_id, frac) for source, doc_id in keys]
    splits = {"train": ds.select([k for k, v in enumerate(is_val) if not v]),
              "validation": ds.select([k for k, v in enumerate(is_val) if v])}
    if frac > 0 and (len(splits["train"]) == 0 or len(splits["validation"]) == 0):
        raise DataError(f"data.corpus '{spec}' has only {len(ds)} documents: with val_fraction="
                        f"{frac} one split is empty; add documents or change val_fraction")
    return splits


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
        key = digest(tcfg.kind, tcfg.vocab_size, _texts_digest(sample), data_cfg.corpus)[:16]
        name = f"{tcfg.kind}{tcfg.vocab_size}-{key}.model"
        path = cache_dir(data_cfg.cache_dir) / "tokenizers" / name
        if path.is_file():
            tok = Tokenizer.load(path)
        else:
            try:
                tok = Tokenizer.train(sample, path, tcfg.kind, tcfg.vocab_size)
            except (RuntimeError, ValueError) as e:
                raise DataError(f"training a {tcfg.kind} tokenizer of {tcfg.vocab_size} pieces on "
                                f"{total:,} chars failed: {e}. Try a smaller "
                                f"data.tokenizer.vocab_size.") from e
    if workdir is not None:
        dest = pathlib.Path(workdir) / "tokenizer.model"
        if not dest.is_file():  # never replaced: it is the tokenizer the run's checkpoints use
            atomic_write(dest, lambda f: f.write(path.read_bytes()), "wb")
    return tok


# ---------------------------------------------------------------- tokenizing and packing


@dataclasses.dataclass
class Windows:
    """Packed windows: row i is stream[i*T : i*T+T+1], so every real token is a target once."""
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


def _encode_stream(tokenizer: Tokenizer, texts: list[str],
                   bos: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat stream [BOS] + doc for each doc, and each doc's start offset."""
    lengths, chunks = [], []
    step = 256  # docs per batch call: bounds memory, keeps both cores busy
    for k in range(0, len(texts), step):
        for ids in tokenizer.encode(texts[k:k + step]):
            chunks.append(np.asarray([bos] + ids, dtype=np.int32))
            lengths.append(len(ids) + 1)
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return stream, starts


def pack(stream: np.ndarray, starts: np.ndarray, seq_len: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Chops a stream into [N, seq_len+1] windows overlapping by one token; pads the last."""
    length = len(stream)
    n = max(1, math.ceil((length - 1) / seq_len))
    seg = np.zeros(n * seq_len + 1, np.int32)
    seg[:length] = np.repeat(np.arange(1, len(starts) + 1, dtype=np.int32),
                             np.diff(np.append(starts, length)))
    tok = np.full(n * seq_len + 1, pad_id, np.int32)
    tok[:length] = stream
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tok[idx], seg[idx]


def tokenized_windows(data_cfg, tokenizer: Tokenizer, split: str,
                      texts: Iterable[str] | None = None) -> Windows:
    """Tokenizes a split once (cached under <cache>/tokens) and packs it into windows."""
    if texts is None:
        texts = load_splits(data_cfg)[split]["text"]
    texts = list(_iter_texts(texts))
    if not texts:
        raise DataError(f"split '{split}' of data.corpus '{data_cfg.corpus}' has no documents")
    bos = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
    if bos < 0:
        raise DataError(f"tokenizer {tokenizer.path} defines neither BOS nor EOS; "
                        "packing needs one")
    key = digest(_TOKENS_VERSION, tokenizer.fingerprint, _texts_digest(texts), split, bos)[:24]
    path = cache_dir(data_cfg.cache_dir) / "tokens" / f"{split}-{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            stream, starts, num_bytes = f["stream"], f["starts"], int(f["num_bytes"])
    else:
        stream, starts = _encode_stream(tokenizer, texts, bos)
        num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        atomic_write(path, lambda f: np.savez(f, stream=stream, starts=starts,
                                                      num_bytes=np.int64(num_bytes)), "wb")
    tokens, segment_ids = pack(stream, starts, int(data_cfg.seq_len), tokenizer.pad_id)
    return Windows(tokens, segment_ids, num_bytes, len(stream), len(starts))


# ---------------------------------------------------------------- batches


def evaluator(windows: Windows, batch_size: int, metrics: Callable):
    """evaluate(run_batch, max_batches) -> the objective's metrics over the windows (causal LM:
    loss, perplexity, accuracy, bits per byte)."""
    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        totals, seen = sum_batches(windows, batch_size, run_batch, max_batches)
        # With max_batches the bytes are pro-rated by windows seen (an estimate); else exact.
        num_bytes = windows.num_bytes * seen / max(len(windows.tokens), 1)
        return metrics(totals, num_bytes)
    return evaluate
