"""The pure loss and advantage functions of feedback tuning: reward model, DPO, PPO, GRPO.

No model code here: every function takes arrays (log-probs, rewards, values, masks) and returns
arrays, so the one trainer that runs them (and the tests, which train a 16-action bandit with
them) can mix them freely. The formulas follow TRL 1.16 (RewardTrainer, DPOTrainer, GRPOTrainer)
and TRL's last PPOTrainer (removed from 1.16); where we differ, the function says so and why.

Conventions. A `mask_BT` is a float (or bool) per-token weight: 1 on completion tokens, 0 on
prompt and padding (a fractional weight works too, which is how the tests take exact
expectations). Token-level losses return `LossSums` (core/task.py): summed loss, the weight it is
to be divided by, and metric sums over the same weight, so microbatches add up exactly. Pairwise
losses (reward model, DPO) return per-pair arrays; their weight is the number of pairs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from core.config import ConfigError, check_choice
from core.task import LossSums

# GRPO's token aggregations, by our name and TRL 1.16's GRPOConfig.loss_type for the same thing.
AGGREGATIONS = {"sequence_mean": "grpo", "token_mean": "bnpo", "token_sum": "dr_grpo"}
DPO_KINDS = ("sigmoid", "hinge", "ipo")
KL_ESTIMATORS = ("k1", "k2", "k3")
_TRL_NAMES = {trl: ours for ours, trl in AGGREGATIONS.items()}


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array,
                   temperature: float = 1.0) -> jax.Array:
    """[B, T] log p(target) under softmax(logits / temperature), in fp32 whatever the logits'
    dtype: bf16 spaces log-probs near -5 by 0.03 nats, coarse enough for PPO's ratio
    exp(new - old) of two passes to leave 1 and clip where nothing changed."""
    logp_BTV = jax.nn.log_softmax(_f32(logits_BTV) / temperature, axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                      temperature: float = 1.0) -> jax.Array:
    """[B] summed completion log-probs (DPO's and the reward's sequence score; TRL sums too)."""
    return jnp.sum(token_logprobs(logits_BTV, targets_BT, temperature) * _f32(mask_BT), axis=-1)


def last_token_index(lengths_B: jax.Array) -> jax.Array:
    """[B] index of each row's last real token, from its length (lengths >= 1). Never found by
    searching for a pad id: with left padding, or pad == EOS, that search picks the wrong token."""
    return jnp.asarray(lengths_B, jnp.int32) - 1


# ------------------------------------------------------------------------------ reward model


def bradley_terry_loss(r_chosen_B: jax.Array, r_rejected_B: jax.Array, margin_B=None,
                       center_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B], metrics [B]) of a reward model on preference pairs (TRL RewardTrainer):
    -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2. The centring term (TRL's
    `center_rewards_coefficient`, Eisenstein et al. 2023) pins the reward's free offset near 0,
    which the pairwise loss alone leaves undetermined. Metrics: accuracy (r_c > r_r) and gap."""
    gap_B = _f32(r_chosen_B) - _f32(r_rejected_B)
    shifted_B = gap_B if margin_B is None else gap_B - _f32(margin_B)
    loss_B = -jax.nn.log_sigmoid(shifted_B)
    if center_coef:
        loss_B = loss_B + center_coef * (_f32(r_chosen_B) + _f32(r_rejected_B)) ** 2
    return loss_B, {"accuracy": (gap_B > 0).astype(jnp.float32), "reward_gap": gap_B}


