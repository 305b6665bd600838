"""The bandit optimum: one prompt, 16 single-token answers with known rewards, a random
reference. DPO (on Bradley-Terry-labelled pairs), PPO with a KL penalty and GRPO with a KL term,
all built from lm/objectives/policy_losses.py, must each converge to the closed form
pi_ref exp(r / beta) / Z (the DPO paper's Eq. 4)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.objectives import policy_losses as pl


def _rng(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------ the bandit optimum
# One prompt, K answers of known reward, a random reference. Every objective is taken in exact
# expectation over the K answers (a per-answer weight = its probability), so the runs are
# deterministic and their fixed points are those of the expected gradients.

K, BETA = 16, 0.25
TV_TOLERANCE = 1e-3  # the issue asks < 0.02; exact expectations get within 3e-5 (PPO) or 1e-6


@pytest.fixture(scope="module")
def bandit():
    g = _rng(13)
    rewards = jnp.asarray(g.uniform(0, 1, size=K), jnp.float32)
    log_ref = jax.nn.log_softmax(jnp.asarray(g.normal(size=K), jnp.float32))
    return rewards, log_ref


def _optimum(rewards, log_ref, beta):
    """The DPO paper's Eq. 4: pi_ref exp(r / beta) / Z."""
    return jax.nn.softmax(log_ref + rewards / beta)


def _tv(p, q):
    return 0.5 * float(jnp.sum(jnp.abs(p - q)))


def _mean_j(sums):
    return sums.loss / sums.weight


def _train(loss_fn, params, rollouts, epochs=1, lr=0.05):
    """Adam with a cosine-decayed rate; each rollout freezes the parameters (the old policy and
    value) and takes `epochs` steps on loss_fn(params, old_params)."""
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, rollouts * epochs, alpha=0.01))

    def epoch(carry, _, old):
        params, opt = carry
        grads = jax.grad(loss_fn)(params, old)
        updates, opt = optimizer.update(grads, opt)
        return (optax.apply_updates(params, updates), opt), None

    def rollout(carry, _):
        old = jax.lax.stop_gradient(carry[0])
        carry, _ = jax.lax.scan(lambda c, x: epoch(c, x, old), carry, None, length=epochs)
        return carry, None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(rollout, (p, optimizer.init(p)), None,
                                                    length=rollouts))(params)
    return jax.nn.softmax(params["logits"])


def test_bandit_dpo_reaches_the_kl_regularised_optimum(bandit):
    """DPO on Bradley-Terry labels p(a > b) = sigmoid(r_a - r_b), all ordered pairs weighed by
    their label probability: the minimiser has beta (h_a - h_b) = r_a - r_b, h = log pi / ref."""
    rewards, log_ref = bandit
    a, b = np.nonzero(~np.eye(K, dtype=bool))
    p_ab = jax.nn.sigmoid(rewards[a] - rewards[b])

    def loss(params, _):
        logp = jax.nn.log_softmax(params["logits"])
        loss_B, _ = pl.dpo_loss(logp[a], logp[b], log_ref[a], log_ref[b], BETA)
        return jnp.sum(p_ab * loss_B) / len(a)

    target = _optimum(rewards, log_ref, BETA)
    assert _tv(jnp.exp(log_ref), target) > 0.3
    pi = _train(loss, {"logits": log_ref}, rollouts=1500)
    assert _tv(pi, target) < TV_TOLERANCE, _tv(pi, target)


def test_bandit_ppo_reaches_the_kl_regularised_optimum(bandit):
    """PPO with the per-token k1 penalty in the reward (single-token episodes), a learnt value,
    GAE, whitened advantages, 4 clipped epochs per rollout. The fixed point: the policy gradient
    vanishes when r_a - beta log(pi_a / ref_a) is the same for every answer, i.e. Eq. 4."""
    rewards, log_ref = bandit
    ones = jnp.ones((K, 1))

    def loss(params, old):
        old_logp = jax.nn.log_softmax(old["logits"])
        weight = 1000.0 * jnp.exp(old_logp)[:, None]  # the rollout, as answer counts
        kl = pl.kl_estimate(old_logp, log_ref, "k1")[:, None]
        token_rewards = pl.ppo_rewards(rewards, kl, ones, BETA)
        values_old = jnp.broadcast_to(old["value"], (K, 1))
        adv, returns = pl.gae(token_rewards, values_old, ones, 1.0, 0.95)
        adv = pl.whiten(adv, weight)
        logp = jax.nn.log_softmax(params["logits"])[:, None]
        policy = pl.ppo_policy_loss(logp, old_logp[:, None], adv, weight, 0.2)
        value = pl.ppo_value_loss(jnp.broadcast_to(params["value"], (K, 1)), values_old,
                                  returns, weight, 0.2)
        return _mean_j(policy) + 0.1 * _mean_j(value)

    target = _optimum(rewards, log_ref, BETA)
    pi = _train(loss, {"logits": log_ref, "value": jnp.zeros(())}, rollouts=1500, epochs=4,
                lr=0.02)
    assert _tv(pi, target) < TV_TOLERANCE, _tv(pi, target)


def _grpo_bandit(rewards, log_ref, scale, correction):
    def loss(params, old):
        old_logp = jax.nn.log_softmax(old["logits"])[:, None]
        adv = pl.grpo_advantages(rewards, K, scale=scale)  # the K answers as one group
        logp = jax.nn.log_softmax(params["logits"])[:, None]
        return _mean_j(pl.grpo_loss(logp, old_logp, log_ref[:, None], adv, jnp.exp(old_logp),
                                    0.2, BETA, "token_mean", correction))
    return _train(loss, {"logits": log_ref}, rollouts=1500, epochs=2)


def test_bandit_grpo_reaches_the_kl_regularised_optimum(bandit):
    """GRPO with k3 to the reference: unscaled advantages and the ratio-weighted k3 (TRL's
    default use_bias_correction_kl) reach Eq. 4. Each departure moves the optimum where the
    maths says: std scaling divides the rewards by the group's std (beta becomes beta * std;
    here the group is the K answers, a constant std), and the uncorrected k3 has the gradient
    of KL(ref || pi), whose optimum is beta pi_ref / (c - r) with c normalising."""
    rewards, log_ref = bandit
    target = _optimum(rewards, log_ref, BETA)
    pi = _grpo_bandit(rewards, log_ref, scale=False, correction=True)
    assert _tv(pi, target) < TV_TOLERANCE, _tv(pi, target)

    std = float(jnp.std(rewards, ddof=1)) + 1e-4
    scaled = _grpo_bandit(rewards, log_ref, scale=True, correction=True)
    assert _tv(scaled, _optimum(rewards, log_ref, BETA * std)) < TV_TOLERANCE
    assert _tv(scaled, target) > 0.1

    ref = np.exp(np.asarray(log_ref, np.float64))
    r = np.asarray(rewards, np.float64)
    lo, hi = r.max(), r.max() + BETA * 2
    for _ in range(200):  # sum_k beta ref_k / (c - r_k) = 1, decreasing in c > max r
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.sum(BETA * ref / (c - r)) > 1 else (lo, c)
    forward = jnp.asarray(BETA * ref / (c - r), jnp.float32)
    uncorrected = _grpo_bandit(rewards, log_ref, scale=False, correction=False)
    assert _tv(uncorrected, forward) < TV_TOLERANCE
    assert _tv(uncorrected, target) > 0.05
