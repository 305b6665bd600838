"""A retrieval index on disk: the passages, their BM25 matrix and their dense vectors.

    <index>/settings.json   what it is built from: collection (and its fingerprint), passage size
                            and overlap, encoder (and its fingerprint); written first
    <index>/passages.jsonl  one passage a line (id, doc_id, start, end, text, title)
    <index>/bm25.npz, bm25.json
    <index>/vectors/<k>.npy the dense vectors of passages [k*S, (k+1)*S), float32, unit length
    <index>/ivf.faiss       an approximate (IVF) index, built past `approximate_above` passages
    <index>/meta.json       written last: the index is whole

Building is resumable: every file is written under a temporary name and renamed once whole, and
a run finds what is there and does the rest. With several processes (jax.distributed), process p
encodes the shards k with k % P == p on its own devices into a folder they share, and process 0
writes what comes after. An index whose settings or fingerprints disagree with what it is opened
for is refused (delete it or name another folder); it is never overwritten.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import time
import zipfile
from typing import Sequence

import numpy as np

from core.cli import one_line as cli_line
from core.config import DataError
from core.packages import atomic_write
from lm.rag import collections
from lm.rag.passages import Passage, chunk
from lm.rag.sparse import BM25, top_k
from lm.weights import embed

log = logging.getLogger(__name__)
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    collection: str = collections.BENCHMARK
    text_column: str = "text"
    size: int = 192                  # passage length in encoder tokens (the encoder reads 256)
    overlap: int = 32
    encoder: str = embed.DEFAULT_MODEL
    shard_passages: int = 8192       # dense vectors per file (a unit of resumption)
    approximate_above: int = 100_000  # passages past which an IVF index is built and searched
    ivf_lists: int = 0               # 0: 4 * sqrt(passages)


class StaleIndexError(DataError):
    """The index on disk was built from other data, settings or encoder."""


def _identity(settings: IndexSettings, cache: pathlib.Path, encoder) -> dict:
    return {"format": FORMAT, "collection": settings.collection,
            "collection_fingerprint": collections.fingerprint(settings.collection, cache,
                                                              settings.text_column),
            "text_column": settings.text_column, "size": settings.size,
            "overlap": settings.overlap, "encoder": settings.encoder,
            "encoder_fingerprint": encoder.fingerprint, "shard_passages": settings.shard_passages}


def _differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{k} {saved.get(k)!r} != {v!r}" for k, v in wanted.items() if saved.get(k) != v]


def write_json(path: pathlib.Path, value) -> None:
    atomic_write(path, lambda f: json.dump(value, f, indent=1))


def save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), mode="wb")


def _progress(total: int, desc: str, shown: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=" passages", disable=not shown, mininterval=2.0)


def read_passages(path: pathlib.Path) -> list[Passage]:
    with open(path, encoding="utf-8") as lines:
        return [Passage(**json.loads(line)) for line in lines]


class Index:
    """An opened index: passages, BM25, dense vectors (memory-mapped) and the IVF index if any."""

    def __init__(self, folder: str | pathlib.Path, encoder_fingerprint: str = ""):
        self.folder = pathlib.Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.folder} holds no finished index (no meta.json): build it with "
                            "python -m lm.rag index --index " + str(self.folder))
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise StaleIndexError(f"{self.folder} has index format {self.meta.get('format')}, "
                                  f"this code reads {FORMAT}: delete the folder and build again")
        if encoder_fingerprint and encoder_fingerprint != self.meta["encoder_fingerprint"]:
            raise StaleIndexError(
                f"{self.folder} was encoded with {self.meta['encoder']} (fingerprint "
                f"{self.meta['encoder_fingerprint']}), not the query encoder ({encoder_fingerprint}):"
                " its vectors mean something else; delete it or build another --index")
        try:
            self._load()
        except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError,
                zipfile.BadZipFile) as error:  # RuntimeError: faiss on a damaged file
            raise DataError(f"{self.folder} is damaged ({cli_line(error)}): delete the folder and "
                            "build the index again") from None

    def _load(self) -> None:
        self.passages = read_passages(self.folder / "passages.jsonl")
        self.bm25 = BM25.load(self.folder)
        self.vector_shards = [np.load(self.folder / "vectors" / f"{k}.npy", mmap_mode="r")
                              for k in range(self.meta["vector_shards"])]
        counts = {"passages.jsonl": len(self.passages), "bm25": self.bm25.size,
                  "vectors": sum(v.shape[0] for v in self.vector_shards)}
        if set(counts.values()) != {self.meta["passages"]}:
            raise ValueError(f"meta.json says {self.meta['passages']} passages, the files hold "
                             f"{counts}")
        self.ivf = None
        if (self.folder / "ivf.faiss").is_file():
            import faiss
            self.ivf = faiss.read_index(str(self.folder / "ivf.faiss"))
            self.ivf.nprobe = self.meta["ivf_nprobe"]

    def __len__(self) -> int:
        return len(self.passages)

    def exact_search(self, queries_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosines) of the k nearest passages, shard by shard: memory of one shard."""
        best_rows, best_scores, offset = None, None, 0
        for shard in self.vector_shards:
            rows, scores = top_k(queries_QD @ np.asarray(shard).T, k)
            rows = rows + offset
            offset += shard.shape[0]
            if best_rows is None:
                best_rows, best_scores = rows, scores
                continue
            rows, scores = np.concatenate([best_rows, rows], 1), np.concatenate(
                [best_scores, scores], 1)
            order, best_scores = top_k(scores, k)
            best_rows = np.take_along_axis(rows, order, 1)
        return best_rows, best_scores

    def approximate_search(self, queries_QD: np.ndarray, k: int):
        scores, rows = self.ivf.search(np.ascontiguousarray(queries_QD, np.float32), k)
        return rows, scores