# ------------------------------------------------------------------------------- DPO family


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens_B=None,
             rejected_tokens_B=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B], metrics [B]) from summed completion log-probs, as TRL 1.16's DPOTrainer:
      sigmoid  -log sigmoid(beta * d), d = (pi_c - ref_c) - (pi_r - ref_r)  (DPO, Eq. 7)
      hinge    relu(1 - beta * d)                                           (SLiC)
      ipo      (d' - 1 / (2 beta))^2                                        (IPO, Eq. 17)
    IPO: TRL divides each log-ratio by its completion's token count (d' is a per-token margin;
    the IPO authors' setting); given `chosen_tokens_B`/`rejected_tokens_B` we do the same,
    without them d' = d, the paper's sequence-level form. `label_smoothing` eps (sigmoid only) is
    conservative DPO (Mitchell 2023; TRL's sigmoid loss before 1.x, its "aot" form in 1.16):
    -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d), i.e. labels flipped with
    probability eps; TRL 1.16's "sigmoid" ignores label_smoothing. Metrics as TRL's: rewards
    beta * (pi - ref) for chosen and rejected, their margin, accuracy (chosen reward > rejected).
    """
    check_choice("dpo kind", kind, DPO_KINDS)
    if label_smoothing and kind != "sigmoid":
        raise ConfigError(f"label_smoothing={label_smoothing} applies to the sigmoid DPO loss "
                          f"only; set it to 0 for kind={kind!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 0.5): it is the "
                          "probability that a preference label is flipped")
    if beta <= 0:
        raise ConfigError(f"DPO beta={beta} must be > 0 (the KL strength; TRL's default is 0.1)")
    chosen_B = _f32(policy_chosen_B) - _f32(ref_chosen_B)
    rejected_B = _f32(policy_rejected_B) - _f32(ref_rejected_B)
    delta_B = chosen_B - rejected_B
    if kind == "sigmoid":
        loss_B = -jax.nn.log_sigmoid(beta * delta_B)
        if label_smoothing:
            loss_B = (1 - label_smoothing) * loss_B - label_smoothing * jax.nn.log_sigmoid(
                -beta * delta_B)
    elif kind == "hinge":
        loss_B = jax.nn.relu(1.0 - beta * delta_B)
    else:
        if chosen_tokens_B is not None:
            chosen_B = chosen_B / jnp.maximum(_f32(chosen_tokens_B), 1.0)
            rejected_B = rejected_B / jnp.maximum(_f32(rejected_tokens_B), 1.0)
        loss_B = (chosen_B - rejected_B - 1.0 / (2.0 * beta)) ** 2
    chosen_reward_B = beta * (_f32(policy_chosen_B) - _f32(ref_chosen_B))
    rejected_reward_B = beta * (_f32(policy_rejected_B) - _f32(ref_rejected_B))
    return loss_B, {"rewards_chosen": chosen_reward_B, "rewards_rejected": rejected_reward_B,
                    "margin": chosen_reward_B - rejected_reward_B,
                    "accuracy": (chosen_reward_B > rejected_reward_B).astype(jnp.float32)}


# ------------------------------------------------------------------------------ KL estimators


def kl_estimate(logp_policy: jax.Array, logp_ref: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || ref) for tokens sampled from the policy (Schulman,
    "Approximating KL divergence", 2020). With log r = logp_ref - logp_policy (r = p_ref / p_pol):
      k1 = -log r            unbiased, can be negative; = log p_policy - log p_ref
      k2 = (log r)^2 / 2     biased (matches KL to second order), always >= 0
      k3 = (r - 1) - log r   unbiased and always >= 0 (TRL's GRPO penalty, PPO's "k3")."""
    check_choice("kl estimator", kind, KL_ESTIMATORS)
    log_r = _f32(logp_ref) - _f32(logp_policy)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    return jnp.expm1(log_r) - log_r


# -------------------------------------------------------------------------- advantages (PPO)


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma, lam,
        last_value_B=None) -> tuple[jax.Array, jax.Array]:
    """(advantages [B, T], returns [B, T]): generalised advantage estimation (Schulman et al.
    2016) by a reverse lax.scan, A_t = delta_t + gamma_t lam_t m_{t+1} A_{t+1},
    delta_t = r_t + gamma_t m_{t+1} V_{t+1} - V_t, with m the mask: a row's episode ends at its
    last real token (the next value counts 0, as TRL's PPO), or, for a window cut short, continues
    into `last_value_B`, the value after position T-1. `gamma`/`lam` may be scalars or [B, T]
    (rlax's per-step discounts). Returns = advantages + values. Both are 0 where the mask is 0.
    (TRL keeps the value of one padding token past the end and adds the score there; we do not.)
    """
    rewards_BT, values_BT, mask_BT = _f32(rewards_BT), _f32(values_BT), _f32(mask_BT)
    B = rewards_BT.shape[0]
    last_B = jnp.zeros((B,), jnp.float32) if last_value_B is None else _f32(last_value_B)
    next_mask_BT = jnp.concatenate([mask_BT[:, 1:], jnp.ones((B, 1), jnp.float32)], axis=1)
    next_values_BT = jnp.concatenate([values_BT[:, 1:], last_B[:, None]], axis=1) * next_mask_BT
    gamma_BT = jnp.broadcast_to(_f32(gamma), rewards_BT.shape)
    delta_BT = rewards_BT + gamma_BT * next_values_BT - values_BT
    coef_BT = gamma_BT * jnp.broadcast_to(_f32(lam), rewards_BT.shape) * next_mask_BT

    def step(next_adv_B, inputs):
        delta_B, coef_B, mask_B = inputs
        adv_B = (delta_B + coef_B * next_adv_B) * mask_B
        return adv_B, adv_B

    _, adv_TB = jax.lax.scan(step, jnp.zeros((B,), jnp.float32),
                             (delta_BT.T, coef_BT.T, mask_BT.T), reverse=True)
    advantages_BT = adv_TB.T
    return advantages_BT, (advantages_BT + values_BT) * mask_BT


def whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
    """x normalised by its masked mean and unbiased (Bessel) variance, as TRL's masked_whiten:
    (x - mean) / sqrt(var + eps); with shift_mean=False the mean is added back (TRL's reward
    whitening). 0 outside the mask. Needs a mask weight above 1 in all (Bessel divides by n-1)."""
    x_BT, mask_BT = _f32(x_BT), _f32(mask_BT)
    n = jnp.sum(mask_BT)
    mean = jnp.sum(x_BT * mask_BT) / n
    var = jnp.sum((x_BT - mean) ** 2 * mask_BT) / n * (n / (n - 1.0))
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + eps)
    return (out_BT if shift_mean else out_BT + mean) * mask_BT


# ---------------------------------------------------------------------------------------- PPO


def ppo_rewards(score_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array,
                kl_coef) -> jax.Array:
    """[B, T] per-token rewards of RLHF (Ziegler et al. 2019; TRL): -kl_coef * KL_t on every
    completion token plus the sequence's score on its last real token (the last masked-in
    position, whatever the padding side). With k1 as KL_t the policy-gradient fixed point is
    the KL-regularised optimum pi_ref exp(r / kl_coef) / Z: r - kl_coef * k1 is the reward whose
    policy gradient is that of E[r] - kl_coef KL(pi || ref); with k3 as the reward it is not."""
    mask_BT = _f32(mask_BT)
    T = mask_BT.shape[1]
    last_B = T - 1 - jnp.argmax(mask_BT[:, ::-1] > 0, axis=1)
    is_last_BT = (jnp.arange(T)[None, :] == last_B[:, None]) & (mask_BT > 0)
    return (-kl_coef * _f32(kl_BT) + is_last_BT * _f32(score_B)[:, None]) * mask_BT


