"""The pure feedback-tuning losses (lm/objectives/policy_losses.py) against their references.

References, each run here: TRL 1.16's own loss code (DPOTrainer._compute_loss,
GRPOTrainer._compute_loss and RewardTrainer.compute_loss, bound to a stand-in trainer whose
"model" returns the log-probs or rewards we give it), rlax's GAE, and closed forms: the
Bayes accuracy of a reward model and the KL of best-of-n sampling (the bandit optimum that DPO,
PPO and GRPO must each reach: tests/test_policy_bandit.py).
TRL 1.16 has no PPOTrainer; its last one's loss lines are copied below as the PPO reference.
"""
import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.config import ConfigError
from lm.objectives import policy_losses as pl

torch = pytest.importorskip("torch")


def _rng(seed):
    return np.random.default_rng(seed)


def _stand_in_trainer(**fields):
    """What TRL's loss methods read from `self`: a one-process accelerator and metric store."""
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
        reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
    return types.SimpleNamespace(
        accelerator=accelerator, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        model=types.SimpleNamespace(training=True), **fields)


def _mean(sums):
    return float(sums.loss) / float(sums.weight)


# ------------------------------------------------------------------------------ log-probs


def test_token_and_sequence_logprobs_match_trl():
    from trl.trainer.utils import selective_log_softmax
    g = _rng(0)
    logits = g.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = g.integers(0, 11, size=(3, 5))
    mask = (np.arange(5)[None] < np.array([[5], [2], [4]])).astype(np.float32)
    for temperature in (1.0, 0.7):
        ours = pl.token_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                 targets, temperature)
        ref = selective_log_softmax(torch.tensor(np.asarray(
            jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))), torch.tensor(targets),
            temperature).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        np.testing.assert_allclose(pl.sequence_logprobs(logits, targets, mask, temperature),
                                   (pl.token_logprobs(logits, targets, temperature)
                                    * mask).sum(1), atol=1e-5)
    # fp32 whatever the input dtype
    assert pl.token_logprobs(jnp.asarray(logits, jnp.bfloat16), targets).dtype == jnp.float32


def test_last_token_index_comes_from_lengths():
    pad = eos = 0  # pad == EOS: a search for the first pad id would stop before the real EOS
    tokens = np.array([[5, 7, eos, pad, pad], [pad, pad, 4, 9, eos]])
    lengths = np.array([3, 5])  # row 2 is left-padded: the last real token is the last column
    index = pl.last_token_index(lengths)
    assert index.dtype == jnp.int32 and list(np.asarray(index)) == [2, 4]
    assert list(tokens[np.arange(2), np.asarray(index)]) == [eos, eos]
    assert int(np.argmax(tokens[0] == pad)) - 1 != 2  # what a pad search would have read


# ------------------------------------------------------------------------------ reward model


def test_bradley_terry_matches_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer
    g = _rng(1)
    rc, rr, margin = (g.normal(size=8).astype(np.float32) for _ in range(3))
    for center in (None, 0.01):
        inputs = {"attention_mask": torch.ones(16, 4, dtype=torch.long)}
        if center is not None:
            inputs["margin"] = torch.tensor(margin)
        model = lambda **kw: types.SimpleNamespace(  # noqa: E731
            logits=torch.tensor(np.concatenate([rc, rr]))[:, None])
        trainer = _stand_in_trainer(args=types.SimpleNamespace(center_rewards_coefficient=center))
        trainer.model = types.SimpleNamespace(training=True)
        expected = float(RewardTrainer.compute_loss(trainer, model, inputs))
        loss_B, metrics = pl.bradley_terry_loss(rc, rr, margin if center else None, center or 0.0)
        assert float(jnp.mean(loss_B)) == pytest.approx(expected, rel=1e-6)
        assert float(jnp.mean(metrics["accuracy"])) == pytest.approx(
            trainer._metrics["train"]["accuracy"][0])
        assert float(jnp.mean(metrics["reward_gap"])) == pytest.approx(
            trainer._metrics["train"]["margin"][0], rel=1e-6)


