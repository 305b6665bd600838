"""The token store: a corpus tokenized once into flat token shards on disk, read by position.

Layout of `<cache>/stores/<key>/` (the key hashes everything the tokens depend on: the format
version, tokenizer fingerprint, BOS id, corpus spec, text column, split settings and the source
files' paths, sizes and mtimes):

    meta.json               format, tokenizer, sources (with sha256), per split: shards, totals
    <split>-<k>.tokens      [BOS] + ids of each document, flat, uint16 (vocab <= 65536) or uint32
    <split>-<k>.starts      int64: each document's first position in the split's whole stream

A shard is the tokens of the documents read while its input text reached data.shard_mb, so shard
boundaries fall between documents and depend only on the input. The build goes to `<key>.partial/`
and is published by one rename, so a half-written store is never read; killed, it resumes from the
last finished shard. Plain flat files (not ArrayRecord via grain): a window is a slice of the
stream, which random-access records cannot give without reading each record whole.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import threading
import time
from typing import Iterator

import numpy as np

from core.batches import digest
from core.config import DataError
from core.packages import atomic_write
from lm.data import documents, encode_worker
from lm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
_CHUNK_CHARS = 1 << 20      # text per worker task: large enough to amortise the pickling
_POOL_MIN_BYTES = 8 << 20   # smaller inputs are tokenized in this process (no spawn cost)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe(data_cfg, tokenizer: Tokenizer, cache: pathlib.Path) -> dict:
    """What the store's tokens depend on (its key is a hash of this); built-ins get prepared."""
    spec = data_cfg.corpus.strip()
    bos = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
    if bos < 0:
        raise DataError(f"tokenizer {tokenizer.path} defines neither BOS nor EOS; packing needs one")
    read = documents.identity(spec, cache)
    return {"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint, "bos": bos,
            "dtype": token_dtype(tokenizer.vocab_size), "corpus": spec,
            "revision": read["revision"], "text_column": data_cfg.text_column,
            "split_seed": int(data_cfg.split_seed), "val_fraction": float(data_cfg.val_fraction),
            "files": read["files"]}


def store_path(cache: pathlib.Path, described: dict) -> pathlib.Path:
    return cache / "stores" / digest(described)[:24]


# ---------------------------------------------------------------- reading


class TokenStream:
    """One split's tokens: its shards seen as one flat stream.

    Tokens are read with positional reads (os.pread), not through np.memmap: the pages a memmap
    touches count in the process's resident memory, so a run that has seen its whole corpus
    would look as large as the corpus; read() copies only the rows asked for, from any thread.
    The documents' starts (8 bytes a document) are memmapped: a binary search touches few pages.
    """

    _OPEN_SHARDS = 64  # descriptors kept open per stream (a corpus may have thousands of shards)

    def __init__(self, root: pathlib.Path, split: str, meta: dict):
        shards = meta["splits"][split]["shards"]
        self.dtype = np.dtype(meta["dtype"])
        self.paths = [root / f"{split}-{k:05d}.tokens" for k in range(len(shards))]
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.starts = [np.memmap(root / f"{split}-{k:05d}.starts", dtype=np.int64, mode="r",
                                 shape=(s["docs"],)) if s["docs"] else np.zeros(0, np.int64)
                       for k, s in enumerate(shards)]
        self.offsets = np.cumsum([0] + [s["tokens"] for s in shards])  # [shards + 1]
        self.docs_before = np.cumsum([0] + [s["docs"] for s in shards])
        self.num_tokens = int(self.offsets[-1])
        self.num_docs = int(self.docs_before[-1])
        self.num_bytes = int(meta["splits"][split]["bytes"])

    def __del__(self):
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)

    def _pread(self, shard: int, size: int, offset: int) -> bytes:
        with self._lock:
            fd = self._open.pop(shard, None)
            if fd is None:
                fd = os.open(self.paths[shard], os.O_RDONLY)
                if len(self._open) >= self._OPEN_SHARDS:
                    os.close(self._open.popitem(last=False)[1])
            self._open[shard] = fd
            return os.pread(fd, size, offset)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """stream[lo:hi] as int32 (0 <= lo <= hi <= num_tokens)."""
        out = np.empty(hi - lo, np.int32)
        shard, at, size = int(np.searchsorted(self.offsets, lo, "right")) - 1, lo, self.dtype.itemsize
        while at < hi:
            base, end = int(self.offsets[shard]), min(hi, int(self.offsets[shard + 1]))
            raw = self._pread(shard, (end - at) * size, (at - base) * size)
            if len(raw) != (end - at) * size:
                raise DataError(f"token store shard {shard} of {self.num_tokens:,} tokens is "
                                "shorter than its meta.json says: the store is damaged; delete "
                                "its folder and it is rebuilt")
            out[at - lo:end - lo] = np.frombuffer(raw, self.dtype)
            at, shard = end, shard + 1
        return out

    def document_index(self, positions: np.ndarray) -> np.ndarray:
        """1-based index of the document holding each position (< num_tokens)."""
        shard = np.searchsorted(self.offsets, positions, "right") - 1
        out = np.empty(len(positions), np.int32)
        for k in np.unique(shard):
            at = shard == k
            out[at] = np.searchsorted(self.starts[k], positions[at], "right") + self.docs_before[k]
        return out


