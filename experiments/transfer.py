"""Transfer learning, measured: an encoder fine-tuned from its pretrained weights vs the same
architecture trained from scratch on the same labelled data, over several seeds
(experiments/configs/lm/classify.py for each run), on Brown genres or SST-2 / RTE / BoolQ.
Settings: ours_pretrained / ours_scratch (a masked-LM run of ours, --encoder) and minilm_pretrained
/ minilm_scratch (the imported all-MiniLM-L6-v2). Prints a JSON summary: per setting the test
accuracies per seed, their mean and standard deviation, per window and per document, and for each
architecture trained both ways the pretrained-minus-scratch gain with Welch's one-sided t-test (is
pretraining better?). Runs that finished before (their workdir holds test_accuracy.json) are
collected, not retrained, so an interrupted study resumes.

    python -m experiments.main train --config experiments/configs/lm/bert.py:size=demo \\
        --workdir runs/bert-demo --config.data.val_fraction=0.2    # test documents held out
    python -m experiments.transfer --encoder runs/bert-demo --seeds 0,1,2 \\
        --only ours_pretrained,ours_scratch,minilm_pretrained \\
        --out experiments/results/brown_transfer.json
    python -m experiments.transfer --dataset sst2 --minilm-steps 100 --seq-len 64 \\
        --out experiments/results/sst2_transfer.json
"""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import types

import scipy.stats

from core import cli
from core.config import load_config
from core.metrics import emit
from lm import commands
from lm.objectives import classification as classify

CONFIG = pathlib.Path(__file__).resolve().parent / "configs/lm/classify.py"
METRICS = ("window_accuracy", "document_accuracy")


def settings(encoder: str, steps: int, lr: float, minilm_steps: int, minilm_lr: float) -> dict:
    """name -> config argument; each pretrained / scratch pair shares every hyperparameter but
    the initial weights. Without a run of ours (encoder ""), only the MiniLM pair."""
    architectures = {"minilm": f"encoder=all-minilm-l6-v2,steps={minilm_steps},lr={minilm_lr}"}
    if encoder:
        architectures = {"ours": f"encoder={encoder},steps={steps},lr={lr}", **architectures}
    return {f"{name}_{init}": f"{arg},init={init}" for name, arg in architectures.items()
            for init in ("pretrained", "scratch")}


def pretraining_gains(results: dict) -> dict:
    """architecture -> metric -> the pretrained-minus-scratch difference of mean accuracies and
    Welch's one-sided t-test p-value (H1: pretrained is better), for each architecture that has
    both settings with at least two seeds each; a p-value below 0.05 is what "beats" means."""
    gains = {}
    for name in results:
        arch, _, init = name.rpartition("_")
        scratch = results.get(f"{arch}_scratch")
        if init != "pretrained" or scratch is None:
            continue
        pretrained = results[name]
        if min(len(pretrained["runs"]), len(scratch["runs"])) < 2:
            continue
        gains[arch] = {}
        for metric in METRICS:
            a, b = ([r[metric] for r in setting["runs"]] for setting in (pretrained, scratch))
            gain = statistics.mean(a) - statistics.mean(b)
            p_value = float(scipy.stats.ttest_ind(a, b, equal_var=False,
                                                  alternative="greater").pvalue)
            if math.isnan(p_value):  # no spread on either side: the sign of the gain decides
                p_value = 0.0 if gain > 0 else 1.0
            gains[arch][metric] = {"gain": gain, "welch_t_p_one_sided": p_value}
    return gains


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="brown_genres",
                        choices=[d for d in classify.DATASETS if d not in classify.TOKEN_DATASETS])
    parser.add_argument("--encoder", default="", help="workdir of a masked-LM run of ours")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--minilm-steps", type=int, default=150)
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated subset of the settings")
    parser.add_argument("--workdir", default="", help="default runs/<dataset>-transfer")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    chosen = settings(args.encoder, args.steps, args.lr, args.minilm_steps, args.minilm_lr)
    if args.only:
        only = args.only.split(",")
        unknown = set(only) - set(chosen)
        if unknown:
            parser.error(f"--only {sorted(unknown)}: the settings are {sorted(chosen)} "
                         "(ours_* need --encoder)")
        chosen = {k: v for k, v in chosen.items() if k in only}
    common = f"dataset={args.dataset},seq_len={args.seq_len},batch={args.batch}"
    chosen = {name: f"{arg},{common}" for name, arg in chosen.items()}
    summary = {"dataset": args.dataset, "encoder": args.encoder, "settings": chosen,
               "results": {}}
    root = pathlib.Path(args.workdir or f"runs/{args.dataset}-transfer")
    for name, arg in chosen.items():
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            workdir = root / f"{name}_seed{seed}"
            done = workdir / "test_accuracy.json"
            if done.is_file():  # finished earlier: collect, do not retrain
                result = json.loads(done.read_text())
            else:
                config = load_config(f"{CONFIG}:{arg},seed={seed}")
                result = commands.train(config, types.SimpleNamespace(workdir=str(workdir)))
            runs.append({"seed": seed, **{k: result[k] for k in (
                *METRICS, "majority_class_accuracy")}})
        summary["results"][name] = {"runs": runs, **{
            f"{metric}_{stat}": fn([r[metric] for r in runs])
            for metric in METRICS
            for stat, fn in (("mean", statistics.mean),
                             ("std", lambda x: statistics.stdev(x) if len(x) > 1 else 0.0))}}
    summary["pretraining_gain"] = pretraining_gains(summary["results"])
    emit(summary, args.out)
    return summary


if __name__ == "__main__":
    cli.main_entry(main)