def test_reward_model_reaches_bayes_accuracy():
    """A linear reward on random features, trained on preferences sampled from a known linear
    reward, predicts held-out labels as well as the true reward does (Bayes accuracy)."""
    g = _rng(2)
    d, n = 8, 20_000
    w_true = g.normal(size=d) * 0.6

    def pairs(count):
        xa, xb = g.normal(size=(count, d)), g.normal(size=(count, d))
        p_a = 1 / (1 + np.exp(-(xa - xb) @ w_true))
        a_wins = g.random(count) < p_a
        chosen, rejected = np.where(a_wins[:, None], xa, xb), np.where(a_wins[:, None], xb, xa)
        return (jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32),
                np.maximum(p_a, 1 - p_a).mean())

    train_c, train_r, _ = pairs(n)
    test_c, test_r, bayes = pairs(n)
    optimizer = optax.adam(0.05)

    def step(carry, _):
        w, opt = carry
        grad = jax.grad(lambda w: jnp.mean(pl.bradley_terry_loss(train_c @ w, train_r @ w)[0]))(w)
        updates, opt = optimizer.update(grad, opt)
        return (optax.apply_updates(w, updates), opt), None

    w0 = jnp.zeros(d)
    (w, _), _ = jax.lax.scan(step, (w0, optimizer.init(w0)), None, length=300)
    accuracy = float(jnp.mean(pl.bradley_terry_loss(test_c @ w, test_r @ w)[1]["accuracy"]))
    assert 0.7 < bayes < 0.95  # a task where neither chance nor certainty is the answer
    assert abs(accuracy - bayes) < 0.02, (accuracy, bayes)


# ------------------------------------------------------------------------------- DPO family