class TokenStore:
    """An opened, published store; refuses one built by another format or for other inputs."""

    def __init__(self, root: pathlib.Path, expected: dict | None = None):
        self.root = pathlib.Path(root)
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"token store {self.root} is unreadable ({error}); delete the folder "
                            "and it is rebuilt") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise DataError(f"token store {self.root} has format {self.meta.get('format')}, this "
                            f"code reads format {FORMAT_VERSION}; delete the folder to rebuild it")
        for key, value in (expected or {}).items():
            found = self.meta.get(key)
            if key == "files":  # the recorded hashes are for provenance; stat is what the key saw
                found = [{k: v for k, v in f.items() if k != "sha256"} for f in found or []]
            if found != value:
                raise DataError(f"token store {self.root} was built for another {key} "
                                f"({str(found)[:80]}, not {str(value)[:80]}): it is "
                                "stale or foreign; delete the folder and it is rebuilt")

    def stream(self, split: str) -> TokenStream:
        return TokenStream(self.root, split, self.meta)


# ---------------------------------------------------------------- building


class _ShardWriter:
    """Appends one split's tokens to a shard under a temporary name until it is finished."""

    def __init__(self, root: pathlib.Path, split: str, index: int, first_position: int):
        self.paths = [root / f"{split}-{index:05d}.{ext}" for ext in ("tokens", "starts")]
        self.files = [open(f"{p}.tmp", "wb") for p in self.paths]
        self.position, self.tokens, self.docs, self.bytes = first_position, 0, 0, 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray, num_bytes: int) -> None:
        starts = self.position + np.cumsum(lengths) - lengths
        self.files[0].write(tokens.tobytes())
        self.files[1].write(starts.astype(np.int64).tobytes())
        self.position += len(tokens)
        self.tokens, self.docs, self.bytes = (self.tokens + len(tokens), self.docs + len(lengths),
                                              self.bytes + num_bytes)

    def finish(self) -> dict:
        for f, path in zip(self.files, self.paths):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(f"{path}.tmp", path)
        return {"tokens": self.tokens, "docs": self.docs, "bytes": self.bytes}

    def discard(self) -> None:
        for f, path in zip(self.files, self.paths):
            f.close()
            pathlib.Path(f"{path}.tmp").unlink(missing_ok=True)


def _chunks(docs: Iterator[tuple[str, documents.Document]], skip: int, chunk_chars: int,
            ) -> Iterator[tuple[list[str], np.ndarray, list[int], int]]:
    """(texts, is_validation per text, UTF-8 bytes per text, input bytes read) in chunks of about
    chunk_chars, after the first `skip` documents."""
    texts, flags, sizes, chars = [], [], [], 0
    for number, (split, doc) in enumerate(docs):
        if number < skip:
            continue
        texts.append(doc.text)
        flags.append(split == "validation")
        sizes.append(len(doc.text.encode("utf-8")))
        chars += len(doc.text)
        if chars >= chunk_chars:
            yield texts, np.asarray(flags), sizes, doc.read_bytes
            texts, flags, sizes, chars = [], [], [], 0
    if texts:
        yield texts, np.asarray(flags), sizes, doc.read_bytes


class _Encoder:
    """Tokenizes chunks in order: in worker processes (at most 2 chunks in flight per worker, so
    memory stays bounded), or in this process for small inputs."""

    def __init__(self, tokenizer: Tokenizer, bos: int, dtype: str, workers: int):
        self.tokenizer, self.bos, self.dtype, self.pool = tokenizer, bos, dtype, None
        if workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=encode_worker.start, initargs=(tokenizer.proto,))
        self.depth = 2 * max(1, workers)

    def map(self, chunks: Iterator[tuple]) -> Iterator[tuple]:
        """(chunk, tokens, lengths) for each chunk, in order."""
        if self.pool is None:
            for chunk in chunks:
                ids = self.tokenizer.encode(chunk[0])
                yield (chunk, *encode_worker.pack(ids, self.bos, self.dtype))
            return
        pending: collections.deque = collections.deque()
        try:
            for chunk in chunks:
                pending.append((chunk, self.pool.submit(encode_worker.encode, chunk[0], self.bos,
                                                        self.dtype)))
                if len(pending) >= self.depth:
                    done, result = pending.popleft()
                    yield (done, *result.result())
            while pending:
                done, result = pending.popleft()
                yield (done, *result.result())
        except concurrent.futures.BrokenExecutor:
            raise DataError("a tokenizing worker process died (out of memory?): run again with "
                            "fewer data.workers; the finished shards are kept") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _progress_bar(total: int | None, shown: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not shown,
                mininterval=2.0, smoothing=0.1)