def ppo_policy_loss(logp_new_BT, logp_old_BT, advantages_BT, mask_BT, clip: float = 0.2
                    ) -> LossSums:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, TRL's form:
    max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)), ratio = exp(logp_new - logp_old); weight =
    the mask. Metrics: clip_fraction (tokens where the clipped term is the larger),
    approx_kl = (logp_new - logp_old)^2 / 2 (TRL's; masked here, TRL averages over padding too),
    ratio. At logp_new == logp_old the ratio is 1 and nothing is clipped."""
    mask_BT = _f32(mask_BT)
    log_ratio_BT = _f32(logp_new_BT) - _f32(logp_old_BT)
    ratio_BT = jnp.exp(log_ratio_BT)
    adv_BT = _f32(advantages_BT)
    loss1_BT = -adv_BT * ratio_BT
    loss2_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip)
    return LossSums(loss=jnp.sum(jnp.maximum(loss1_BT, loss2_BT) * mask_BT),
                    weight=jnp.sum(mask_BT),
                    extra={"clip_fraction": jnp.sum((loss2_BT > loss1_BT) * mask_BT),
                           "approx_kl": jnp.sum(0.5 * log_ratio_BT ** 2 * mask_BT),
                           "ratio": jnp.sum(ratio_BT * mask_BT)})


def ppo_value_loss(values_new_BT, values_old_BT, returns_BT, mask_BT, clip: float = 0.2
                   ) -> LossSums:
    """PPO's clipped value loss, TRL's form: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)
    per token; weight = the mask; metric value_clip_fraction."""
    mask_BT, returns_BT = _f32(mask_BT), _f32(returns_BT)
    values_BT, old_BT = _f32(values_new_BT), _f32(values_old_BT)
    clipped_BT = jnp.clip(values_BT, old_BT - clip, old_BT + clip)
    loss1_BT, loss2_BT = (values_BT - returns_BT) ** 2, (clipped_BT - returns_BT) ** 2
    return LossSums(loss=jnp.sum(0.5 * jnp.maximum(loss1_BT, loss2_BT) * mask_BT),
                    weight=jnp.sum(mask_BT),
                    extra={"value_clip_fraction": jnp.sum((loss2_BT > loss1_BT) * mask_BT)})


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. 2019's KL controller (TRL's, target 6 nats, horizon 10,000): the caller
    keeps kl_coef (in its train state) and calls the pure `update` after each rollout batch."""
    target: float = 6.0
    horizon: float = 10_000.0

    def __post_init__(self):
        if self.target <= 0 or self.horizon <= 0:
            raise ConfigError(f"adaptive KL: target={self.target} and horizon={self.horizon} "
                              "must both be > 0")

    def update(self, kl_coef, current_kl, n_steps):
        """kl_coef * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon)."""
        error = jnp.clip(_f32(current_kl) / self.target - 1.0, -0.2, 0.2)
        return _f32(kl_coef) * (1.0 + error * n_steps / self.horizon)


# --------------------------------------------------------------------------------------- GRPO


def grpo_advantages(rewards_B: jax.Array, group_size: int, scale: bool = True,
                    eps: float = 1e-4) -> jax.Array:
    """[B] group-relative advantages (Shao et al. 2024; TRL): rows come in consecutive groups
    of `group_size` samples of one prompt; A = r - mean_group, divided by (std_group + eps) when
    `scale`, std unbiased (Bessel, TRL's nanstd). The division changes the fixed point: the
    expected gradient becomes grad E[r] / std_pi(r), so a KL penalty beta acts as beta * std and
    the optimum is no longer pi_ref exp(r / beta) / Z; scale=False (Dr. GRPO) keeps it."""
    rewards_B = _f32(rewards_B)
    if group_size < 2:
        raise ConfigError(f"GRPO group_size={group_size}: a group needs at least 2 samples "
                          "(its mean is the baseline)")
    if rewards_B.shape[0] % group_size:
        raise ConfigError(f"GRPO: {rewards_B.shape[0]} rewards do not split into groups of "
                          f"{group_size}; make the batch a multiple of the group size")
    r_GN = rewards_B.reshape(-1, group_size)
    adv_GN = r_GN - jnp.mean(r_GN, axis=1, keepdims=True)
    if scale:
        adv_GN = adv_GN / (jnp.std(r_GN, axis=1, ddof=1, keepdims=True) + eps)
    return adv_GN.reshape(-1)


