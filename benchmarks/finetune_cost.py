"""What a fine-tune costs: the whole model, LoRA and QLoRA side by side on one config, in one run.

Each variant is the same SFT config (experiments/configs/lm/sft.py: SmolLM2-135M-Instruct on the
generated CoT tasks by default) with a different `lora` section: rank 0 (every parameter trains),
LoRA (rank 8 on all linear layers) and QLoRA (the same adapters over an NF4 base). For each:
trained parameters, the frozen base's bytes, XLA's memory estimate of the compiled step (what the
engine logs before step 1), and the step time, timed in alternating rounds so machine noise hits
every variant alike; medians are reported.

    python -m benchmarks.finetune_cost                    # the docs' recipe, 2 rounds of 2 steps
    python -m benchmarks.finetune_cost --args examples=200,seq_len=160,batch=8 --rounds 3
Prints one JSON object (and writes it to --out if given), with versions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.report import emit
from core.config import load_config
from core.engine import Engine
from lm import commands

VARIANTS = {
    "full": ["lora.rank=0"],
    "lora": ["lora.rank=8", "lora.alpha=16"],
    "qlora": ["lora.rank=8", "lora.alpha=16", "lora.base_format=nf4_dq"],
}


class Variant:
    """One compiled train step with its state and data, stepped on demand."""

    def __init__(self, config_spec: str, overrides: list[str], workdir: str):
        config = load_config(config_spec, overrides)
        setup = commands.build(config, workdir)
        self.engine = Engine(config, setup.task)
        self.data = setup.data.train
        self.state = self.engine.init_state()
        self.step = self.engine.compiled_train_step()
        self.tokens_per_step = config.train.global_batch_size * config.data.seq_len

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps, the batches made before the clock starts."""
        batches = [self.engine.global_batch(next(self.data)) for _ in range(steps)]
        jax.block_until_ready(self.state)
        started = time.perf_counter()
        for batch in batches:
            with self.engine.scope():
                self.state, metrics = self.step(self.state, batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - started) / steps

    def sizes(self) -> dict:
        count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
        nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
        report = self.engine.memory_report
        return {"trained_parameters": count(self.state.params),
                "trained_bytes": nbytes(self.state.params),
                "frozen_bytes": nbytes(self.state.frozen),
                "optimizer_bytes": nbytes(self.state.opt_state),
                "xla_step_gib": report.peak_bytes / 2**30 if report else None,
                "xla_step": report.summary() if report else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/configs/lm/sft.py")
    parser.add_argument("--args", default="examples=200,seq_len=480,batch=4",
                        help="the config's argument string (the docs' LoRA recipe by default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant, e.g. optim.learning_rate=1e-3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    spec = f"{args.config}:{args.args}" if args.args else args.config
    with tempfile.TemporaryDirectory() as root:
        variants = {name: Variant(spec, [*args.set, *VARIANTS[name]], f"{root}/{name}") for name in names}
        for variant in variants.values():
            variant.run(1)  # the first step pays for placement and warm-up
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, variant in variants.items():
                times[name].append(variant.run(args.steps))
        results = {}
        for name, variant in variants.items():
            median = statistics.median(times[name])
            results[name] = {**variant.sizes(), "step_seconds": median,
                             "step_seconds_rounds": times[name],
                             "tokens_per_s": variant.tokens_per_step / median}
            print(name, json.dumps(results[name]), flush=True)
    result = {"config": spec, "overrides": args.set, "variants": {n: VARIANTS[n] for n in names},
              "rounds": args.rounds, "steps_per_round": args.steps, "results": results,
}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