def _trl_dpo(loss_type, beta, token_logps, completion_mask, ref_chosen, ref_rejected):
    """TRL 1.16's DPOTrainer._compute_loss on given per-token log-probs [2B, T-1] (chosen rows
    first) and precomputed reference log-probs: (loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    rows, width = completion_mask.shape
    zeros = torch.zeros(rows, width - 1)
    model = types.SimpleNamespace(training=True)
    trainer = _stand_in_trainer(
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False)
    trainer.model = model
    forward = lambda **kw: types.SimpleNamespace(  # noqa: E731
        log_probs=torch.tensor(token_logps), entropy=zeros, mean_logits=zeros,
        is_top1=zeros.bool())
    inputs = {"input_ids": torch.zeros(rows, width, dtype=torch.long),
              "attention_mask": torch.ones(rows, width, dtype=torch.long),
              "completion_mask": torch.tensor(completion_mask),
              "ref_chosen_logps": torch.tensor(ref_chosen),
              "ref_rejected_logps": torch.tensor(ref_rejected)}
    loss = DPOTrainer._compute_loss(trainer, forward, inputs, False)
    return float(loss), {k: v[0] for k, v in trainer._metrics["train"].items()}


def test_dpo_losses_match_trl():
    """Per-token log-probs from random logits (ours vs TRL's selective_log_softmax checked
    above), summed by sequence_logprobs, through dpo_loss; TRL gets the same per-token values."""
    g = _rng(3)
    B, T, V = 4, 7, 13
    lengths = g.integers(1, T, size=2 * B)
    completion_mask = ((np.arange(T)[None] >= 1) & (np.arange(T)[None] <= lengths[:, None]))
    logits = g.normal(size=(2 * B, T - 1, V)).astype(np.float32)
    targets = g.integers(0, V, size=(2 * B, T - 1))
    shifted = completion_mask[:, 1:].astype(np.float32)
    token_logps = np.asarray(pl.token_logprobs(logits, targets)) * shifted
    seq = np.asarray(pl.sequence_logprobs(logits, targets, shifted))
    ref = seq + g.normal(size=2 * B).astype(np.float32)
    for kind in ("sigmoid", "hinge", "ipo"):
        for beta in (0.1, 0.5):
            expected, metrics = _trl_dpo(kind, beta, token_logps, completion_mask.astype(np.int64),
                                         ref[:B], ref[B:])
            tokens = lengths if kind == "ipo" else (None, None)
            loss_B, ours = pl.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta, kind,
                                       chosen_tokens_B=tokens[:B], rejected_tokens_B=tokens[B:])
            assert float(jnp.mean(loss_B)) == pytest.approx(expected, rel=1e-5, abs=1e-6), kind
            for name, trl_name in (("rewards_chosen", "rewards/chosen"),
                                   ("rewards_rejected", "rewards/rejected"),
                                   ("margin", "rewards/margins"),
                                   ("accuracy", "rewards/accuracies")):
                assert float(jnp.mean(ours[name])) == pytest.approx(metrics[trl_name],
                                                                    rel=1e-5, abs=1e-6)


def test_dpo_step_zero_and_conservative_dpo():
    g = _rng(4)
    logps = g.normal(size=6).astype(np.float32) * 5
    loss_B, metrics = pl.dpo_loss(logps[:3], logps[3:], logps[:3], logps[3:], beta=0.1)
    assert np.all(np.asarray(loss_B) == np.float32(math.log(2)))
    for name in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
        assert np.all(np.asarray(metrics[name]) == 0)
    # conservative DPO: the per-pair optimum is sigmoid(beta * d) = 1 - eps, not d = infinity
    beta, eps = 0.1, 0.1

    def loss_of(d):
        return pl.dpo_loss(d[None], jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta,
                           label_smoothing=eps)[0][0]
    d_star = math.log((1 - eps) / eps) / beta
    assert abs(float(jax.grad(loss_of)(jnp.float32(d_star)))) < 1e-6
    assert float(jax.grad(loss_of)(jnp.float32(d_star / 2))) < -1e-3
    assert float(jax.grad(loss_of)(jnp.float32(d_star * 2))) > 1e-3
    with pytest.raises(ConfigError, match="label_smoothing"):
        pl.dpo_loss(logps[:3], logps[3:], logps[:3], logps[3:], 0.1, "hinge", 0.1)
    with pytest.raises(ConfigError, match="dpo kind"):
        pl.dpo_loss(logps[:3], logps[3:], logps[:3], logps[3:], 0.1, "kto")


# ------------------------------------------------------------------------------ KL estimators


def test_kl_estimators_are_unbiased_for_kl_policy_ref():
    g = _rng(5)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(g.normal(size=16) * 1.5)))
    logq = np.asarray(jax.nn.log_softmax(jnp.asarray(g.normal(size=16) * 1.5)))
    p = np.exp(logp)
    kl = float(np.sum(p * (logp - logq)))  # KL(policy || ref)
    assert kl > 0.3
    samples = np.asarray(jax.random.categorical(jax.random.key(0), jnp.asarray(logp),
                                                shape=(200_000,)))
    for kind in ("k1", "k3"):
        exact = float(np.sum(p * np.asarray(pl.kl_estimate(logp, logq, kind))))
        assert exact == pytest.approx(kl, rel=1e-5)
        est = np.asarray(pl.kl_estimate(logp[samples], logq[samples], kind))
        assert abs(est.mean() - kl) < 4 * est.std() / math.sqrt(len(est)), kind
    assert np.all(np.asarray(pl.kl_estimate(logp, logq, "k3")) >= 0)
    k2 = float(np.sum(p * np.asarray(pl.kl_estimate(logp, logq, "k2"))))
    assert abs(k2 - kl) > 0.01  # biased, as Schulman says
    # the sign: k1 is log p_policy - log p_ref, so sampling the reference gives -KL(ref || pol)
    assert float(pl.kl_estimate(jnp.log(0.5), jnp.log(0.25), "k1")) == pytest.approx(math.log(2))


def test_best_of_n_kl_matches_closed_form():
    """Best-of-n from a policy with many small-probability answers (a continuous reward in the
    limit): its KL to the base, exact and estimated with k1 on samples, is log n - (n-1)/n."""
    g = _rng(6)
    K = 4096
    logp = jax.nn.log_softmax(jnp.asarray(g.normal(size=K) * 0.5, jnp.float32))
    rewards = jnp.asarray(g.permutation(K), jnp.float32)
    for n in (2, 4, 16):
        q = pl.best_of_n_probs(jnp.exp(logp), rewards, n)
        assert float(jnp.sum(q)) == pytest.approx(1.0, abs=1e-5)
        logq = jnp.log(jnp.maximum(q, 1e-30))
        closed = math.log(n) - (n - 1) / n
        exact = float(jnp.sum(q * (logq - logp)))
        assert exact <= closed + 1e-4 and exact == pytest.approx(closed, rel=0.05)
        if n <= 4:  # (at n = 16 the lowest answers' best-of-n mass underflows fp32)
            k3 = float(jnp.sum(q * pl.kl_estimate(logq, logp, "k3")))
            assert k3 == pytest.approx(exact, rel=1e-4)
        # measured on samples with k1 (k3 is unbiased too, but r = p_base / p_bon is huge on the
        # rarely drawn low-reward answers: its sample mean misses that tail, 15% low at n = 4)
        uniform = jax.random.uniform(jax.random.key(n), (100_000,))
        samples = jnp.minimum(jnp.searchsorted(jnp.cumsum(q), uniform), K - 1)
        measured = float(jnp.mean(pl.kl_estimate(logq[samples], logp[samples], "k1")))
        assert measured == pytest.approx(closed, rel=0.05), (n, measured, closed)


# ---------------------------------------------------------------------------- advantages


def test_gae_matches_rlax():
    rlax = pytest.importorskip("rlax")
    g = _rng(7)
    B, T = 5, 9
    rewards = g.normal(size=(B, T)).astype(np.float32)
    values = g.normal(size=(B, T + 1)).astype(np.float32)
    discounts = g.uniform(0, 1, size=(B, T)).astype(np.float32)
    ones = np.ones((B, T), np.float32)
    reference = jax.vmap(rlax.truncated_generalized_advantage_estimation,
                         in_axes=(0, 0, None, 0))
    for lam in (0.0, 0.5, 0.95, 1.0):
        for gamma in (1.0, 0.9, discounts):
            disc = np.broadcast_to(np.float32(gamma), (B, T))
            adv, ret = pl.gae(rewards, values[:, :T], ones, gamma, lam, values[:, T])
            expected = reference(rewards, disc, lam, values)
            np.testing.assert_allclose(adv, expected, atol=1e-6)
            np.testing.assert_allclose(ret, expected + values[:, :T], atol=1e-6)
    # padded rows: each episode ends at its last real token (next value 0), the padding is 0
    lengths = np.array([9, 1, 4, 6, 2])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv, _ = pl.gae(rewards, values[:, :T], mask, 0.99, 0.95)
    for b, n in enumerate(lengths):
        expected = rlax.truncated_generalized_advantage_estimation(
            rewards[b, :n], np.full(n, 0.99, np.float32), 0.95,
            np.concatenate([values[b, :n], [0.0]]).astype(np.float32))
        np.testing.assert_allclose(adv[b, :n], expected, atol=1e-6)
        assert np.all(np.asarray(adv[b, n:]) == 0)


def test_whiten_masked():
    g = _rng(8)
    x = g.normal(3.0, 2.0, size=(4, 10)).astype(np.float32)
    mask = (np.arange(10)[None] < np.array([[10], [3], [7], [1]])).astype(np.float32)
    w = np.asarray(pl.whiten(x, mask))
    real = w[mask > 0]
    assert abs(real.mean()) < 1e-5 and real.std(ddof=1) == pytest.approx(1.0, abs=1e-5)
    assert np.all(w[mask == 0] == 0)
    kept = np.asarray(pl.whiten(x, mask, shift_mean=False))[mask > 0]
    assert kept.mean() == pytest.approx(x[mask > 0].mean(), rel=1e-5)


def test_grpo_advantages_match_trl():
    from trl.trainer.utils import nanstd
    g = _rng(9)
    G = 8
    rewards = g.normal(size=4 * G).astype(np.float32)
    rewards[G:2 * G] = 1.0  # a group with one reward: std 0, advantages 0
    rewards[2 * G:3 * G] = g.integers(0, 2, size=G)  # 0/1 rewards, as a verifier gives
    # TRL 1.16 grpo_trainer.py, _generate_and_score_completions (scale_rewards="group"),
    # lines 2764-2787: mean and Bessel-corrected std per group, eps 1e-4
    r = torch.tensor(rewards)
    mean_grouped = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std_grouped = nanstd(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    expected = (r - mean_grouped) / (std_grouped + 1e-4)
    np.testing.assert_allclose(pl.grpo_advantages(rewards, G), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(pl.grpo_advantages(rewards, G, scale=False),
                               (r - mean_grouped).numpy(), atol=1e-6)
    with pytest.raises(ConfigError, match="group_size=1"):
        pl.grpo_advantages(rewards, 1)
    with pytest.raises(ConfigError, match="multiple of the group size"):
        pl.grpo_advantages(rewards[:-1], G)


# ------------------------------------------------------------------------------------- PPO


def _random_tokens(seed, B=4, T=6):
    g = _rng(seed)
    mask = (np.arange(T)[None] < g.integers(1, T + 1, size=(B, 1))).astype(np.float32)
    draw = lambda scale: (g.normal(size=(B, T)) * scale).astype(np.float32)  # noqa: E731
    return g, mask, draw


def test_ppo_losses_match_trl_ppo_trainer():
    """TRL's last PPOTrainer (v0.2x, trl/trainer/ppo_trainer.py, train()): its loss lines."""
    _, mask, draw = _random_tokens(10)
    new, old, adv = draw(0.3) - 1, draw(0.3) - 1, draw(1.0)
    vnew, vold, ret = draw(1.0), draw(1.0), draw(1.0)
    t = {k: torch.tensor(v) for k, v in dict(new=new, old=old, adv=adv, vnew=vnew, vold=vold,
                                             ret=ret).items()}
    valid = torch.tensor(mask) > 0
    masked_mean = lambda x: (x * valid).sum() / valid.sum()  # noqa: E731  (TRL's masked_mean)
    ratio = torch.exp(t["new"] - t["old"])
    pg_losses = -t["adv"] * ratio
    pg_losses2 = -t["adv"] * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2))
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float())
    vclipped = torch.clamp(t["vnew"], t["vold"] - 0.2, t["vold"] + 0.2)
    vf1, vf2 = torch.square(t["vnew"] - t["ret"]), torch.square(vclipped - t["ret"])
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2))
    vf_clipfrac = masked_mean((vf2 > vf1).float())

    policy = pl.ppo_policy_loss(new, old, adv, mask, 0.2)
    value = pl.ppo_value_loss(vnew, vold, ret, mask, 0.2)
    assert _mean(policy) == pytest.approx(float(pg_loss), rel=1e-5)
    assert float(policy.extra["clip_fraction"] / policy.weight) == pytest.approx(
        float(pg_clipfrac))
    assert 0 < float(pg_clipfrac) < 1
    assert _mean(value) == pytest.approx(float(vf_loss), rel=1e-5)
    assert float(value.extra["value_clip_fraction"] / value.weight) == pytest.approx(
        float(vf_clipfrac))
    # first epoch on a fresh rollout: ratio 1, nothing clipped, the gradient is -A grad logp
    first = pl.ppo_policy_loss(old, old, adv, mask, 0.2)
    assert float(first.extra["clip_fraction"]) == 0.0
    assert float(first.extra["ratio"]) == pytest.approx(float(mask.sum()))
    assert float(first.extra["approx_kl"]) == 0.0
    grad = jax.grad(lambda lp: pl.ppo_policy_loss(lp, old, adv, mask, 0.2).loss)(old)
    np.testing.assert_allclose(grad, -adv * mask, atol=1e-6)


