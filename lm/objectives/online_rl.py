"""Online RL on the policy's own samples: PPO (`config.task = "ppo"`, RLHF) and GRPO (`"grpo"`).

One engine step is one rollout and one learning phase (core/step.py):
  1. rollout (host; lm/objectives/rollouts.py): the next train.global_batch_size / G prompts of
     feedback.tasks, each answered G times (GRPO's group, grpo.group_size; PPO: G = 1) by the
     current policy with the KV-cache decoder at feedback.temperature, drawn with the key
     fold_in(train.seed, step), so a resumed run draws the same samples; each reply scored by
     its task's reward (lm/data/rewards.py), or with feedback.reward_model (a reward run's
     workdir) by that model's head.
  2. prepare (jitted, with the parameters the replies were sampled from): old and reference
     log-probs at the sampling temperature; GRPO: group-normalised advantages; PPO: values from
     a value head on the policy's trunk, per-token rewards -kl_coef * KL_t plus the score at
     the last token (ppo.kl_estimator k1 or k3), GAE (gamma, lam) and whitened advantages.
     With ppo.kl_target > 0 the adaptive controller (Ziegler et al. 2019) updates kl_coef,
     which the train state keeps (so a resume continues it).
  3. learn: `epochs` passes over the rollout, each shuffled into `minibatches`, one optimiser
     update each; PPO: clipped policy loss + vf_coef * clipped value loss; GRPO: its clipped
     loss with beta * k3 KL to the reference (policy_losses.grpo_loss).
The learning rate schedule counts updates (steps * epochs * minibatches).
"""
from __future__ import annotations

import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from core import trainer
from core.batches import ArrayRows, BatchIterator
from core.config import ConfigError, check_choice, load_run_config
from core.engine import restore_params
from core.task import BatchField, LossSums
from lm.data import rewards
from lm.objectives import feedback, policy_losses, policy_model, preference, registry

log = logging.getLogger(__name__)
LORA = True  # GRPO trains through LoRA adapters; PPO's value head needs a full fine-tune
CONFIG_RANGES = {"feedback": feedback.RANGES,
                 "ppo": {"epochs": ">= 1", "minibatches": ">= 1", "gamma": "[0, 1]",
                         "lam": "[0, 1]", "clip": "> 0", "value_clip": "> 0", "vf_coef": ">= 0",
                         "kl_target": ">= 0", "kl_horizon": "> 0"},
                 "grpo": {"group_size": ">= 2", "epochs": ">= 1", "minibatches": ">= 1",
                          "clip": "> 0"}}
SCORES_FILE = feedback.SCORES_FILE


