"""Compressor baselines in bits per byte: what a language model must beat to have learnt anything.

The conditional cost of the validation text given the training text is
(size(C(train + val)) - size(C(train))) * 8 / bytes(val): the compressor may reuse everything it
saw in training, as a model may. xz -9e keeps a 64 MiB window, so the whole default training set
is in reach; gzip only sees the last 32 KiB and bzip2 900 kB blocks, so they say less.

    python -m lm.eval.compressors --corpus austen --split austen_tail   # last 10% of each novel
    python -m lm.eval.compressors --corpus austen+kjv+brown             # the data config's doc-level split
"""
from __future__ import annotations

import bz2
import concurrent.futures
import gzip
import json
import lzma

from core import cli
from lm.data import windows as data
from lm.data.corpora import austen_novels

COMPRESSORS = {
    # Python's lzma with preset 9|EXTREME writes byte-for-byte the file `xz -9e -T1` writes.
    "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
    "gzip": lambda b: gzip.compress(b, 9, mtime=0),
    "bzip2": lambda b: bz2.compress(b, 9),
}


def compressor_bits_per_byte(train_text: str, val_text: str, compressor: str = "xz") -> float:
    """Conditional bits per UTF-8 byte of val_text after train_text."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor '{compressor}'; choose from {sorted(COMPRESSORS)}")
    train, val = train_text.encode("utf-8"), val_text.encode("utf-8")
    if not val:
        raise ValueError("empty validation text")
    compress = COMPRESSORS[compressor]
    # The compressors release the GIL, so the two sizes are computed on two cores at once.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both, alone = pool.map(lambda b: len(compress(b)), [train + val, train])
    return (both - alone) * 8 / len(val)


def austen_tail_split(cache: str = "", fraction: float = 0.1, sep: str = "\n") -> tuple[str, str]:
    """(train, val): the first 90% of each novel's characters, and the last 10%, each joined."""

    train, val = [], []
    for text in austen_novels(cache).values():
        cut = int(len(text) * (1 - fraction))
        train.append(text[:cut])
        val.append(text[cut:])
    return sep.join(train), sep.join(val)


def doc_split(corpus: str, val_fraction: float = 0.1, split_seed: int = 0,
              cache: str = "") -> tuple[str, str]:
    """(train, val) texts of lm.data.windows's document-level split, documents joined by newlines."""
    from ml_collections import ConfigDict


    cfg = ConfigDict(dict(corpus=corpus, text_column="text", val_fraction=val_fraction,
                          split_seed=split_seed, cache_dir=cache))
    splits = data.load_splits(cfg)
    return tuple("\n".join(splits[k]["text"][:]) for k in ("train", "validation"))


def main(argv=None) -> dict:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--corpus", default="austen", help="a data.corpus spec (default: austen)")
    p.add_argument("--split", choices=("doc", "austen_tail"), default="doc")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--compressors", default="xz,gzip,bzip2")
    args = p.parse_args(argv)
    if args.split == "austen_tail":
        if args.corpus != "austen":
            p.error("--split austen_tail needs --corpus austen")
        train, val = austen_tail_split(args.cache_dir, args.val_fraction)
    else:
        train, val = doc_split(args.corpus, args.val_fraction, args.split_seed, args.cache_dir)
    result = {"corpus": args.corpus, "split": args.split, "val_fraction": args.val_fraction,
              "train_bytes": len(train.encode()), "val_bytes": len(val.encode())}
    for name in args.compressors.split(","):
        result[f"{name}_bits_per_byte"] = round(compressor_bits_per_byte(train, val, name), 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli.main_entry(main)
