"""Cross-check of our evaluation harness (lm/eval/harness.py) against EleutherAI's lm-evaluation-harness
(PyPI `lm-eval`) on the same weights and the very same requests.

SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, dequantized to float32) is exported to a Hugging
Face directory (lm.weights.hf_checkpoint.save_pretrained: safetensors, config, tokenizer.json). For each
task, the (context, continuation, gold) requests of its first --limit documents, as
lm.eval.eval_requests.load_requests gives them, are
  - scored by ours: lm.eval.harness.score_requests + lm.eval.harness.metrics, no prefix token (as
    lm/eval/evaluate_tasks.py does for a GGUF model);
  - written as a local JSONL data set (one row per document) with an lm-eval task YAML that
    rebuilds exactly those pairs (our continuations start with a space):
      same context for every choice (most tasks)  multiple_choice, the choices without that
                                                     space and target_delimiter " ", as lm-eval's
                                                     own tasks (acc_norm divides by len(choice))
      same continuation, contexts differ (WinoGrande)  multiple_choice, lm-eval's "multiple
                                                     input" mode (doc_to_text gives the gold int)
      one request per document (LAMBADA)            loglikelihood, metrics perplexity and acc
    and scored by `lm_eval run --model hf` (float32, CPU, add_bos_token=False: ours prepends
    nothing for this model) in a subprocess with a separate virtualenv's python.
lm-eval's logged samples are matched to ours by (document, context, continuation); the script
reports per task acc / acc_norm (LAMBADA: acc = all-greedy, perplexity) on both sides, their
difference in points, the maximum per-request log-likelihood difference, and the versions and
commands used. acc_norm (per character of the continuation) is compared where the continuations
differ; in multiple-input mode lm-eval's acc_norm divides by the context's length instead, so
only acc is compared there.

lm-eval and its dependencies live in their own virtualenv, not in ours:
    python3.11 -m venv /work/lmeval-venv && echo torch==2.13.0 > /tmp/torch.txt
    /work/lmeval-venv/bin/pip install torch==2.13.0      # first: the local CPU wheel
    /work/lmeval-venv/bin/pip install -c /tmp/torch.txt lm-eval==0.4.13 transformers==5.17.0 \\
        accelerate==1.15.0
Then, from the repository root (CPU, 2 cores: --limit 50 is 1,350 requests a
side, ~24 minutes in all; --limit 100 about twice that):
    .venv/bin/python -m benchmarks.harness_vs_lm_eval --lm-eval-python \\
        /work/lmeval-venv/bin/python --limit 50 --out benchmarks/results/cpu_smollm2_vs_lm_eval.json
    .venv/bin/python -m benchmarks.harness_vs_lm_eval --tasks piqa,winogrande --limit 3  # smoke
Prints one JSON object (and writes it to --out if given); lm-eval's own log goes to stderr.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

from benchmarks.report import emit
from core import compile_cache
from lm.eval import harness
from lm.eval import requests as eval_requests
from lm.models import transformer as model_lib
from lm.weights import hf_checkpoint, import_gguf

DEFAULT_TASKS = "hellaswag,piqa,arc_easy,arc_challenge,boolq,winogrande,openbookqa,sciq,lambada"
UNCONDITIONAL_DOC_IDS = 1_000_000  # the package's PMI companion requests; not real documents
MODEL = "smollm2-135m-instruct"


def our_requests(task: str, limit: int) -> list:
    """Our requests of the task's first `limit` documents (unconditional companions dropped)."""
    requests = [r for r in eval_requests.load_requests(task) if r.doc_id < UNCONDITIONAL_DOC_IDS]
    return eval_requests.limit_docs(requests, limit)


def metric_list(*names: str) -> list[dict]:
    return [{"metric": m, "aggregation": "perplexity" if m == "perplexity" else "mean",
             "higher_is_better": m != "perplexity"} for m in names]


