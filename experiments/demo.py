"""`make demo`: train a small GPT on the offline corpus and compare it with a compressor.

Prepares Austen + KJV + Brown, trains a BPE tokenizer on the training documents, trains the
`demo` GPT (rotary positions and SwiGLU, the ablation's best) on 2 CPU cores, then prints the
validation bits per byte next to `xz -9e` of the same validation text conditioned on the
training text, and a sample.
    python -m experiments.demo [--workdir runs/demo/NAME] [--config.train.steps=N ...]
"""
from __future__ import annotations

import datetime
import json
import logging
import pathlib
import sys
import time

from core import cli

CONFIG = "experiments/configs/lm/gpt.py:size=demo,style=rope_swiglu"


def trained_params(config, task, workdir) -> dict:
    """The parameters of the run's latest good checkpoint, on the host."""
    import jax

    from core.engine import restore_params
    return jax.device_get(restore_params(config, task, workdir)[1])


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    parser = cli.ArgumentParser(description=__doc__)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--workdir", default=f"runs/demo/{stamp}")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    from core.config import load_config
    from core.trainer import train
    from lm import pipeline
    from lm.decode import sampling
    from lm.eval import compressors as baseline

    config = load_config(CONFIG, overrides)
    started = time.perf_counter()
    setup = pipeline.build(config, args.workdir)
    summary = train(config, args.workdir, setup.task, setup.data)
    train_seconds = time.perf_counter() - started

    logging.info("computing the compressor baselines on the same split (about a minute)")
    train_text, val_text = baseline.doc_split(config.data.corpus, config.data.val_fraction,
                                              config.data.split_seed, config.data.cache_dir)
    compressors = {name: baseline.compressor_bits_per_byte(train_text, val_text, name)
                   for name in ("xz", "bzip2", "gzip")}

    print("\n--- sample (temperature 0.8, top-k 40) ---")
    sample = sampling.sample_text(setup.task, setup.tokenizer,
                                  trained_params(config, setup.task, args.workdir),
                                  "It is a truth universally acknowledged", 120,
                                  temperature=0.8, top_k=40, seed=0, stream=print)
    model_bpb = summary["eval_bits_per_byte"]
    result = {
        "workdir": args.workdir,
        "steps": summary["step"],
        "train_and_eval_seconds": round(train_seconds, 1),
        "tokens_per_s": round(summary.get("tokens_per_s", 0.0)),
        "validation_loss_nats_per_token": round(summary["eval_loss"], 4),
        "validation_bits_per_byte": round(model_bpb, 4),
        **{f"{name}_conditional_bits_per_byte": round(v, 4) for name, v in compressors.items()},
        "beats_xz": model_bpb < compressors["xz"],
        "sample": sample,
    }
    print("\n--- result ---")
    print(f"model  {model_bpb:.3f} bits/byte on validation ({result['steps']} steps, "
          f"{train_seconds / 60:.1f} min)")
    for name, value in compressors.items():
        print(f"{name:6s} {value:.3f} bits/byte (conditioned on the training text)")
    print(json.dumps(result, indent=2))
    (pathlib.Path(args.workdir) / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli.main_entry(main)