class OnlineRLTask(policy_model.ReferencedPolicyTask):
    """PPO or GRPO (`algorithm`) on rollout rows with their scores."""

    def __init__(self, *args, algorithm: str, settings, beta: float, temperature: float,
                 **kwargs):
        super().__init__(*args, heads=("value",) if algorithm == "ppo" else (), **kwargs)
        self.name = self.algorithm = algorithm
        self.s, self.beta, self.temperature = settings, beta, temperature

    def batch_fields(self):
        return {**policy_model.row_fields(self.row_len),
                "score": BatchField((), jnp.float32, ("batch",))}

    def updates_per_batch(self) -> tuple[int, int]:
        return self.s.epochs, self.s.minibatches

    # PPO's KL coefficient lives in the train state's model_state (a StatefulTask, core/task.py;
    # GRPO's is empty), so the loss also takes and returns it.
    def init_model_state(self, rng):
        return {"kl_coef": jnp.asarray(self.beta, jnp.float32)} if self.algorithm == "ppo" else {}

    def prepare_batch(self, params, batch, rng, model_state):
        policy, reference = policy_model.policy_and_reference(params)
        head = "value" if self.algorithm == "ppo" else ""
        old_BT, mask_BT, values_BT = self.read(policy, batch, self.temperature, head)
        ref_BT, _, _ = self.read(reference, batch, self.temperature)
        old_BT, ref_BT = jax.lax.stop_gradient(old_BT), jax.lax.stop_gradient(ref_BT)
        score_B = batch["score"]
        kl_B = jnp.sum((old_BT - ref_BT) * mask_BT, axis=1)
        metrics = {"reward": jnp.mean(score_B), "kl": jnp.mean(kl_B),
                   "reply_tokens": jnp.mean(jnp.sum(mask_BT, axis=1))}
        prepared = {**batch, "old_logp": old_BT, "ref_logp": ref_BT}
        if self.algorithm == "grpo":
            prepared["advantages"] = policy_losses.grpo_advantages(
                score_B, self.s.group_size, self.s.scale_rewards)
            return prepared, metrics, model_state
        values_BT = jax.lax.stop_gradient(values_BT)
        kl_coef = model_state["kl_coef"]
        token_kl_BT = policy_losses.kl_estimate(old_BT, ref_BT, self.s.kl_estimator)
        rewards_BT = policy_losses.ppo_rewards(score_B, token_kl_BT, mask_BT, kl_coef)
        advantages_BT, returns_BT = policy_losses.gae(rewards_BT, values_BT, mask_BT,
                                                      self.s.gamma, self.s.lam)
        prepared.update(advantages=policy_losses.whiten(advantages_BT, mask_BT),
                        returns=returns_BT, old_values=values_BT)
        if self.s.kl_target:
            controller = policy_losses.AdaptiveKLController(self.s.kl_target, self.s.kl_horizon)
            model_state = {"kl_coef": controller.update(kl_coef, metrics["kl"],
                                                        score_B.shape[0])}
        return prepared, {**metrics, "kl_coef": kl_coef}, model_state

    def loss(self, params, batch, rng, train: bool, model_state=None):
        policy, _ = policy_model.policy_and_reference(params)
        head = "value" if self.algorithm == "ppo" else ""
        logp_BT, mask_BT, values_BT = self.read(policy, batch, self.temperature, head, train, rng)
        if self.algorithm == "grpo":
            return policy_losses.grpo_loss(logp_BT, batch["old_logp"], batch["ref_logp"],
                                           batch["advantages"], mask_BT, self.s.clip, self.beta,
                                           self.s.aggregation, max_tokens=self.row_len - 1
                                           ), model_state
        pg = policy_losses.ppo_policy_loss(logp_BT, batch["old_logp"], batch["advantages"],
                                           mask_BT, self.s.clip)
        vf = policy_losses.ppo_value_loss(values_BT, batch["old_values"], batch["returns"],
                                          mask_BT, self.s.value_clip)
        sums = LossSums(pg.loss + self.s.vf_coef * vf.loss, pg.weight,
                        {**pg.extra, **vf.extra, "policy_loss": pg.loss, "value_loss": vf.loss})
        return sums, model_state

    def train_flops_per_example(self) -> float:
        """Each update's forward and backward, plus the prepare pass's two forwards."""
        return super().train_flops_per_example() * (self.s.epochs + 2 / 3)


# ------------------------------------------------------------------------------- rollouts


class RolloutSource:
    """The engine's training data for online RL: next_for(params, step) samples the step's
    replies from `params` and scores them. Resumes by its prompt iterator's state."""

    def __init__(self, config, sampler, items: list[tuple[str, object]], group_size: int,
                 score_fn):
        rows = config.train.global_batch_size
        self.prompts_per_step, self.group_size = rows // group_size, group_size
        self.items, self.ids = sampler.encode([item for _, item in items], items)
        self.sampler, self.score_fn, self.seed = sampler, score_fn, config.train.seed
        self.order = BatchIterator(ArrayRows({"index": np.arange(len(self.items))}),
                                   self.prompts_per_step, config.feedback.seed)
        self.timing: dict[str, float] = {}

    def next_for(self, params, step: int) -> dict[str, np.ndarray]:
        jax.block_until_ready(params)  # the previous step's learning is not rollout time
        started = time.perf_counter()
        picked = [int(i) for i in next(self.order)["index"] for _ in range(self.group_size)]
        rows, texts = self.sampler.sample(feedback.params_of(params),
                                          [self.ids[i] for i in picked],
                                          jax.random.fold_in(jax.random.key(self.seed), step))
        scores = self.score_fn([self.items[i] for i in picked], texts, rows)
        self.timing = {"rollout_s": time.perf_counter() - started,
                       "rollout_reward": float(np.mean(scores))}
        lo = jax.process_index() * len(picked) // jax.process_count()
        hi = (jax.process_index() + 1) * len(picked) // jax.process_count()
        return {k: v[lo:hi] for k, v in {**rows, "score": np.asarray(scores, np.float32)}.items()}

    def host_metrics(self) -> dict[str, float]:
        return dict(self.timing)

    def get_state(self) -> dict:
        return self.order.get_state()

    def set_state(self, state: dict) -> None:
        self.order.set_state(state)


