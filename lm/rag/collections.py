"""What a user points the index at: a document collection named by a spec.

  qa-bench                  the offline benchmark's 5,532 passages (lm/rag/qa_sets.py)
  austen | kjv | brown ...  built-in corpora ('+'-joined), as data.corpus names them
  files:<path|glob|dir>     .txt (a document per file) / .jsonl / .json / .parquet (a document
                            per row: its `text` column, or --text-column; an `id` column is
                            kept as the document id)
  hub:<dataset>[:<config>]  a hub dataset's train (and validation) split, streamed

The fingerprint says what was read (package version, the files' sizes and mtimes, the hub
dataset's revision), so an index built from other data is refused rather than searched.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterator

from lm.data import documents as doc_lib
from lm.data.labelled import EVAL_PACKAGE
from lm.rag import qa_sets
from lm.rag.passages import SourceDocument

BENCHMARK = "qa-bench"


def read(spec: str, cache: pathlib.Path, text_column: str = "text") -> Iterator[SourceDocument]:
    spec = spec.strip()
    if spec == BENCHMARK:
        yield from qa_sets.corpus(str(cache))
        return
    if spec.startswith("hub:"):
        for docs in doc_lib.read_hub(spec[4:], text_column).values():
            yield from (SourceDocument(d.id, d.text) for d in docs)
        return
    files = doc_lib.source_files(spec, cache)
    for doc in doc_lib.read_files(files, text_column):
        yield SourceDocument(doc.id, doc.text)


def fingerprint(spec: str, cache: pathlib.Path, text_column: str = "text") -> str:
    spec = spec.strip()
    what = EVAL_PACKAGE if spec == BENCHMARK else doc_lib.identity(spec, cache)
    blob = json.dumps([spec, text_column, what], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
