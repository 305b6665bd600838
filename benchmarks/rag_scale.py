"""Indexing throughput and query latency of the retrieval index at 10k and 1M synthetic passages.

Passages are 60 words drawn (Zipf, s=1.1) from the vocabulary of the offline QA benchmark's
corpus; a query is 8 words of a random passage. Latency is per query, one at a time, as `ask`
retrieves: BM25, dense exact (encoding the query included), dense IVF and hybrid; p50 and p95.

  10k   `python -m lm.rag index`'s own build on a files: collection of the passages (cutting,
        BM25, encoding every passage, IVF since approximate_above is set below 10k), timed
        whole; and the encoder's passages/s against the same model in PyTorch (`transformers`
        BertModel, mean pooling) on the same 512 passages, alternating rounds.
  1M    BM25 built on 1M passages and timed. Encoding a million passages takes hours on a
        2-core CPU at the measured rate, so the dense side at 1M searches proxy vectors: the
        10k real passage vectors repeated 100 times with Gaussian noise (sigma 0.02 a
        coordinate) and renormalised, which keeps their cluster structure for the IVF lists.
        Exact and IVF latency on them, and the IVF's recall@10 of the exact neighbours.

    python -m benchmarks.rag_scale --out benchmarks/results/cpu_rag_scale.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks.report import emit

WORDS_PER_PASSAGE, QUERY_WORDS, QUERIES = 60, 8, 200


def vocabulary(cache: pathlib.Path) -> list[str]:
    from lm.rag import collections, sparse
    counts: dict[str, int] = {}
    for doc in collections.read(collections.BENCHMARK, cache):
        for token in sparse.tokenize(doc.text):
            counts[token] = counts.get(token, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])


def synthetic(words: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    ids = rng.choice(len(words), size=(n, WORDS_PER_PASSAGE), p=p / p.sum())
    vocab = np.asarray(words, dtype=object)
    return [" ".join(row) for row in vocab[ids]]


def queries(texts: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(texts), QUERIES):
        words = texts[i].split()
        start = rng.integers(0, len(words) - QUERY_WORDS)
        out.append(" ".join(words[start:start + QUERY_WORDS]))
    return out


def latency_ms(search, questions: list[str]) -> dict:
    search(questions[:2])  # compiles the query encoder's shapes
    times = []
    for q in questions:
        started = time.perf_counter()
        search([q])
        times.append((time.perf_counter() - started) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))}


def latencies(index, encoder, questions: list[str]) -> dict:
    from lm.rag import retrievers
    from lm.weights import embed
    runs = {
        "bm25": lambda q: retrievers.bm25(index, q, 10),
        "dense_exact": lambda q: index.exact_search(embed.embed(encoder, q), 10),
        "dense_ivf": lambda q: index.approximate_search(embed.embed(encoder, q), 10),
        "hybrid": lambda q: retrievers.hybrid(index, q, 10, encoder),
    }
    return {name: latency_ms(run, questions) for name, run in runs.items()}


def torch_peer(encoder_dir: pathlib.Path, encoder, texts: list[str], rounds: int = 2) -> dict:
    """Passages/s of our encoder and of transformers' BertModel on the same texts, alternating."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from lm.weights import embed
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = AutoModel.from_pretrained(encoder_dir).eval()

    def torch_encode():
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                batch = tokenizer(texts[i:i + 64], padding=True, truncation=True,
                                  max_length=256, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1)
                (hidden * mask).sum(1) / mask.sum(1)

    arms = {"ours": lambda: embed.embed(encoder, texts, 64), "torch": torch_encode}
    for arm in arms.values():
        arm()  # warm-up: compiles, loads kernels
    seconds = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            started = time.perf_counter()
            arm()
            seconds[name].append(time.perf_counter() - started)
    rate = {name: len(texts) / min(s) for name, s in seconds.items()}
    return {"passages": len(texts), "ours_per_s": rate["ours"], "torch_per_s": rate["torch"],
            "ratio": rate["ours"] / rate["torch"], "torch_threads": torch.get_num_threads()}


def write_files(folder: pathlib.Path, texts: list[str]) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "passages.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"s{i}", "text": text}) + "\n")
    return path


