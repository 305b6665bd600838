"""Generalist against specialists: one table and one plot from the runs' gato_eval.json files.

  python -m multimodal.study --generalist runs/gato --specialists runs/gato-{domain} \
      --plot docs/gato_study.png
Each domain's measure of the generalist beside the specialist trained on that domain alone;
`{domain}` in --specialists is replaced by each domain's name. Prints the markdown table.
"""
from __future__ import annotations

import json
import math
import pathlib

from core import cli
from core.config import ConfigError
from multimodal.data import CONTROL, DOMAINS

# domain -> (what is measured, its key in gato_eval.json, its error's key, higher is better)
MEASURES = {
    "text": [("bits per byte", ("text", "bits_per_byte"), None, False)],
    "captions": [("class-word accuracy", ("captions", "class_word_accuracy"), None, True),
                 ("zero-shot accuracy", ("captions", "zero_shot_accuracy"), None, True)],
    **{name: [("expert-normalised score", (name, "normalised"), (name, "normalised_stderr"),
               True),
              ("mean return", (name, "mean_return"), (name, "stderr"), True)]
       for name in CONTROL},
}


def load(workdir: str) -> dict:
    path = pathlib.Path(workdir) / "gato_eval.json"
    if not path.exists():
        raise ConfigError(f"{path} is missing: run python -m multimodal.evaluate --workdir "
                          f"{workdir} first")
    return json.loads(path.read_text())


def value(result: dict, key) -> float | None:
    if key is None:
        return None
    part = result.get(key[0])
    return None if part is None else part.get(key[1])


def rows(generalist: dict, specialists: dict[str, dict]) -> list[dict]:
    out = []
    for domain in DOMAINS:
        for label, key, error, higher in MEASURES[domain]:
            special = specialists.get(domain, {})
            out.append({"domain": domain, "measure": label, "higher_is_better": higher,
                        "generalist": value(generalist, key),
                        "generalist_stderr": stderr(generalist, key, error),
                        "specialist": value(special, key),
                        "specialist_stderr": stderr(special, key, error)})
    return out


def stderr(result: dict, key, error) -> float | None:
    """The recorded standard error; for an accuracy over n images, the binomial one."""
    if error is not None:
        return value(result, error)
    part = result.get(key[0]) or {}
    p, n = part.get(key[1]), part.get("images")
    return None if p is None or not n or "accuracy" not in key[1] else math.sqrt(p * (1 - p) / n)


def _cell(mean, stderr) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def table(study: list[dict]) -> str:
    lines = ["| domain | measure | generalist | specialist |", "| --- | --- | --- | --- |"]
    for r in study:
        arrow = "↑" if r["higher_is_better"] else "↓"
        lines.append(f"| {r['domain']} | {r['measure']} {arrow} | "
                     f"{_cell(r['generalist'], r['generalist_stderr'])} | "
                     f"{_cell(r['specialist'], r['specialist_stderr'])} |")
    return "\n".join(lines)


def plot(study: list[dict], path: str) -> None:
    """One panel per domain's first measure: generalist and specialist side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = [next(r for r in study if r["domain"] == d) for d in DOMAINS]
    fig, axes = plt.subplots(1, len(first), figsize=(3 * len(first), 3.2))
    for ax, r in zip(axes, first):
        means = [r["generalist"] or 0.0, r["specialist"] or 0.0]
        errors = [r["generalist_stderr"] or 0.0, r["specialist_stderr"] or 0.0]
        ax.bar(["generalist", "specialist"], means, yerr=errors, color=["tab:blue", "tab:orange"],
               capsize=4)
        ax.set_title(f"{r['domain']}\n{r['measure']} {'↑' if r['higher_is_better'] else '↓'}",
                     fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle("One model for all domains against one model per domain (same size, same "
                 "tokens of each domain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--generalist", required=True)
    parser.add_argument("--specialists", required=True,
                        help="workdir pattern with {domain}, e.g. runs/gato-{domain}")
    parser.add_argument("--plot", default="")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if "{domain}" not in args.specialists:
        raise ConfigError("--specialists needs {domain} in it, e.g. runs/gato-{domain}")
    generalist = load(args.generalist)
    specialists = {}
    for domain in DOMAINS:
        workdir = args.specialists.format(domain=domain)
        if (pathlib.Path(workdir) / "gato_eval.json").exists():
            specialists[domain] = load(workdir)
        else:
            print(f"no {workdir}/gato_eval.json: the {domain} specialist's cells show -")
    study = rows(generalist, specialists)
    print(table(study))
    if args.plot:
        plot(study, args.plot)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(study, indent=1))


if __name__ == "__main__":
    cli.main_entry(main)