def write_task(task: str, requests, include_dir: pathlib.Path) -> tuple[str, str]:
    """Writes the task's documents (JSONL) and lm-eval YAML; returns (lm-eval task name, mode)."""
    docs = collections.defaultdict(list)
    for r in sorted(requests, key=lambda r: (r.doc_id, r.choice)):
        docs[r.doc_id].append(r)
    name = "xcheck_" + re.sub(r"\W", "_", task)
    if all(len(rs) == 1 for rs in docs.values()):
        mode = "loglikelihood"
        rows = [{"doc_id": d, "context": rs[0].context, "continuation": rs[0].continuation}
                for d, rs in docs.items()]
        fields = {"output_type": "loglikelihood", "doc_to_text": "context",
                  "doc_to_target": "continuation", "metric_list": metric_list("perplexity", "acc")}
    elif all(len({r.context for r in rs}) == 1 for rs in docs.values()):
        mode = "choices"
        # as lm-eval's own tasks: the choices without the joining space, target_delimiter " "
        # (acc_norm divides by len(choice)); choices that do not start with a space keep ""
        spaced = all(r.continuation.startswith(" ") for rs in docs.values() for r in rs)
        rows = [{"doc_id": d, "context": rs[0].context,
                 "choices": [harness.choice_text(r.continuation) if spaced else r.continuation
                             for r in rs],
                 "gold": rs[0].gold} for d, rs in docs.items()]
        fields = {"output_type": "multiple_choice", "doc_to_text": "context",
                  "doc_to_choice": "choices", "doc_to_target": "gold",
                  "target_delimiter": " " if spaced else "",
                  "metric_list": metric_list("acc", "acc_norm")}
    elif all(len({r.continuation for r in rs}) == 1 for rs in docs.values()):
        mode = "multiple_input"  # as lm-eval's own winogrande task: doc_to_text is the gold index
        rows = [{"doc_id": d, "contexts": [r.context for r in rs],
                 "continuation": rs[0].continuation, "gold": rs[0].gold}
                for d, rs in docs.items()]
        fields = {"output_type": "multiple_choice", "doc_to_text": "gold",
                  "doc_to_choice": "contexts", "doc_to_target": "continuation",
                  "metric_list": metric_list("acc")}
    else:
        raise ValueError(f"{task}: neither context nor continuation is shared by the choices")
    data = include_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "target_delimiter": "", "num_fewshot": 0, **fields, "metadata": {"version": 1.0}}
    # (fields may set target_delimiter " ": the choices then carry no leading space)
    (include_dir / f"{name}.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    return name, mode


def score_ours(cfg, params, tokenizer, tasks, requests_of, batch_size) -> tuple[dict, dict]:
    """(metrics per task, {(task, doc, context, continuation): loglik})."""
    model = model_lib.Transformer(cfg)
    results, logliks = {}, {}
    for task in tasks:
        start = time.perf_counter()
        scores = harness.score_requests(model, params, tokenizer, requests_of[task], batch_size,
                                        prefix_ids=[])
        results[task] = {**harness.metrics(requests_of[task], scores),
                         "seconds": round(time.perf_counter() - start, 1)}
        print(f"ours: {task} {results[task]}", file=sys.stderr)
        for r, (logp, _, _) in zip(requests_of[task], scores):
            logliks[(task, r.doc_id, r.context, r.continuation)] = logp
    return results, logliks


def run_lm_eval(python, model_dir, include_dir, names, out_dir, batch_size) -> tuple[list, float]:
    command = [python, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={model_dir},dtype=float32,add_bos_token=False",
               "--tasks", ",".join(names), "--include_path", str(include_dir),
               "--device", "cpu", "--batch_size", str(batch_size),
               "--output_path", str(out_dir), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out_dir / "datasets_cache"), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    # lm-eval's output to our standard error's descriptor (2, not sys.stderr, which a test's
    # capture replaces by an object without one): our stdout carries the JSON only
    subprocess.run(command, check=True, env=env, stdout=2)
    return command, time.perf_counter() - start


def read_lm_eval(out_dir: pathlib.Path, name: str) -> tuple[dict, list[dict]]:
    """(lm-eval's aggregated metrics, logged samples) of one task of the latest run."""
    results = json.loads(max(out_dir.rglob("results_*.json")).read_text())
    metrics = {k.split(",")[0]: v for k, v in results["results"][name].items()
               if k.split(",")[0] in ("acc", "acc_norm", "perplexity")}
    samples_file = max(out_dir.rglob(f"samples_{name}_*.jsonl"))
    return metrics, [json.loads(line) for line in samples_file.read_text().splitlines()]


def compare_logliks(task, samples, ours: dict, keys) -> dict:
    """Per request: lm-eval's (context, continuation) must be one of ours; loglik differences,
    and the documents where the two sides pick different choices (acc, acc_norm)."""
    diffs, missing, differ = [], 0, collections.Counter()
    for sample in samples:
        doc_id, pairs = sample["doc"]["doc_id"], []
        for args, resp in zip(sample["arguments"].values(), sample["filtered_resps"]):
            key = (task, doc_id, args["arg_0"], args["arg_1"])
            if key not in ours:
                missing += 1
                continue
            diffs.append(abs(float(resp[0]) - ours[key]))
            pairs.append((ours[key], float(resp[0]), max(len(args["arg_1"]), 1)))
        if len(pairs) > 1:
            argmax = lambda values: max(range(len(values)), key=values.__getitem__)
            differ["acc"] += argmax([o for o, _, _ in pairs]) != argmax([t for _, t, _ in pairs])
            if "acc_norm" in keys:
                differ["acc_norm"] += (argmax([o / n for o, _, n in pairs]) !=
                                       argmax([t / n for _, t, n in pairs]))
    return {"requests_matched": len(diffs), "requests_not_ours": missing,
            "max_abs_loglik_diff": max(diffs, default=None),
            "mean_abs_loglik_diff": sum(diffs) / len(diffs) if diffs else None,
            "docs_choice_differs": dict(differ)}


def lm_eval_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('lm_eval', 'transformers', 'torch', 'datasets', 'tokenizers', 'accelerate')}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated task names")
    parser.add_argument("--limit", type=int, default=100, help="documents per task (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lm-eval-python", default="/work/lmeval-venv/bin/python",
                        help="python of a virtualenv with lm-eval installed")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--workdir", help="model export, task files, lm-eval output (default: "
                                          "a temporary directory)")
    parser.add_argument("--compile-cache", default="",
                        help="our compiled programs from/to this folder (core/compile_cache.py, "
                             "on for every command); default: none, every program compiled")
    args = parser.parse_args(argv)
    cache_entries = 0
    if args.compile_cache:
        compile_cache.enable({"GENLAB_COMPILE_CACHE": args.compile_cache})
        folder = pathlib.Path(args.compile_cache)
        cache_entries = len(list(folder.iterdir())) if folder.is_dir() else 0
    tasks = [t for t in args.tasks.split(",") if t]
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="harness_vs_lm_eval_"))
    model_dir, include_dir = workdir / "model", workdir / "tasks"
    include_dir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / f"lm_eval_out_{time.strftime('%Y%m%d_%H%M%S')}"

    requests_of = {t: our_requests(t, args.limit) for t in tasks}
    names = {t: write_task(t, requests_of[t], include_dir) for t in tasks}
    start = time.perf_counter()
    cfg, params, tokenizer = import_gguf.load_gguf(import_gguf.pretrained_path(MODEL))
    load_seconds = time.perf_counter() - start
    hf_checkpoint.save_pretrained(model_dir, params, cfg, tokenizer)  # what lm-eval loads
    start = time.perf_counter()
    ours, our_logliks = score_ours(cfg, params, tokenizer, tasks, requests_of, args.batch_size)
    # end to end like lm-eval's wall time: loading the model, compiling and scoring
    ours_seconds = load_seconds + time.perf_counter() - start
    command, theirs_seconds = run_lm_eval(args.lm_eval_python, model_dir, include_dir,
                                          [n for n, _ in names.values()], out_dir,
                                          args.batch_size)

    per_task = {}
    for task in tasks:
        name, mode = names[task]
        theirs, samples = read_lm_eval(out_dir, name)
        row = {"docs": ours[task]["docs"], "lm_eval_docs": len(samples),
               "requests": len(requests_of[task]), "mode": mode}
        keys = ("acc", "perplexity") if mode == "loglikelihood" else \
            ("acc",) if mode == "multiple_input" else ("acc", "acc_norm")
        for key in keys:
            row[key] = {"ours": ours[task][key], "lm_eval": theirs.get(key)}
            if theirs.get(key) is not None:
                scale = 1 if key == "perplexity" else 100  # accuracies in points
                row[key]["diff" if key == "perplexity" else "diff_points"] = round(
                    scale * (ours[task][key] - theirs[key]), 6)
        row.update(compare_logliks(task, samples, our_logliks, keys))
        per_task[task] = row

    result = {
        "model": f"{MODEL} (Q4_1 GGUF, dequantized, float32 both sides; no BOS/prefix token)",
        "limit": args.limit, "batch_size": args.batch_size, "tasks": per_task,
        "max_abs_loglik_diff": max((r["max_abs_loglik_diff"] or 0) for r in per_task.values()),
        # wall time, compilation included: ours loads the GGUF and scores; lm-eval's subprocess
        # starts, loads the exported model and scores
        "seconds": {"ours": round(ours_seconds, 1), "lm_eval": round(theirs_seconds, 1),
                    "lm_eval_over_ours": round(theirs_seconds / ours_seconds, 2)},
        "compile_cache": {"folder": args.compile_cache, "entries_before": cache_entries},
        "lm_eval_venv_versions": lm_eval_versions(args.lm_eval_python),
        "commands": {"this": shlex.join([os.path.relpath(sys.executable), "-m",
                                         "benchmarks.harness_vs_lm_eval",
                                         *(argv if argv is not None else sys.argv[1:])]),
                     "lm_eval": shlex.join(map(str, command))},
        "workdir": str(workdir), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.datetime.now().isoformat(timespec="seconds")}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
