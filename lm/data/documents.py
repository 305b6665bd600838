"""A corpus as a stream of documents, each tagged with its split: bounded memory at any size.

Corpus specs (data.corpus): '+'-joined built-in names (lm.data.corpora.KNOWN_CORPORA);
'files:<path-or-glob-or-dir>' (.txt: one document per file; .jsonl/.json/.parquet: one per row);
'hub:<dataset>[:<config>]' (datasets.load_dataset by name, streamed; needs internet or the HF
cache; its 'validation' split is used as is when it has one, else 'train' is split by document).

The order is fixed: built-in corpora in the order named; for 'files:' the .txt files, then the
.jsonl/.json files, then the .parquet files, each group sorted by path. A document lands in the
validation split when a hash of (split_seed, source, id) says so, so the split survives reordering
or adding files. Rows without an id get a hash of their text (duplicates share a split).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
from typing import Iterator

from core import textfiles
from core.config import DataError
from lm.data import corpora

FILE_EXTS = (".txt", ".jsonl", ".json", ".parquet")
_GROUPS = ((".txt",), (".jsonl", ".json"), (".parquet",))


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str
    read_bytes: int = 0  # input bytes read up to and with this document, over all files (progress)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file, with the 'source' its rows get when they carry none."""
    path: str
    source: str
    doc_id: str = ""  # .txt files: the document id (the path relative to the files' base)

    def stat(self) -> dict:
        st = os.stat(self.path)
        return {"path": self.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def expand_files(spec: str) -> list[str]:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in FILE_EXTS)
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
    else:
        files = [str(path)] if path.is_file() else []
    if not files:
        raise DataError(f"data.corpus 'files:{spec}': no such file, or no {'/'.join(FILE_EXTS)} "
                        f"files match {path}")
    bad = [f for f in files if pathlib.Path(f).suffix not in FILE_EXTS]
    if bad:
        raise DataError(f"unsupported file type {bad[0]}: use one of {', '.join(FILE_EXTS)}")
    return files


def source_files(spec: str, cache: pathlib.Path) -> list[SourceFile]:
    """The files a built-in or 'files:' spec reads, in reading order (built-ins are prepared)."""
    if spec.startswith("files:"):
        files = expand_files(spec[6:])
        txt = [f for f in files if f.endswith(".txt")]
        base = os.path.commonpath([os.path.dirname(f) for f in txt]) if txt else ""
        return [SourceFile(f, "files", os.path.relpath(f, base) if f.endswith(".txt") else "")
                for exts in _GROUPS for f in files if f.endswith(exts)]
    names = [corpora.check_name(n.strip()) for n in spec.split("+")]
    return [SourceFile(str(corpora.prepare(n, cache)), "") for n in names]


def _rows(path: str) -> Iterator[tuple[str, int, dict]]:
    """(where, bytes of the file read so far, row) for each row of a .jsonl/.json/.parquet file."""
    size = os.path.getsize(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            table = pq.ParquetFile(path)
        except Exception as error:  # pyarrow's error types: one user error here
            raise DataError(f"{path} is not a readable parquet file: {error}") from None
        number, groups = 0, max(1, table.num_row_groups)
        for group in range(table.num_row_groups):
            for row in table.read_row_group(group).to_pylist():
                number += 1
                yield f"{path} row {number}", size * (group + 1) // groups, row
        return
    if path.endswith(".json"):
        text = textfiles.read_text(path)
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{error.lineno}: not JSON ({error.msg} at column "
                                f"{error.colno})") from None
            for number, row in enumerate(rows, 1):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: item {number} is a {type(row).__name__}, not an "
                                    "object")
                yield f"{path} item {number}", size, row
            return
    for number, (offset, row) in enumerate(textfiles.iter_jsonl(path, offsets=True), 1):
        yield f"{path} row {number}", offset, row


def _text_of(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise DataError(f"{where} has no column '{column}' (data.text_column); columns are "
                        f"{sorted(row)}")
    text = row[column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: column '{column}' holds a {type(text).__name__}, not text")
    return text


def _document(row: dict, text: str, source: str, read_bytes: int = 0) -> Document:
    doc_id = row.get("id")
    doc_id = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16] if doc_id is None else doc_id
    return Document(str(doc_id), str(row.get("source") or source), text, read_bytes)


def read_files(files: list[SourceFile], text_column: str) -> Iterator[Document]:
    """The non-empty documents of the files, in order; bad files fail naming file and line."""
    done = 0  # bytes of the files before this one
    for file in files:
        if file.path.endswith(".txt"):
            text = textfiles.read_text(file.path)
            done += os.path.getsize(file.path)
            yield Document(file.doc_id, file.source, text, done)
            continue
        column = text_column if file.source == "files" else "text"  # built-ins: always text
        for where, offset, row in _rows(file.path):
            text = _text_of(row, column, where)
            if text:
                yield _document(row, text, file.source, done + offset)
        done += os.path.getsize(file.path)


def _from_hub(load, spec: str, **kwargs):
    """datasets' load(name, config, **kwargs) for 'name[:config]', every failure one user error."""
    name, _, config = spec.partition(":")
    try:
        return load(name, config or None, **kwargs)
    except Exception as error:  # offline, unknown name, gated, ...: all one user-facing error
        raise DataError(f"datasets.{load.__name__}('{name}', {config or None!r}) failed: {error}. "
                        "Without internet, use a built-in corpus or 'files:<path>'.") from error


def read_hub(spec: str, text_column: str) -> dict[str, Iterator[Document]]:
    """{'train'[, 'validation']}: the hub dataset's splits, streamed."""
    import datasets
    given = _from_hub(datasets.load_dataset, spec, streaming=True)
    if "train" not in given:
        raise DataError(f"hub dataset '{spec}' has no 'train' split (splits: {list(given)})")
    source = f"hub:{spec.partition(':')[0]}"

    def docs(split: str) -> Iterator[Document]:
        for number, row in enumerate(given[split], 1):
            text = _text_of(row, text_column, f"hub:{spec}[{split}] row {number}")
            if text:
                yield _document(row, text, source)
    return {split: docs(split) for split in ("train", "validation") if split in given}


def hub_revision(spec: str) -> str:
    """What identifies the hub dataset's current data (datasets' builder hash, which follows
    the dataset's revision and files), so that an updated dataset gets a new token store."""
    import datasets
    return str(_from_hub(datasets.load_dataset_builder, spec).hash)


def identity(spec: str, cache: pathlib.Path) -> dict:
    """What a spec reads, so that a product of it (token store, retrieval index) is rebuilt when
    its input changes: a hub dataset's revision, or each file's path, size and mtime."""
    if spec.startswith("hub:"):
        return {"revision": hub_revision(spec[4:]), "files": []}
    return {"revision": "", "files": [f.stat() for f in source_files(spec, cache)]}


def is_validation(seed: int, source: str, doc_id: str, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}\x00{source}\x00{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2.0 ** 64


def split_documents(data_cfg, cache: pathlib.Path) -> Iterator[tuple[str, Document]]:
    """(split, document) for every document of data.corpus, in corpus order."""
    spec = data_cfg.corpus.strip()
    frac, seed = float(data_cfg.val_fraction), int(data_cfg.split_seed)
    if spec.startswith("hub:"):
        given = read_hub(spec[4:], data_cfg.text_column)
        if "validation" in given:
            for split in ("train", "validation"):
                yield from ((split, doc) for doc in given[split])
            return
        docs = given["train"]
    else:
        docs = read_files(source_files(spec, cache), data_cfg.text_column)
    for doc in docs:
        yield ("validation" if is_validation(seed, doc.source, doc.id, frac) else "train"), doc
