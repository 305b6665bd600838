"""A finished scaling sweep -> its (parameters, tokens, FLOPs, loss) points -> the fits and plots.

    python -m experiments.sweep --config experiments/configs/lm/scaling.py --workdir runs/scaling
    python -m experiments.scaling.study --sweep runs/scaling --out experiments/results/scaling_cpu

Each member's summary.json (core/trainer.py) records its parameter counts, the tokens it trained
on, its training FLOPs (6N + attention, as the MFU uses) and its final validation loss. N is every
parameter by default (Chinchilla's choice; --params non_embedding for Kaplan's); the IsoFLOP groups
are the sweep's compute budgets. Writes points.csv next to fit.json and the plots.
"""
from __future__ import annotations

import csv
import json
import pathlib
import sys

from core import cli
from core.config import DataError

PARAMS = {"total": "num_params", "non_embedding": "params_non_embedding"}


def sweep_points(sweep_dir: str | pathlib.Path, params: str = "total") -> list[dict]:
    """One row per finished member: params, tokens, flops, loss."""
    root = pathlib.Path(sweep_dir)
    summaries = sorted(root.glob("*/summary.json"))
    if not summaries:
        raise DataError(f"no member summaries under {root}; run the sweep first "
                         "(python -m experiments.sweep --config experiments/configs/lm/scaling.py "
                         f"--workdir {root})")
    rows, unfinished = [], []
    for path in summaries:
        summary = json.loads(path.read_text())
        if not summary.get("finished") or "eval_loss" not in summary:
            unfinished.append(path.parent.name)
            continue
        rows.append({"name": path.parent.name, "params": summary[PARAMS[params]],
                     "tokens": summary["tokens_seen"], "flops": summary["train_flops"],
                     "loss": summary["eval_loss"]})
    if unfinished:
        print(f"note: {len(unfinished)} unfinished member(s) left out: {unfinished}",
              file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", required=True, help="the sweep's --workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", choices=sorted(PARAMS), default="total")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--budgets", default="", help="FLOPs to report allocations at")
    args = parser.parse_args(argv)
    from experiments.scaling import fit
    rows = sweep_points(args.sweep, args.params)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "params", "tokens", "flops", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    fit_args = ["--points", str(out / "points.csv"), "--bootstrap", str(args.bootstrap),
                "--out", str(out)]
    return fit.main(fit_args + (["--budgets", args.budgets] if args.budgets else []))


if __name__ == "__main__":
    cli.main_entry(main)
