"""Reward against KL to the reference: DPO, PPO, GRPO and best-of-n from one SFT start (the DPO
paper's Figure 2, on our verifiable task), and the held-out scores of the start and each run.

    python -m benchmarks.feedback_frontier --start runs/sft-lora \\
        --runs runs/grpo runs/dpo runs/ppo --out benchmarks/results/cpu_smollm2_feedback.json \\
        --plot docs/feedback_frontier.png

The start is scored as every feedback run is after training (lm/objectives/feedback.py: greedy
accuracy in domain and at held-out lengths, reward and KL of sampled replies), with itself as
the reference. Each run gives one point per checkpoint: the mean reward of one reply per
held-out prompt sampled at temperature 1, and the replies' mean KL to the reference (sum over
tokens of log pi - log pi_ref). Best-of-n draws n_max replies per prompt from the start; its
reward at n is the expected best of n drawn from them without replacement (exact, over all
subsets), at KL log n - (n - 1) / n (the standard formula, an upper bound that is tight when no
reply holds much of the policy's mass; Beirami et al. 2024). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import numpy as np

from benchmarks.report import emit
from core.checkpoint import Checkpointer
from core.config import load_config, load_run_config
from core.engine import Engine
from core.train_state import TrainState
from lm import commands
from lm.data import rewards
from lm.objectives import feedback, policy_model

CONFIG = "experiments/configs/lm/feedback.py"


def expected_best_of(rewards_M: np.ndarray, n: int) -> float:
    """E[max of n of the M rewards drawn without replacement]: the k-th smallest is the max
    with probability C(k-1, n-1) / C(M, n)."""
    sorted_M = np.sort(rewards_M)
    weights = [math.comb(k, n - 1) for k in range(len(sorted_M))]
    return float(np.dot(sorted_M, weights) / math.comb(len(sorted_M), n))


def start_setup(start: str, task: str, overrides: list[str]):
    """The start: an SFT run's workdir, or a packaged model name or .gguf."""
    where = f"init={start}" if pathlib.Path(start).is_dir() else f"model={start}"
    config = load_config(f"{CONFIG}:task=grpo,{where},tasks={task}", overrides)
    return config, commands.build(config, "", need_train=False)


def best_of_n(config, setup, n_max: int, task: str) -> list[dict]:
    policy = jax.device_get(setup.task.pretrained_params())
    sampler = feedback.eval_sampler(config, setup.sampler)
    items, ids = feedback.held_out(config, sampler, task)
    _, texts = sampler.sample(policy, [p for p in ids for _ in range(n_max)],
                              jax.random.key(config.feedback.seed + 11), batch_size=64)
    scores_PM = np.asarray([rewards.reward(task, item, texts[k * n_max + m],
                                           config.data.cache_dir)
                            for k, item in enumerate(items) for m in range(n_max)]
                           ).reshape(len(items), n_max)
    return [{"n": n, "kl_bound": math.log(n) - (n - 1) / n,
             "reward": float(np.mean([expected_best_of(row, n) for row in scores_PM]))}
            for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_max]


def run_points(workdir: str, task: str) -> dict:
    """The run's final scores and a (step, reward, kl) point per checkpoint."""
    config = load_run_config(workdir, ())
    setup = commands.build(config, workdir, need_train=False)
    engine = Engine(config, setup.task)
    frozen = engine.init_state().frozen  # the reference, as the run had it
    checkpointer = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
    sampler = feedback.eval_sampler(config, setup.sampler)
    items, ids = feedback.held_out(config, sampler, task)
    points = []
    for step in checkpointer.steps():
        saved, _ = checkpointer.restore(step, engine.saved_state(engine.abstract_state))
        params = engine.loss_params(TrainState(**saved, frozen=frozen))
        reward, kl = feedback.sampled_reward_and_kl(setup.task, sampler, params, task, items,
                                                    ids, jax.random.key(config.feedback.seed + 7),
                                                    config.data.cache_dir)
        points.append({"step": step, "reward": reward, "kl": kl})
    checkpointer.close()
    final = pathlib.Path(workdir) / feedback.SCORES_FILE
    return {"workdir": workdir, "task": config.task, "points": points,
            "scores": json.loads(final.read_text()) if final.is_file() else None}


def plot(result: dict, path: str, task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    start = result["start"][f"{task}/sampled_reward"]
    ax.plot([0] + [p["kl_bound"] for p in result["best_of_n"][1:]],
            [p["reward"] for p in result["best_of_n"]], "o--",
            label="best-of-n (n = " + ", ".join(str(p["n"]) for p in result["best_of_n"]) + ")")
    for run in result["runs"]:
        ax.plot([0] + [p["kl"] for p in run["points"]], [start] + [p["reward"] for p in
                run["points"]], "o-", label=f"{run['task']} (checkpoints)")
    ax.set_xlabel("KL(policy || reference), nats per reply")
    ax.set_ylabel(f"{task}: reward of a sampled reply")
    ax.set_title("Reward against KL from the SFT start (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", required=True, help="what every feedback run started from: "
                        "an SFT run's workdir, or a packaged model name or .gguf")
    parser.add_argument("--runs", nargs="*", default=[], help="feedback runs' workdirs")
    parser.add_argument("--task", default="last_letters")
    parser.add_argument("--n-max", type=int, default=16)
    parser.add_argument("--override", action="append", default=[],
                        help="config overrides for the start's scoring, e.g. "
                        "feedback.eval_prompts=50")
    parser.add_argument("--out", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    config, setup = start_setup(args.start, args.task, args.override)
    start = jax.device_get(setup.task.pretrained_params())
    both = policy_model.WithReference(start, start)
    result = {"benchmark": "feedback_frontier", "start_from": args.start, "task": args.task,
              "eval_prompts": config.feedback.eval_prompts,
              "start": feedback.scores(config, setup, both, 0),
              "best_of_n": best_of_n(config, setup, args.n_max, args.task),
              "runs": [run_points(w, args.task) for w in args.runs],
}
    if args.plot:
        plot(result, args.plot, args.task)
    emit(result, args.out)


if __name__ == "__main__":
    main()
