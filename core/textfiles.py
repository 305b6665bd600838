"""The user's text files (.txt, .jsonl): every failure is a `DataError` that names the file, and
the line of a malformed JSON line or the byte offset of the first byte that is not UTF-8.

Loaders that hand files to a fast reader (datasets' Arrow JSON reader) call `check_jsonl` only
when that reader fails, to say where; small files are read here directly.
"""
from __future__ import annotations

import codecs
import json
import pathlib
from typing import Iterator

from core.config import DataError

_CHUNK = 1 << 20


def _existing(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    return path


def _empty(path: pathlib.Path) -> DataError:
    return DataError(f"{path} is empty; remove it from the input or give it content")


def refuse_blank(path: str | pathlib.Path) -> None:
    """Refuses a file that holds nothing but whitespace (reads until the first other byte)."""
    with open(_existing(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            if chunk.strip():
                return
    raise _empty(path)


def _not_utf8(path: pathlib.Path, error: UnicodeDecodeError, offset: int = 0) -> DataError:
    at = offset + error.start
    bad = error.object[error.start:error.start + 4]
    return DataError(f"{path} is not UTF-8 text: byte {at} is {bad!r}; convert it (e.g. "
                     f"iconv -f latin1 -t utf-8 {path.name} > out{path.suffix})")


def check_utf8(path: str | pathlib.Path) -> None:
    """Refuses a file that is not UTF-8, naming the byte offset (streams: C speed, any size)."""
    path = _existing(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the first byte the decoder has not consumed yet
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            buffered = len(decoder.getstate()[0])  # an incomplete character from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise _not_utf8(path, error, offset - buffered) from None
            if not chunk:
                return
            offset += len(chunk)


def read_text(path: str | pathlib.Path) -> str:
    """A whole UTF-8 text file; refuses a blank one."""
    path = _existing(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None
    if not text.strip():
        raise _empty(path)
    return text


def iter_jsonl(path: str | pathlib.Path, offsets: bool = False) -> Iterator:
    """The JSON objects of a .jsonl file, one per non-blank line; refuses a blank file.

    offsets=True yields (bytes read so far, object) pairs, for progress over large files."""
    path = _existing(path)
    offset, seen = 0, False
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, error, offset) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line.strip())
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not a JSON line ({error.msg} at column "
                                f"{error.colno}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got a "
                                f"{type(row).__name__}")
            seen = True
            yield (offset, row) if offsets else row
    if not seen:
        raise _empty(path)


def check_jsonl(path: str | pathlib.Path) -> None:
    """Reads the whole file, raising at its first malformed line (or for a blank file)."""
    for _ in iter_jsonl(path):
        pass