def test_ppo_rewards_put_the_score_on_the_last_real_token():
    g, mask, draw = _random_tokens(11)
    mask[1] = mask[1][::-1]  # a left-padded row
    kl, score = draw(0.1), g.normal(size=4).astype(np.float32)
    rewards = np.asarray(pl.ppo_rewards(score, kl, mask, 0.05))
    expected = -0.05 * kl * mask
    for b in range(4):
        expected[b, np.nonzero(mask[b])[0][-1]] += score[b]
    np.testing.assert_allclose(rewards, expected, atol=1e-6)


def test_adaptive_kl_controller_matches_trl():
    # TRL's AdaptiveKLController.update (trl/trainer/utils.py up to v0.2x), copied:
    #   proportional_error = np.clip(current / target - 1, -0.2, 0.2)
    #   mult = 1 + proportional_error * n_steps / self.horizon;  self.value *= mult
    controller = pl.AdaptiveKLController(target=6.0, horizon=10_000)
    ours = expected = 0.2
    for current in (0.5, 3.0, 5.9, 6.0, 6.5, 9.0, 40.0):
        expected *= 1 + np.clip(current / 6.0 - 1, -0.2, 0.2) * 512 / 10_000
        ours = controller.update(ours, current, 512)
        assert float(ours) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="target"):
        pl.AdaptiveKLController(target=0.0)