def programmatic_scores(cache: str):
    def score(items, texts, rows):
        return [rewards.reward(task, item, text, cache) for (task, item), text in zip(items, texts)]
    return score


def reward_model_scores(workdir: str, fingerprint: str):
    """Scores from a trained reward run's head at each row's last token."""
    path = pathlib.Path(workdir)
    config = load_run_config(path, ())
    if config.task != "reward":
        raise ConfigError(f"feedback.reward_model {workdir} is a {config.task} run, not a "
                          "reward run")
    setup = preference.build_setup(config, path, need_train=False)
    if setup.tokenizer.fingerprint != fingerprint:
        raise ConfigError(f"feedback.reward_model {workdir} reads another tokenizer than the "
                          "policy")
    _, params, _ = restore_params(config, setup.task, path, setup.data.check_meta)
    params = jax.device_get(params)
    score_fn = jax.jit(setup.task.score)

    def score(items, texts, rows):
        return np.asarray(score_fn(params, {k: jnp.asarray(v) for k, v in rows.items()}))
    return score


def build_setup(config, workdir=None, need_train: bool = True) -> feedback.FeedbackSetup:
    feedback.check_config(config)
    f, algorithm = config.feedback, config.task
    settings = config[algorithm]
    group = settings.group_size if algorithm == "grpo" else 1
    batch, micro = config.train.global_batch_size, config.train.microbatches
    if batch % group:
        raise ConfigError(f"train.global_batch_size {batch} is not a multiple of "
                          f"grpo.group_size {group}: each prompt's group is one batch")
    if batch % (settings.minibatches * micro):
        raise ConfigError(f"train.global_batch_size {batch} does not split into "
                          f"{algorithm}.minibatches {settings.minibatches} x train.microbatches "
                          f"{micro}")
    if algorithm == "ppo":
        check_choice("ppo.kl_estimator", settings.kl_estimator, policy_losses.KL_ESTIMATORS,
                     ConfigError)
    else:
        check_choice("grpo.aggregation", settings.aggregation,
                     [*policy_losses.AGGREGATIONS, *policy_losses.AGGREGATIONS.values()],
                     ConfigError)
    if algorithm == "ppo" and registry.uses_lora(config):
        raise ConfigError("PPO's value head is trained whole, which LoRA cannot yet: set "
                          "lora.rank=0, or use grpo (no value model)")
    policy, reference, reference_source = policy_model.load_policy(config)
    task = registry.with_lora(config, OnlineRLTask(
        policy.model_cfg, f.max_prompt_tokens + f.max_new_tokens, policy.params,
        source=policy.source, reference=reference, reference_source=reference_source,
        seed=config.train.seed, algorithm=algorithm, settings=settings, beta=f.beta,
        temperature=f.temperature))
    sampler = feedback.sampler(config, policy, task.model)
    source = None
    if need_train:
        score_fn = (reward_model_scores(f.reward_model, policy.tokenizer.fingerprint)
                    if f.reward_model else programmatic_scores(config.data.cache_dir))
        source = RolloutSource(config, sampler, feedback.training_prompts(config), group,
                               score_fn)
    data = trainer.TaskData(train=source, evaluate=None, eval_batch_size=batch,
                            meta={"tokenizer_fingerprint": policy.tokenizer.fingerprint})
    return feedback.FeedbackSetup(task, policy.tokenizer, data, sampler)


def scores(config, setup, params, step: int) -> dict:
    return feedback.scores(config, setup, params, step)
