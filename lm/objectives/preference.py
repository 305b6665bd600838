"""Learning from preference pairs: the reward model (`config.task = "reward"`) and DPO (`"dpo"`,
with its IPO and hinge variants, dpo.kind).

Both read pairs (lm/data/preferences.py) as [2, L] rows, chosen then rejected, and run them
through the model as one batch of 2B rows.
  reward  the reward head at each row's last real token (lm/objectives/policy_model.py);
          Bradley-Terry loss with an optional margin (reward.margin times the pair's reward
          difference, when the pairs carry rewards) and centring (reward.center_coef); metrics:
          accuracy and reward gap. A full fine-tune: its head is trained whole.
  dpo     summed completion log-probs of the policy and of the reference, which is read on the
          fly (the frozen reference, or a LoRA run's base with its adapters off); the loss and
          metrics of policy_losses.dpo_loss.
The pairs are feedback.pairs (a JSONL file), or, when that is empty, sampled from the starting
policy: feedback.pair_samples replies to each training prompt of feedback.tasks, the best
against the worst by the task's reward (ties dropped), written once to <workdir>/pairs.jsonl
and read from there when the run resumes. A hash of each pair's content holds out
feedback.val_fraction of them for evaluation.
"""
from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from core import trainer
from core.batches import ArrayRows, BatchIterator, sum_batches
from core.config import ConfigError, DataError, check_choice
from core.step import host_eval
from core.task import BatchField, LossSums
from lm.data import chat, documents, preferences, rewards
from lm.objectives import feedback, policy_losses, policy_model, registry

log = logging.getLogger(__name__)
LORA = True  # DPO trains through LoRA adapters (lora.rank > 0); the reward model refuses them
CONFIG_RANGES = {"feedback": feedback.RANGES, "dpo": {"label_smoothing": "[0, 0.5)"},
                 "reward": {"center_coef": ">= 0", "margin": ">= 0"}}
PAIRS_FILE = "pairs.jsonl"
SCORES_FILE = feedback.SCORES_FILE


def _sums(loss_B, metrics_B, batch) -> LossSums:
    """Summed over the real pairs (evaluation pads its last batch with empty ones)."""
    real_B = (jnp.sum(batch["completion_mask"][:, 0], axis=1) > 0).astype(jnp.float32)
    return LossSums(loss=jnp.sum(loss_B * real_B), weight=jnp.sum(real_B),
                    extra={k: jnp.sum(v * real_B) for k, v in metrics_B.items()})


def _flat(batch) -> dict:
    """[B, 2, L] pair fields -> [2B, L] rows: chosen rows first, then rejected."""
    return {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]]) for k in
            policy_model.ROW_FIELDS}


class RewardTask(policy_model.PolicyTask):
    name = "reward"

    def __init__(self, *args, margin: float = 0.0, center_coef: float = 0.0, **kwargs):
        super().__init__(*args, heads=("reward",), **kwargs)
        self.margin, self.center_coef = margin, center_coef

    def batch_fields(self):
        return {**policy_model.row_fields(self.row_len, pairs=True),
                "reward_gap": BatchField((), jnp.float32, ("batch",))}

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        score_2B = self.score(params, _flat(batch), train, rng)
        chosen_B, rejected_B = jnp.split(score_2B, 2)
        loss_B, metrics_B = policy_losses.bradley_terry_loss(
            chosen_B, rejected_B, self.margin * batch["reward_gap"] if self.margin else None,
            self.center_coef)
        return _sums(loss_B, metrics_B, batch)

    def train_flops_per_example(self) -> float:
        return 2 * super().train_flops_per_example()


