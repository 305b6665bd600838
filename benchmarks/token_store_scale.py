"""Memory and speed of the token store at growing corpus sizes, and whether the loader keeps up.

For each size (GB of text) the benchmark writes a jsonl corpus cycled from the built-in corpora
(each cycle's documents get new ids, so they are new documents), then runs, as child processes:
`python -m lm.data prepare` (tokenize into the store) and `experiments.main train` for 2 steps
on it, sampling the resident memory of the whole process tree. Tokenization throughput per core
is set against sentencepiece's own single-thread encode speed on the same text. Then the loader:
the time of one compiled step of the tiny GPT on the largest corpus fed as the trainer feeds it
(the prefetching iterator over the store) against the same step fed one constant batch, in
alternating blocks of steps.

    python -m benchmarks.token_store_scale --sizes 0.25,1,4 --out benchmarks/results/cpu_token_store.json

Prints one JSON object with versions. Needs about 2.5x the largest size free under --scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil

from benchmarks.report import emit

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/lm/gpt.py:size=tiny"
CONFIG_SPEC = str(REPO / CONFIG)  # load_config's form: the file's path, then the argument
SOURCES = ("austen", "kjv", "brown", "python_doc", "wordnet", "gcide")
FILE_BYTES = 256 << 20


def make_corpus(folder: pathlib.Path, gigabytes: float) -> dict:
    """jsonl files of documents cycled from the built-in corpora, up to `gigabytes` of text."""
    done = folder.with_name(folder.name + ".done.json")  # beside it: a .json inside is corpus
    if done.is_file():
        return json.loads(done.read_text())
    from lm.data import corpora
    docs = [json.loads(line) for name in SOURCES for line in corpora.prepare(name).open()]
    folder.mkdir(parents=True, exist_ok=True)
    target, written, files, cycle, out = gigabytes * 1e9, 0, 0, 0, None
    while written < target:
        for doc in docs:
            if out is None or out.tell() > FILE_BYTES:
                out = (folder / f"part{files:04d}.jsonl").open("w", encoding="utf-8")
                files += 1
            out.write(json.dumps({"id": f"{cycle}:{doc['source']}:{doc['id']}",
                                  "text": doc["text"]}) + "\n")
            written += len(doc["text"].encode("utf-8"))
            if written >= target:
                break
        cycle += 1
    out.close()
    info = {"text_bytes": written, "files": files,
            "file_bytes": sum(p.stat().st_size for p in folder.glob("*.jsonl"))}
    done.write_text(json.dumps(info))
    return info


def run_measured(cmd: list[str]) -> dict:
    """Runs cmd, sampling the resident memory of it and its children every 0.1 s."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    root, peak_tree, peak_main = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            main = root.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in root.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_gb": peak_main / 1e9,
            "peak_rss_tree_gb": peak_tree / 1e9, "stdout": out}


def raw_encode_speed(tokenizer_path: str, corpus: pathlib.Path, sample_bytes: int) -> float:
    """sentencepiece's own encode, one thread, on the first sample_bytes of the corpus: bytes/s."""
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor(model_file=tokenizer_path)
    texts, size = [], 0
    with (corpus / "part0000.jsonl").open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode("utf-8"))
            if size >= sample_bytes:
                break
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        processor.encode(texts, num_threads=1)
        best = max(best, size / (time.perf_counter() - started))
    return best