# ------------------------------------------------------------------------------------ GRPO


def _trl_grpo(loss_type, beta, correction, new, old, ref, adv, mask, clip):
    from trl.trainer.grpo_trainer import GRPOTrainer
    B, T = new.shape
    trainer = _stand_in_trainer(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, args=types.SimpleNamespace(use_bias_correction_kl=correction, delta=None),
        loss_type=loss_type, epsilon_low=clip, epsilon_high=clip, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=T, _entropy_bonus_enabled=False)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (
        torch.tensor(new), torch.zeros(B, T), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long),
              "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long),
              "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref)}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return float(loss), {k: v[0] for k, v in trainer._metrics["train"].items()}


def test_grpo_loss_matches_trl():
    g, mask, draw = _random_tokens(12, B=6, T=7)
    new, old, ref = draw(0.3) - 1, draw(0.3) - 1, draw(0.3) - 1
    adv = g.normal(size=6).astype(np.float32)
    for aggregation, loss_type in pl.AGGREGATIONS.items():
        for beta, correction in ((0.0, True), (0.04, True), (0.04, False)):
            expected, metrics = _trl_grpo(loss_type, beta, correction, new, old, ref, adv, mask,
                                          0.2)
            ours = pl.grpo_loss(new, old, ref, adv, mask, 0.2, beta, aggregation, correction)
            assert _mean(ours) == pytest.approx(expected, rel=1e-5, abs=1e-7), (aggregation, beta)
            assert _mean(pl.grpo_loss(new, old, ref, adv, mask, 0.2, beta, loss_type,
                                      correction)) == _mean(ours)
            if aggregation == "token_mean":  # TRL's metrics are token means
                clipped = float(ours.extra["clip_fraction"] / ours.weight)
                assert clipped == pytest.approx(metrics["clip_ratio/region_mean"], rel=1e-6)
                assert 0 < clipped < 1
                if beta:
                    assert float(ours.extra["kl"] / ours.weight) == pytest.approx(
                        metrics["kl"], rel=1e-5)
    first = pl.grpo_loss(old, old, ref, adv, mask, 0.2, 0.04)
    assert float(first.extra["ratio"] / first.weight) == pytest.approx(1.0)
    assert float(first.extra["clip_fraction"]) == 0.0
    with pytest.raises(ConfigError, match="aggregation"):
        pl.grpo_loss(new, old, ref, adv, mask, aggregation="dapo")
    with pytest.raises(ConfigError, match="reference"):
        pl.grpo_loss(new, old, None, adv, mask, beta=0.1)
