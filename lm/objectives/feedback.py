"""What the feedback objectives (reward, dpo, ppo, grpo) share: the `feedback` config section,
the prompts of its tasks, the sampler, and the scores written after training.

  feedback.model / init_from / reference   where the policy and its reference come from
                                            (lm/objectives/policy_model.py)
  feedback.tasks          comma-separated reward tasks (lm/data/rewards.py): last_letters,
                          coin_flip, arithmetic, ifbench; their training prompts feed rollouts
                          and preference pairs, their held-out prompts the scores
  feedback.prompts        training prompts per task (IFBench: at most its scorable training
                          share); eval_prompts held-out prompts per task and length
  feedback.max_prompt_tokens, max_new_tokens, temperature   rows and sampling;
                          drop_long_prompts drops (and counts) prompts over the limit instead
                          of refusing them; eval_max_new_tokens (0: max_new_tokens) for scores

Scores (every objective but the reward model), on held-out prompts of each task: the greedy
reply's mean reward (a generated task's accuracy) in domain and at its held-out lengths, and,
for replies sampled at feedback.temperature, their mean reward and mean KL to the reference,
sum over the reply's tokens of log pi - log pi_ref (k1, unbiased on the policy's own samples).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from core import trainer
from core.config import ConfigError, check_choice, check_ranges
from lm.data import rewards
from lm.objectives import policy_model
from lm.objectives.rollouts import Sampler

RANGES = {"prompts": ">= 1", "eval_prompts": ">= 1", "max_prompt_tokens": ">= 1",
          "max_new_tokens": ">= 1", "temperature": "> 0", "beta": ">= 0"}
SCORES_FILE = "feedback_scores.json"


def check_config(config) -> None:
    check_ranges("feedback", config.feedback, RANGES)
    for task in tasks(config):
        check_choice("feedback.tasks entry", task, rewards.TASKS, ConfigError)


def tasks(config) -> list[str]:
    names = [t.strip() for t in config.feedback.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("feedback.tasks is empty: name at least one of "
                          f"{', '.join(rewards.TASKS)}")
    return names


def training_prompts(config) -> list[tuple[str, object]]:
    """(task, item) for every training prompt, tasks interleaved so every batch mixes them."""
    f = config.feedback
    per_task = [[(t, item) for item in rewards.prompts(t, f.prompts, f.seed,
                                                       cache=config.data.cache_dir)]
                for t in tasks(config)]
    return [pair for group in zip(*per_task) for pair in group] + [
        pair for group in per_task for pair in group[min(map(len, per_task)):]]


def sampler(config, policy: policy_model.Policy, model) -> Sampler:
    f = config.feedback
    return Sampler(model, policy.tokenizer, policy.template, f.max_prompt_tokens,
                   f.max_new_tokens, f.temperature, f.get("drop_long_prompts", False))


@dataclasses.dataclass
class FeedbackSetup:
    task: object
    tokenizer: object
    data: trainer.TaskData
    sampler: Sampler


def sequence_kl(task, params, batch) -> np.ndarray:
    """[B] sum over each row's completion of log pi - log pi_ref (at temperature 1)."""
    return np.asarray(_sequence_kl(task, params, {k: jnp.asarray(v) for k, v in batch.items()}))


@functools.partial(jax.jit, static_argnums=0)  # compiled once per task and row shape
def _sequence_kl(task, params, batch):
    policy, reference = policy_model.policy_and_reference(params)
    logp_BT, mask_BT, _ = task.read(policy, batch)
    ref_BT, _, _ = task.read(reference, batch)
    return jnp.sum((logp_BT - ref_BT) * mask_BT, axis=1)


def scores(config, setup: FeedbackSetup, params, step: int, batch_size: int = 32) -> dict:
    """The module docstring's scores of `params` (as the loss reads them: with the reference)."""
    f, cache = config.feedback, config.data.cache_dir
    result: dict = {"step": step}
    rng = jax.random.key(f.seed + 7)
    sampler = eval_sampler(config, setup.sampler)
    for task in tasks(config):
        held_out_lengths = [(f"length_{n}", (n,)) for n in rewards.out_of_domain_lengths(task)]
        for name, lengths in (("in_domain", None), *held_out_lengths):
            items, ids = held_out(config, sampler, task, lengths)
            _, greedy = sampler.sample(params_of(params), ids, rng, greedy=True,
                                       batch_size=batch_size)
            result[f"{task}/{name}"] = float(np.mean([rewards.reward(task, item, text, cache)
                                                      for item, text in zip(items, greedy)]))
            result[f"{task}/{name}/example"] = greedy[0]
            if name == "in_domain":
                result[f"{task}/sampled_reward"], result[f"{task}/kl"] = sampled_reward_and_kl(
                    setup.task, sampler, params, task, items, ids, rng, cache, batch_size)
    return result


def sampled_reward_and_kl(task, sampler: Sampler, params, reward_task: str, items, ids, rng,
                          cache: str = "", batch_size: int = 32) -> tuple[float, float]:
    """(mean reward, mean KL to the reference) of one reply per prompt sampled from the policy
    at the sampler's temperature."""
    rows, texts = sampler.sample(params_of(params), ids, rng, batch_size=batch_size)
    reward = np.mean([rewards.reward(reward_task, item, text, cache)
                      for item, text in zip(items, texts)])
    return float(reward), float(np.mean(sequence_kl(task, params, rows)))


def eval_sampler(config, sampler: Sampler) -> Sampler:
    """The sampler with feedback.eval_max_new_tokens: held-out lengths need longer replies."""
    f = config.feedback
    return dataclasses.replace(sampler, max_new_tokens=f.get("eval_max_new_tokens", 0)
                               or f.max_new_tokens)


def held_out(config, sampler: Sampler, task: str, lengths=None) -> tuple[list, list]:
    """(items, prompt ids) of a task's held-out prompts (lm/data/rewards.py)."""
    f = config.feedback
    return sampler.encode(rewards.prompts(task, f.eval_prompts, f.seed, held_out=True,
                                          lengths=lengths, cache=config.data.cache_dir))


def params_of(params):
    """The policy's parameters within what the loss reads."""
    return policy_model.policy_and_reference(params)[0]
