"""Reward of many sampled replies per held-out prompt for a feedback run's final policy: the
mean (one reply's expected reward, with far less noise than one reply per prompt) and best-of-n
drawn from them. benchmarks/feedback_frontier.py measures the start the same way (its best-of-n
at n = 1), with the same sampling key.

    python -m benchmarks.feedback_replies --workdir runs/grpo90 --replies 16 \\
        --out benchmarks/results/cpu_smollm2_grpo90_replies.json

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from benchmarks.feedback_frontier import expected_best_of
from benchmarks.report import emit
from core.checkpoint import Checkpointer
from core.config import load_run_config
from core.engine import Engine
from core.train_state import TrainState
from lm import commands
from lm.data import rewards
from lm.objectives import feedback


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a feedback run")
    parser.add_argument("--task", default="last_letters")
    parser.add_argument("--replies", type=int, default=16)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    config = load_run_config(args.workdir, ())
    setup = commands.build(config, args.workdir, need_train=False)
    engine = Engine(config, setup.task)
    frozen = engine.init_state().frozen
    checkpointer = Checkpointer(pathlib.Path(args.workdir) / "checkpoints", async_save=False)
    step = max(checkpointer.steps())
    saved, _ = checkpointer.restore(step, engine.saved_state(engine.abstract_state))
    checkpointer.close()
    params = engine.loss_params(TrainState(**saved, frozen=frozen))
    sampler = feedback.eval_sampler(config, setup.sampler)
    items, ids = feedback.held_out(config, sampler, args.task)
    n = args.replies
    _, texts = sampler.sample(feedback.params_of(params), [p for p in ids for _ in range(n)],
                              jax.random.key(config.feedback.seed + 11), batch_size=64)
    scores_PN = np.asarray([rewards.reward(args.task, item, texts[k * n + m],
                                           config.data.cache_dir)
                            for k, item in enumerate(items) for m in range(n)]
                           ).reshape(len(items), n)
    return emit({"workdir": args.workdir, "step": step, "prompts": len(items),
                 "replies": int(scores_PN.size), "mean_reward": float(scores_PN.mean()),
                 "best_of": {k: float(np.mean([expected_best_of(row, k) for row in scores_PN]))
                             for k in (1, 2, 4, 8, 16, 32, 64) if k <= n}}, args.out)


if __name__ == "__main__":
    main()