def grpo_loss(logp_new_BT, logp_old_BT, logp_ref_BT, advantages_B, mask_BT, clip: float = 0.2,
              beta: float = 0.0, aggregation: str = "sequence_mean", kl_correction: bool = True,
              clip_high: float | None = None, max_tokens: int | None = None) -> LossSums:
    """GRPO's loss as TRL 1.16's GRPOTrainer (token-level ratios): per token
    -min(ratio A, clip(ratio, 1 - clip, 1 + clip_high) A) + beta * KL_t, KL_t = k3(new, ref)
    times the ratio when `kl_correction` (TRL's use_bias_correction_kl, its default). Why the
    correction matters: k3 differentiated on samples of the policy has the expected gradient of
    the forward KL(ref || pi), whose bandit optimum is beta * pi_ref / (c - r), not Eq. 4's
    pi_ref exp(r / beta) / Z; weighted by the ratio it has the reverse KL(pi || ref)'s gradient.
    Aggregation (the LossSums weight; TRL's loss_type in brackets):
      sequence_mean ("grpo")    mean over each completion's tokens, then over completions
      token_mean    ("bnpo")    mean over all completion tokens of the batch (the engine divides
                                by the whole accumulated batch's tokens: TRL's "dapo")
      token_sum     ("dr_grpo") token sum / (completions * max_tokens), a constant normaliser
    Metrics (same weighting as the loss): clip_fraction (TRL's region clip), kl, ratio."""
    aggregation = _TRL_NAMES.get(aggregation, aggregation)
    check_choice("GRPO aggregation", aggregation, AGGREGATIONS)
    if beta and logp_ref_BT is None:
        raise ConfigError(f"GRPO beta={beta} needs the reference log-probs (logp_ref_BT)")
    clip_high = clip if clip_high is None else clip_high
    mask_BT = _f32(mask_BT)
    adv_B1 = _f32(advantages_B)[:, None]
    ratio_BT = jnp.exp(_f32(logp_new_BT) - _f32(logp_old_BT))
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip_high)
    loss_BT = -jnp.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    token_metrics = {"clip_fraction": (((ratio_BT < 1.0 - clip) & (adv_B1 < 0))
                                       | ((ratio_BT > 1.0 + clip_high) & (adv_B1 > 0))),
                     "ratio": ratio_BT}
    if beta:
        kl_BT = kl_estimate(logp_new_BT, logp_ref_BT, "k3")
        if kl_correction:
            kl_BT = kl_BT * ratio_BT
        loss_BT = loss_BT + beta * kl_BT
        token_metrics["kl"] = kl_BT
    B, T = mask_BT.shape
    w_BT, weight = mask_BT, jnp.sum(mask_BT)  # token_mean
    if aggregation == "sequence_mean":
        w_BT = mask_BT / jnp.maximum(jnp.sum(mask_BT, axis=1, keepdims=True), 1.0)
        weight = jnp.asarray(B, jnp.float32)
    elif aggregation == "token_sum":
        weight = jnp.asarray(B * (max_tokens or T), jnp.float32)
    return LossSums(loss=jnp.sum(loss_BT * w_BT), weight=weight,
                    extra={name: jnp.sum(jax.lax.stop_gradient(_f32(x_BT)) * w_BT)
                           for name, x_BT in token_metrics.items()})


# ----------------------------------------------------------------------------------- analysis


def best_of_n_probs(probs_K: jax.Array, rewards_K: jax.Array, n: int) -> jax.Array:
    """[K] exact distribution of best-of-n sampling from a categorical with distinct rewards:
    P(best = k) = F(r_k)^n - F(r_k^-)^n, F the base distribution's reward CDF. Its KL to the
    base is at most log n - (n - 1) / n, reached when no answer holds much mass (Beirami 2024)."""
    order_K = jnp.argsort(_f32(rewards_K))
    cdf_K = jnp.cumsum(_f32(probs_K)[order_K])
    below_K = jnp.concatenate([jnp.zeros((1,), jnp.float32), cdf_K[:-1]])
    return jnp.zeros_like(cdf_K).at[order_K].set(cdf_K ** n - below_K ** n)