def small(scratch: pathlib.Path, cache: pathlib.Path, encoder, texts: list[str]) -> tuple:
    from lm.rag import index as index_lib
    import shutil
    docs = write_files(scratch / "docs10k", texts)
    shutil.rmtree(scratch / "index10k", ignore_errors=True)
    settings = index_lib.IndexSettings(collection=f"files:{docs}", size=128, overlap=0,
                                       approximate_above=5_000)
    started = time.perf_counter()
    index = index_lib.build(scratch / "index10k", settings, cache, encoder=encoder)
    seconds = time.perf_counter() - started
    return index, {"passages": len(index), "index_seconds": seconds,
                   "index_passages_per_s": len(index) / seconds,
                   "latency_ms": latencies(index, encoder, queries(texts, 1))}


def large(scratch: pathlib.Path, encoder, words: list[str], small_index, n: int) -> dict:
    """BM25 at n passages, measured; dense search on proxy vectors (see the module docstring)."""
    from lm.rag import index as index_lib
    from lm.rag.passages import Passage
    from lm.rag.sparse import BM25
    folder = scratch / "index1m"
    texts = synthetic(words, n, 2)
    started = time.perf_counter()
    bm25 = BM25.build(texts)
    bm25_seconds = time.perf_counter() - started
    (folder / "vectors").mkdir(parents=True, exist_ok=True)
    bm25.save(folder)
    base = np.concatenate(small_index.vector_shards)
    rng, S = np.random.default_rng(3), small_index.meta["shard_passages"] * 8
    shards = -(-n // S)
    for k in range(shards):
        rows = np.arange(k * S, min(n, (k + 1) * S))
        v = base[rows % len(base)] + rng.normal(0, 0.02, (len(rows), base.shape[1]))
        index_lib.save_npy(folder / "vectors" / f"{k}.npy",
                            (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))
    with open(folder / "passages.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps(Passage(i, f"s{i}", 0, len(text), text).as_record()) + "\n")
    meta = {"format": index_lib.FORMAT, "passages": n, "vector_shards": shards,
            "encoder": "all-minilm-l6-v2", "encoder_fingerprint": encoder.fingerprint,
            "shard_passages": S, "dim": base.shape[1], "proxy_vectors": True}
    started = time.perf_counter()
    meta.update(index_lib.build_ivf(folder, index_lib.IndexSettings(shard_passages=S), shards, n))
    ivf_seconds = time.perf_counter() - started
    index_lib.write_json(folder / "meta.json", meta)
    index = index_lib.Index(folder, encoder.fingerprint)
    questions = queries(texts, 4)
    from lm.weights import embed
    queries_QD = embed.embed(encoder, questions)
    exact = index.exact_search(queries_QD, 10)[0]
    approximate = index.approximate_search(queries_QD, 10)[0]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    return {"passages": n, "bm25_seconds": bm25_seconds, "bm25_passages_per_s": n / bm25_seconds,
            "ivf_build_seconds": ivf_seconds, "ivf_lists": meta["ivf_lists"],
            "ivf_nprobe": meta["ivf_nprobe"], "ivf_recall_at_10_of_exact": float(recall),
            "latency_ms": latencies(index, encoder, questions)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--scratch", default="/tmp/genlab_rag_bench")
    parser.add_argument("--cache", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    from core.packages import cache_dir
    from lm.weights import embed
    scratch, cache = pathlib.Path(args.scratch), cache_dir(args.cache)
    encoder = embed.load_sentence_encoder(cache=str(cache))
    words = vocabulary(cache)
    texts = synthetic(words, args.small, 0)
    small_index, small_result = small(scratch, cache, encoder, texts)
    small_result["encoder_vs_torch"] = torch_peer(embed.model_dir(embed.DEFAULT_MODEL, str(cache)),
                                                  encoder, texts[:512])
    result = {"benchmark": "rag_scale", "words_per_passage": WORDS_PER_PASSAGE,
              "queries": QUERIES, "small": small_result,
              "large": large(scratch, encoder, words, small_index, args.large) if args.large
              else None,
              "command": "python -m benchmarks.rag_scale " + " ".join(argv or sys.argv[1:])}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
