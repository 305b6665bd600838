"""The entry point: `python -m experiments.main {train,evaluate,sample} --config FILE[:ARG] ...`.

    train     --config CFG --workdir DIR [--config.a.b=v ...]   train, or resume from DIR
    evaluate  --workdir DIR [--config.a.b=v ...]                validation loss / ppl / bits per byte
              [--tasks hellaswag,piqa --shots 0,5 --limit N]      or zero-/few-shot task accuracy
    sample    --workdir DIR --prompt TEXT [--max-new-tokens N --temperature T
              --top-k K --top-p P --seed S]   (KV-cache decoding, streamed; temperature 0: greedy)
    export    --workdir DIR --out OUT          a decoder as a Hugging Face checkpoint (OUT/model;
                                               a LoRA run: merged, and its PEFT adapter in
                                               OUT/adapter)

evaluate, sample and export read the config saved in DIR, so they need no --config.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from core import cli


def parse(argv: list[str]):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("train", "evaluate", "sample", "export"))
    parser.add_argument("--config", help="config file, e.g. experiments/configs/lm/gpt.py:size=tiny")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--out", default="", help="export: the directory to write")
    parser.add_argument("--tasks", default="",
                        help="evaluate: zero-/few-shot tasks instead of validation loss, e.g. "
                             "hellaswag,piqa,arc_easy (see python -m lm.eval.evaluate_tasks --list)")
    parser.add_argument("--shots", default="0", help="evaluate --tasks: e.g. 0,1,5")
    parser.add_argument("--limit", type=int, default=0,
                        help="evaluate --tasks: first N documents per task (0: all)")
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return args, rest


def load(args, overrides):
    from core.config import load_config, load_run_config
    if args.config:
        return load_config(args.config, overrides)
    return load_run_config(args.workdir, overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    logging.getLogger("datasets").setLevel(logging.WARNING)  # "JAX version ... available"
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    from core.config import ConfigError, check_choice
    from core.distributed import maybe_initialize
    from lm.objectives.registry import OBJECTIVES
    from multimodal.commands import TASKS as MULTIMODAL_TASKS
    from vision.pipeline import IMAGE_TASKS
    config = load(args, overrides)
    maybe_initialize(config.distributed)
    # The three task tables: language objectives (lm/objectives/registry.py), image tasks, and
    # the multimodal generalist.
    check_choice("task", config.task, {**OBJECTIVES, **IMAGE_TASKS, **MULTIMODAL_TASKS})
    if config.task in OBJECTIVES:
        from lm import commands
    elif config.task in MULTIMODAL_TASKS:
        from multimodal import commands
    else:
        from vision import commands
    if not hasattr(commands, args.command):
        raise ConfigError(f"a {config.task} run has no {args.command} command")
    result = getattr(commands, args.command)(config, args)
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    cli.main_entry(main)
