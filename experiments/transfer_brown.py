"""Transfer learning on Brown genres: our masked-LM encoder fine-tuned vs the same architecture
from scratch vs the imported all-MiniLM-L6-v2, over several seeds (experiments/configs/lm/
classify.py for each run). Prints a JSON summary: per setting the test accuracies per seed, their
mean and standard deviation, per window and per document. Runs that finished before (their
workdir holds test_accuracy.json) are collected, not retrained, so an interrupted study resumes.

    python -m experiments.main train --config experiments/configs/lm/bert.py:size=demo \\
        --workdir runs/bert-demo --config.data.val_fraction=0.2    # test documents held out
    python -m experiments.transfer_brown --encoder runs/bert-demo --seeds 0,1,2 \\
        --out experiments/results/brown_transfer.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import types

from core.config import load_config
from core.metrics import emit
from lm import classify

CONFIG = pathlib.Path(__file__).resolve().parent / "configs/lm/classify.py"


def settings(encoder: str, steps: int, lr: float, minilm_steps: int, minilm_lr: float) -> dict:
    """name -> config argument; both of ours share every hyperparameter but the initial weights."""
    ours = f"encoder={encoder},steps={steps},lr={lr}"
    return {"ours_pretrained": f"{ours},init=pretrained",
            "ours_scratch": f"{ours},init=scratch",
            "minilm_pretrained": f"encoder=all-minilm-l6-v2,steps={minilm_steps},lr={minilm_lr}"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="workdir of a masked_lm run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--minilm-steps", type=int, default=150)
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    parser.add_argument("--only", default="", help="comma-separated subset of the settings")
    parser.add_argument("--workdir", default="runs/brown-transfer")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    chosen = settings(args.encoder, args.steps, args.lr, args.minilm_steps, args.minilm_lr)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    summary = {"encoder": args.encoder, "settings": chosen, "results": {}}
    for name, arg in chosen.items():
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            workdir = pathlib.Path(args.workdir) / f"{name}_seed{seed}"
            done = workdir / "test_accuracy.json"
            if done.is_file():  # finished earlier: collect, do not retrain
                result = json.loads(done.read_text())
            else:
                config = load_config(f"{CONFIG}:{arg},seed={seed}")
                result = classify.train(config, types.SimpleNamespace(workdir=str(workdir)))
            runs.append({"seed": seed, **{k: result[k] for k in (
                "window_accuracy", "document_accuracy", "majority_class_accuracy")}})
        summary["results"][name] = {"runs": runs, **{
            f"{metric}_{stat}": fn([r[metric] for r in runs])
            for metric in ("window_accuracy", "document_accuracy")
            for stat, fn in (("mean", statistics.mean),
                             ("std", lambda x: statistics.stdev(x) if len(x) > 1 else 0.0))}}
    emit(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