def build(data_cfg, tokenizer: Tokenizer, cache: pathlib.Path, workers: int = 0,
          shard_mb: float = 256.0, progress: bool = True) -> pathlib.Path:
    """Builds the store for data.corpus if it is not there yet (resuming a killed build) and
    returns its folder."""
    described = describe(data_cfg, tokenizer, cache)
    root = store_path(cache, described)
    if (root / "meta.json").is_file():
        TokenStore(root, described)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building it: wait, then use its store
        if (root / "meta.json").is_file():
            TokenStore(root, described)
            return root
        _build(data_cfg, tokenizer, cache, described, root, workers, shard_mb, progress)
    return root


def _build(data_cfg, tokenizer: Tokenizer, cache: pathlib.Path, described: dict,
           root: pathlib.Path, workers: int, shard_mb: float, progress: bool) -> None:
    started = time.perf_counter()
    partial = root.with_name(root.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    done_path = partial / "progress.json"
    done = {"shards": []}
    if done_path.is_file():
        try:
            done = json.loads(done_path.read_text())
        except ValueError:
            log.warning("%s is unreadable: the build starts over", done_path)
    skip = sum(s["docs_read"] for s in done["shards"])
    files = described["files"]
    total = sum(f["size"] for f in files) or None
    workers = workers or os.cpu_count() or 1
    if total is not None and total < _POOL_MIN_BYTES:
        workers = 1
    encoder, bar, writers = None, _progress_bar(total, progress), {}
    bar.update(done["shards"][-1]["read_bytes"] if done["shards"] else 0)
    try:
        encoder = _Encoder(tokenizer, described["bos"], described["dtype"], workers)
        chunk_chars = int(min(_CHUNK_CHARS, shard_mb * 2 ** 18))  # >= 4 chunks a shard
        chunks = _chunks(documents.split_documents(data_cfg, cache), skip, chunk_chars)
        shard_bytes, docs_read, read = 0, 0, bar.n
        for (texts, is_val, sizes, read_bytes), tokens, lengths in encoder.map(chunks):
            if not writers:  # a new shard: its documents start where the finished ones end
                writers = {split: _ShardWriter(partial, split, len(done["shards"]),
                                               sum(s[split]["tokens"] for s in done["shards"]))
                           for split in SPLITS}
            per_token = np.repeat(is_val, lengths)
            sizes = np.asarray(sizes)
            for split, mask, token_mask in (("train", ~is_val, ~per_token),
                                            ("validation", is_val, per_token)):
                writers[split].write(tokens[token_mask], lengths[mask], int(sizes[mask].sum()))
            shard_bytes += int(sizes.sum())
            docs_read += len(texts)
            bar.update(max(0, read_bytes - read) if total else int(sizes.sum()))
            read = read_bytes
            bar.set_postfix(docs=f"{skip + docs_read:,}", refresh=False)
            if shard_bytes >= shard_mb * 2 ** 20:
                _finish_shard(writers, done, done_path, docs_read, read_bytes)
                writers, shard_bytes, docs_read = {}, 0, 0
        if writers:
            _finish_shard(writers, done, done_path, docs_read, read)
    except BaseException as error:  # the half shard goes; the finished ones stay for a rerun
        for writer in writers.values():
            writer.discard()
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise DataError(f"the disk filled while writing the token store {partial}: free "
                            "space and run again; the finished shards are kept and the build "
                            "continues from them") from None
        raise
    finally:
        if encoder is not None:
            encoder.close()
        bar.close()
    _publish(partial, root, described, done["shards"], files, time.perf_counter() - started)


def _finish_shard(writers: dict, done: dict, done_path: pathlib.Path, docs_read: int,
                  read_bytes: int) -> None:
    shard = {split: writer.finish() for split, writer in writers.items()}
    done["shards"].append({**shard, "docs_read": docs_read, "read_bytes": read_bytes})
    atomic_write(done_path, lambda f: json.dump(done, f))


def _publish(partial: pathlib.Path, root: pathlib.Path, described: dict, shards: list,
             files: list[dict], seconds: float) -> None:
    if not sum(s["train"]["docs"] for s in shards):
        shutil.rmtree(partial)
        raise DataError(f"data.corpus '{described['corpus']}' holds no non-empty documents for "
                        "training")
    meta = dict(described, files=[dict(f, sha256=_sha256(f["path"])) for f in files],
                build_seconds=seconds,  # this (last) run of the build
                splits={split: {"shards": [s[split] for s in shards],
                                "tokens": sum(s[split]["tokens"] for s in shards),
                                "docs": sum(s[split]["docs"] for s in shards),
                                "bytes": sum(s[split]["bytes"] for s in shards)}
                        for split in SPLITS})
    atomic_write(partial / "meta.json", lambda f: json.dump(meta, f, indent=1))
    os.replace(partial, root)
    (root / "progress.json").unlink()  # after the rename: a kill before it loses no shard
    log.info("token store %s built in %.1f s: %s", root, seconds, ", ".join(
        f"{split} {meta['splits'][split]['docs']:,} documents, {meta['splits'][split]['tokens']:,} "
        "tokens" for split in SPLITS))