class DPOTask(policy_model.ReferencedPolicyTask):
    name = "dpo"

    def __init__(self, *args, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.kind, self.label_smoothing = beta, kind, label_smoothing

    def batch_fields(self):
        return policy_model.row_fields(self.row_len, pairs=True)

    def sequence_logprobs(self, params, batch, train=False, rng=None):
        """[2B] summed completion log-probs and [2B] completion token counts of the pairs."""
        logp_BT, mask_BT, _ = self.read(params, _flat(batch), train=train, rng=rng)
        return jnp.sum(logp_BT * mask_BT, axis=1), jnp.sum(mask_BT, axis=1)

    def loss(self, params, batch, rng, train: bool) -> LossSums:
        policy, reference = policy_model.policy_and_reference(params)
        logp_2B, tokens_2B = self.sequence_logprobs(policy, batch, train, rng)
        ref_2B = jax.lax.stop_gradient(self.sequence_logprobs(reference, batch)[0])
        halves = [jnp.split(x, 2) for x in (logp_2B, ref_2B, tokens_2B)]
        loss_B, metrics_B = policy_losses.dpo_loss(
            halves[0][0], halves[0][1], halves[1][0], halves[1][1], self.beta, self.kind,
            self.label_smoothing, halves[2][0], halves[2][1])
        return _sums(loss_B, metrics_B, batch)

    def train_flops_per_example(self) -> float:
        return 2 * super().train_flops_per_example() * 4 / 3  # and the reference's forward


# --------------------------------------------------------------------------------- data


def pair_rows(pairs: list[preferences.Pair], template, tokenizer, row_len: int,
              with_gap: bool = False) -> ArrayRows:
    """[N, 2, L] rows of the pairs; the completion is the last reply, its end-of-turn included;
    with_gap adds each pair's reward difference (0 where unknown). A pair that does not fit is
    a DataError naming it."""
    sides = []
    for side in ("chosen", "rejected"):
        prompts, replies = [], []
        for pair in pairs:
            prompt_len = len(tokenizer.encode([template.render(list(pair.prompt),
                                                               add_generation_prompt=True)])[0])
            ids, mask = chat.encode_conversation(template, tokenizer.encode,
                                                 pair.conversation(getattr(pair, side)), 0,
                                                 pair.where)
            end = int(np.nonzero(mask)[0][-1]) + 1  # through the reply's end-of-turn
            prompts.append(list(ids[:prompt_len]))
            replies.append(list(ids[prompt_len:end]))
        sides.append(policy_model.rows(prompts, replies, row_len, tokenizer.pad_id,
                                       [p.where for p in pairs]))
    fields = {k: np.stack([sides[0][k], sides[1][k]], axis=1) for k in policy_model.ROW_FIELDS}
    if with_gap:
        fields["reward_gap"] = np.asarray(
            [0.0 if p.chosen_reward is None or p.rejected_reward is None
             else p.chosen_reward - p.rejected_reward for p in pairs], np.float32)
    return ArrayRows(fields)


def sample_pairs(config, policy: policy_model.Policy, sampler, batch_size: int = 64
                 ) -> list[preferences.Pair]:
    """The module docstring's judged pairs, sampled from the starting policy on one device."""
    f, cache = config.feedback, config.data.cache_dir
    if policy.params is None:
        raise ConfigError("sampling preference pairs needs a trained policy: set "
                          "feedback.init_from or feedback.model, or give feedback.pairs")
    items = feedback.training_prompts(config)
    items, ids = sampler.encode([item for _, item in items], items)
    repeated = [p for p in ids for _ in range(f.pair_samples)]
    _, texts = sampler.sample(policy.params, repeated, jax.random.key(f.seed),
                              batch_size=batch_size)
    pairs = []
    for k, (task, item) in enumerate(items):
        replies = texts[k * f.pair_samples:(k + 1) * f.pair_samples]
        pair = preferences.judge(task, getattr(item, "where", getattr(item, "key", "")),
                                 rewards.prompt_messages(item), replies,
                                 [rewards.reward(task, item, r, cache) for r in replies])
        if pair is not None:
            pairs.append(pair)
    log.info("preference pairs: %d of %d prompts had replies of different reward", len(pairs),
             len(items))
    if not pairs:
        raise DataError(f"no prompt of {f.tasks} had two replies of different reward in "
                        f"{f.pair_samples} samples; raise feedback.pair_samples or temperature")
    return pairs


def load_pairs(config, workdir, policy, sampler) -> list[preferences.Pair]:
    if config.feedback.pairs:
        return preferences.load(config.feedback.pairs)
    saved = pathlib.Path(workdir) / PAIRS_FILE
    if saved.is_file():
        return preferences.load(saved)
    pairs = sample_pairs(config, policy, sampler)
    if jax.process_index() == 0:
        preferences.save(pairs, saved)
    return pairs


def build_setup(config, workdir=None, need_train: bool = True) -> feedback.FeedbackSetup:
    feedback.check_config(config)
    f = config.feedback
    if config.task == "reward" and registry.uses_lora(config):
        raise ConfigError("the reward model trains its head whole, which LoRA cannot yet: "
                          "set lora.rank=0")
    if config.task == "dpo":
        check_choice("dpo.kind", config.dpo.kind, policy_losses.DPO_KINDS, ConfigError)
    if config.task == "dpo" and f.beta <= 0:
        raise ConfigError(f"DPO needs feedback.beta > 0 (the KL strength; 0.1 is usual), got "
                          f"{f.beta}")
    policy, reference, reference_source = policy_model.load_policy(config)
    row_len = f.max_prompt_tokens + f.max_new_tokens
    if config.task == "reward":
        task = RewardTask(policy.model_cfg, row_len, policy.params, source=policy.source,
                          margin=config.reward.margin, center_coef=config.reward.center_coef)
    else:
        task = registry.with_lora(config, DPOTask(
            policy.model_cfg, row_len, policy.params, source=policy.source, reference=reference,
            reference_source=reference_source, seed=config.train.seed, beta=f.beta,
            kind=config.dpo.kind, label_smoothing=config.dpo.label_smoothing))
    sampler = feedback.sampler(config, policy, task.model)
    pairs = load_pairs(config, workdir, policy, sampler) if workdir else []
    if not pairs:
        raise ConfigError("the preference objectives need --workdir (their pairs are kept there)")
    held = [documents.is_validation(  # by content, not by the file's path: the same pairs anywhere
        f.seed, "pairs", json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True),
        f.val_fraction) for p in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    validation = [p for p, h in zip(pairs, held) if h] or train[:1]
    with_gap = config.task == "reward"
    val_rows = pair_rows(validation, policy.template, policy.tokenizer, row_len, with_gap)
    train_iter = None
    if need_train:
        train_rows = pair_rows(train, policy.template, policy.tokenizer, row_len, with_gap)
        train_iter = BatchIterator(train_rows, config.train.global_batch_size, config.train.seed,
                                   jax.process_index(), jax.process_count())
        log.info("%s: %d training pairs, %d held out", config.task, len(train), len(validation))
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)

    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        sums, _ = sum_batches(val_rows, eval_batch, run_batch, max_batches)
        weight = max(sums["weight"], 1.0)
        return {k: v / weight for k, v in sums.items() if k != "weight"} | {"pairs": weight}

    fingerprint = policy.tokenizer.fingerprint

    def check_meta(saved: dict) -> None:
        if saved.get("tokenizer_fingerprint", fingerprint) != fingerprint:
            raise ConfigError("the checkpoint was trained with another tokenizer than this "
                              "run's feedback.model / init_from; use the run's own settings")

    data = trainer.TaskData(train=train_iter, evaluate=evaluate, eval_batch_size=eval_batch,
                            meta={"tokenizer_fingerprint": fingerprint}, check_meta=check_meta)
    return feedback.FeedbackSetup(task, policy.tokenizer, data, sampler)


def scores(config, setup, params, step: int) -> dict:
    """DPO: the feedback scores (lm/objectives/feedback.py). The reward model: its held-out
    pair accuracy and loss."""
    if config.task == "dpo":
        return feedback.scores(config, setup, params, step)
    return {"step": step, "validation": setup.data.evaluate(host_eval(setup.task, params), 0)}