def loader_rates(overrides: list[str], workdir: pathlib.Path, steps: int, rounds: int) -> dict:
    """Seconds per step of one compiled train step, fed as the trainer feeds it (next batch of
    the prefetching iterator, then Engine.global_batch), against the same step fed one constant
    batch; blocks of `steps` steps alternate, so machine noise hits both alike."""
    import jax
    from core.config import load_config
    from core.engine import Engine
    from lm import pipeline
    config = load_config(CONFIG_SPEC, overrides)
    setup = pipeline.build(config, workdir)  # it keeps the run's tokenizer.model there
    engine = Engine(config, setup.task)
    state, compiled = engine.init_state(), engine.compiled_train_step()
    constant = next(setup.data.train)
    feeds = {"real": lambda: next(setup.data.train), "constant": lambda: constant}
    seconds: dict[str, list[float]] = {kind: [] for kind in feeds}
    for block in range(2 * rounds + 2):
        kind = ("real", "constant")[block % 2]
        started = time.perf_counter()
        for _ in range(steps):
            with engine.scope():
                state, metrics = compiled(state, engine.global_batch(feeds[kind]()))
        jax.block_until_ready(metrics)
        if block >= 2:  # the first two blocks warm up
            seconds[kind].append((time.perf_counter() - started) / steps)
    real, fixed = statistics.median(seconds["real"]), statistics.median(seconds["constant"])
    return {"steps_per_block": steps, "seconds_per_step": seconds, "real_s": real,
            "constant_s": fixed, "real_over_constant_time": real / fixed}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="0.25,1,4", help="GB of text, comma-separated")
    parser.add_argument("--scratch", default="/tmp/genlab_token_store_bench")
    parser.add_argument("--loader-steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--loader-rounds", type=int, default=10, help="blocks of each kind")
    parser.add_argument("--loader-only", action="store_true",
                        help="only the loader, on the largest size's corpus (already prepared)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    scratch = pathlib.Path(args.scratch)
    cache = scratch / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    from core.packages import cache_dir
    for sub in ("corpora", "packages"):
        if not (cache / sub).exists():
            os.symlink(cache_dir() / sub, cache / sub)

    # One tokenizer for every size: the demo's (austen+kjv+brown, 4,096 pieces).
    from core.config import load_config
    from lm.data import windows
    demo = load_config(str(REPO / "experiments/configs/lm/gpt.py"), [])
    tokenizer = windows.get_tokenizer(demo.data, windows.train_texts(demo.data))
    # A small validation split: the final evaluation reads all of it.
    common = [f"--config.data.tokenizer.path={tokenizer.path}", f"--config.data.cache_dir={cache}",
              "--config.model.vocab_size=0", "--config.data.val_fraction=0.002"]
    last_size = args.sizes.split(",")[-1].strip()
    measure_loader = lambda: loader_rates(
        [*common, f"--config.data.corpus=files:{scratch}/corpus-{float(last_size):g}gb"],
        scratch / "loader", args.loader_steps, args.loader_rounds)
    if args.loader_only:
        return emit({"benchmark": "token_store_scale", "config": CONFIG,
                     "loader": measure_loader()}, args.out)
    sizes = {}
    for gigabytes in [float(s) for s in args.sizes.split(",")]:
        corpus = scratch / f"corpus-{gigabytes:g}gb"
        info = make_corpus(corpus, gigabytes)
        overrides = [*common, f"--config.data.corpus=files:{corpus}"]
        prepare = run_measured([sys.executable, "-m", "lm.data", "prepare", "--config",
                                CONFIG, *overrides])
        train = run_measured([sys.executable, "-m", "experiments.main", "train", "--config",
                              CONFIG, *overrides, "--config.train.steps=2",
                              "--config.optim.warmup_steps=1", "--config.train.eval_batches=2",
                              "--workdir", str(scratch / f"train-{gigabytes:g}gb")])
        stores = json.loads(prepare.pop("stdout"))["stores"]
        (store,) = stores.values()
        train.pop("stdout")
        meta = json.loads((pathlib.Path(store["store"]) / "meta.json").read_text())
        prepare["tokenize_seconds"] = meta["build_seconds"]  # reading, tokenizing, writing
        rate = info["text_bytes"] / meta["build_seconds"]
        sizes[f"{gigabytes:g}"] = {
            **info, "tokens": store["train"]["tokens"] + store["validation"]["tokens"],
            "prepare": prepare, "train_2_steps": train,
            "tokenize_mb_per_s": rate / 1e6, "tokenize_mb_per_s_per_core": rate / os.cpu_count() / 1e6}
    first = sizes[args.sizes.split(",")[0].strip()]
    last = sizes[f"{float(last_size):g}"]
    raw = raw_encode_speed(str(tokenizer.path), scratch / f"corpus-{float(last_size):g}gb", 32 << 20)
    peak = lambda s: max(s["prepare"]["peak_rss_tree_gb"], s["train_2_steps"]["peak_rss_tree_gb"])

    import jax
    import sentencepiece
    return emit({
        "benchmark": "token_store_scale", "config": CONFIG, "sizes_gb": sizes,
        "peak_rss_ratio_largest_over_smallest": peak(last) / peak(first),
        "raw_sentencepiece_mb_per_s_one_thread": raw / 1e6,
        "tokenize_per_core_over_raw": last["tokenize_mb_per_s_per_core"] * 1e6 / raw,
        "loader": measure_loader(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "sentencepiece": sentencepiece.__version__, "numpy": np.__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 1e9:.0f} GB",
        "command": "python -m benchmarks.token_store_scale " + " ".join(argv or sys.argv[1:]),
    }, args.out)


if __name__ == "__main__":
    main()