def _lock(folder: pathlib.Path):
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def build(folder: str | pathlib.Path, settings: IndexSettings, cache: pathlib.Path,
          batch_size: int = 64, progress: bool = True, encoder=None) -> Index:
    """Builds the index (or resumes a partial one, or opens a finished one with the same
    identity) and returns it opened."""
    import jax
    folder = pathlib.Path(folder)
    encoder = encoder or embed.load_sentence_encoder(settings.encoder, str(cache))
    wanted = _identity(settings, cache, encoder)
    for name in ("meta.json", "settings.json"):
        if (folder / name).is_file():
            different = _differences(json.loads((folder / name).read_text()), wanted)
            if different:
                raise StaleIndexError(f"{folder} holds an index of other data or settings "
                                      f"({'; '.join(different)}): delete the folder or pass "
                                      "another --index")
    if (folder / "meta.json").is_file():
        return Index(folder, encoder.fingerprint)
    started = time.time()
    rank, ranks = jax.process_index(), jax.process_count()
    with _lock(folder):
        if rank == 0 and not (folder / "settings.json").is_file():
            write_json(folder / "settings.json", {**wanted, "settings": dataclasses.asdict(
                settings)})
        passages = _passages(folder, settings, cache, encoder, progress and rank == 0)
    if rank == 0 and not (folder / "bm25.npz").is_file():
        log.info("rag: BM25 over %d passages", len(passages))
        BM25.build(p.text for p in passages).save(folder)
    shards = _encode(folder, settings, encoder, passages, batch_size, rank, ranks,
                     progress and rank == 0)
    if ranks > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rag index vectors")
    if rank == 0:
        meta = {**wanted, "passages": len(passages), "vector_shards": shards,
                "dim": encoder.cfg.d_model, "build_seconds": round(time.time() - started, 1)}
        if len(passages) > settings.approximate_above:
            meta.update(build_ivf(folder, settings, shards, len(passages)))
        write_json(folder / "meta.json", meta)
    if ranks > 1:
        multihost_utils.sync_global_devices("rag index meta")
    return Index(folder, encoder.fingerprint)


def _passages(folder: pathlib.Path, settings: IndexSettings, cache: pathlib.Path, encoder,
              shown: bool) -> list[Passage]:
    path = folder / "passages.jsonl"
    if path.is_file():
        return read_passages(path)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(encoder.tokenizer.to_str())
    tokenizer.no_truncation()  # passages are cut here, not truncated
    passages = []
    with _progress(0, "passages", shown) as bar:
        for p in chunk(collections.read(settings.collection, cache, settings.text_column),
                       tokenizer, settings.size, settings.overlap):
            passages.append(p)
            bar.update(1)
    if not passages:
        raise DataError(f"collection {settings.collection!r} has no non-blank document")

    def write(f):
        for p in passages:
            f.write(json.dumps(p.as_record(), ensure_ascii=False) + "\n")
    atomic_write(path, write)
    return passages


def _encode(folder: pathlib.Path, settings: IndexSettings, encoder, passages: Sequence[Passage],
            batch_size: int, rank: int, ranks: int, shown: bool) -> int:
    """Encodes this process's missing vector shards; returns the number of shards."""
    (folder / "vectors").mkdir(exist_ok=True)
    S = settings.shard_passages
    shards = -(-len(passages) // S)
    mine = [k for k in range(shards) if k % ranks == rank
            and not (folder / "vectors" / f"{k}.npy").is_file()]
    todo = sum(len(passages[k * S:(k + 1) * S]) for k in mine)
    with _progress(todo, "encoding", shown) as bar:
        for k in mine:
            texts = [p.text for p in passages[k * S:(k + 1) * S]]
            vectors = embed.embed(encoder, texts, batch_size, progress=bar.update)
            save_npy(folder / "vectors" / f"{k}.npy", vectors)
    return shards


def make_ivf(vectors: Sequence[np.ndarray], lists: int, sample_size: int = 0):
    """A faiss inverted-file index (inner product, exact vectors in each list) over the vector
    shards, its centroids trained on a fixed random sample of 64 vectors a list."""
    import faiss
    n, dim = sum(v.shape[0] for v in vectors), vectors[0].shape[1]
    picks = np.sort(np.random.default_rng(0).permutation(n)[:sample_size or lists * 64])
    bounds = np.cumsum([0] + [v.shape[0] for v in vectors])
    sample = np.concatenate([v[picks[(picks >= lo) & (picks < hi)] - lo]
                             for v, lo, hi in zip(vectors, bounds[:-1], bounds[1:])])
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.ascontiguousarray(sample, np.float32))
    for v in vectors:
        ivf.add(np.ascontiguousarray(v, np.float32))
    ivf.nprobe = default_nprobe(lists)
    return ivf


def default_lists(n: int) -> int:
    return max(1, int(4 * np.sqrt(n)))


def default_nprobe(lists: int) -> int:
    """A sixteenth of the lists: the recall it loses is measured (docs/retrieval.md)."""
    return max(1, lists // 16)


def build_ivf(folder: pathlib.Path, settings: IndexSettings, shards: int, n: int) -> dict:
    import faiss
    vectors = [np.load(folder / "vectors" / f"{k}.npy", mmap_mode="r") for k in range(shards)]
    lists = settings.ivf_lists or default_lists(n)
    log.info("rag: an IVF index of %d lists over %d vectors", lists, n)
    ivf = make_ivf(vectors, lists)
    tmp = folder / "ivf.faiss.tmp"
    faiss.write_index(ivf, str(tmp))
    os.replace(tmp, folder / "ivf.faiss")
    return {"ivf_lists": lists, "ivf_nprobe": ivf.nprobe}
