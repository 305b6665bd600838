"""The feedback objectives on the engine (reward, dpo, ppo, grpo): step-0 identities of the real
tasks, pairs and rollouts as rows, the RLHF loop (a reward run scoring PPO's and GRPO's
rollouts), and a 2x2x2 mesh equal to one device. (The losses against TRL, rlax and the bandit
optimum: tests/test_policy_losses.py, tests/test_policy_bandit.py; DPO against TRL's
DPOTrainer: tests/test_dpo_trl.py; SIGKILL and resume of an RL run: tests/test_resume.py.)"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_chat_files, tiny_pairs_file, train_losses
from core import trainer
from core.config import ConfigError, DataError, load_config
from core.engine import restore_state
from lm.data import chat, preferences
from lm.models import transformer as model_lib
from lm.objectives import online_rl, policy_model, preference

ROW = 40


def _rows(seed: int, batch: int, prompt: int = 12):
    """Random rows: a prompt of `prompt` tokens, a completion of 6..ROW-prompt, then padding."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 60, prompt)) for _ in range(batch)]
    replies = [list(rng.integers(3, 60, rng.integers(6, ROW - prompt))) for _ in range(batch)]
    return policy_model.rows(prompts, replies, ROW, 0)


def _settings(**kw):
    import ml_collections
    return ml_collections.ConfigDict(kw)


@pytest.fixture(scope="module")
def tiny_cfg():
    return model_lib.preset("tiny-llama", vocab_size=64, max_len=ROW)


def _params(task):
    return nn.unbox(task.init_params(jax.random.key(0)))


def test_dpo_at_step_zero_is_log_2_with_zero_rewards(tiny_cfg):
    task = preference.DPOTask(tiny_cfg, ROW, beta=0.1)
    params = _params(task)
    rows = _rows(0, 8)
    pairs = {k: np.stack([rows[k][:4], rows[k][4:]], axis=1) for k in rows}
    sums = task.loss(policy_model.WithReference(params, params), pairs, None, train=False)
    assert float(sums.weight) == 4
    assert np.float32(sums.loss / sums.weight) == np.float32(math.log(2))
    assert float(sums.extra["rewards_chosen"]) == 0 == float(sums.extra["rewards_rejected"])
    # A policy that moved: no longer log 2, and the rewards are beta * (log pi - log ref).
    moved = jax.tree_util.tree_map(lambda x: x * 1.05, params)
    sums = task.loss(policy_model.WithReference(moved, params), pairs, None, train=False)
    logp, _ = task.sequence_logprobs(moved, pairs)
    ref, _ = task.sequence_logprobs(params, pairs)
    np.testing.assert_allclose(float(sums.extra["rewards_chosen"]),
                               0.1 * float(jnp.sum((logp - ref)[:4])), rtol=1e-5)
    assert abs(float(sums.loss / sums.weight) - math.log(2)) > 1e-4


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_first_update_has_ratio_one_and_nothing_clipped(algorithm, tiny_cfg):
    """prepare_batch's old log-probs are the loss's own at the parameters they came from."""
    settings = _settings(group_size=4, epochs=2, minibatches=1, clip=0.2,
                         aggregation="sequence_mean", scale_rewards=True, gamma=1.0, lam=0.95,
                         value_clip=0.2, vf_coef=0.1, kl_estimator="k1", kl_target=0.0,
                         kl_horizon=1e4)
    task = online_rl.OnlineRLTask(tiny_cfg, ROW, algorithm=algorithm, settings=settings,
                                  beta=0.05, temperature=0.7)
    params = _params(task)
    state = task.init_model_state(None)
    batch = {**_rows(1, 8), "score": np.linspace(0, 1, 8).astype(np.float32)}
    both = policy_model.WithReference(params, params)
    prepared, metrics, state = task.prepare_batch(both, batch, None, state)
    assert float(metrics["kl"]) == 0  # policy == reference
    sums, _ = task.loss(both, prepared, jax.random.key(0), train=True, model_state=state)
    assert float(sums.extra["clip_fraction"]) == 0
    np.testing.assert_allclose(float(sums.extra["ratio"] / sums.weight), 1.0, rtol=1e-6)
    if algorithm == "grpo":
        np.testing.assert_allclose(np.asarray(prepared["advantages"]).reshape(2, 4).mean(1), 0,
                                   atol=1e-6)


def test_reward_is_read_at_the_last_real_token(tiny_cfg):
    """Padding after a row changes nothing: the index comes from the length."""
    task = preference.RewardTask(tiny_cfg, ROW)
    params = _params(task)
    params["reward_head"] = {"kernel": jnp.linspace(-1, 1, tiny_cfg.d_model), "bias": jnp.ones(())}
    rows = _rows(2, 4)
    scores = task.score(params, rows)
    for b in range(4):
        n = int(rows["segment_ids"][b].sum())
        alone = {k: v[b:b + 1, :n] for k, v in rows.items()}
        short = policy_model.PolicyTask(tiny_cfg, n, heads=("reward",))
        np.testing.assert_allclose(float(short.score(params, alone)[0]), float(scores[b]),
                                   rtol=1e-5)


def test_pair_rows_train_the_last_reply_through_its_end_of_turn(tmp_path):
    tokenizer_path, _ = tiny_chat_files(tmp_path)
    from lm.data.tokenizer import Tokenizer
    tokenizer = chat.ChatTokenizer(Tokenizer.load(tokenizer_path))
    template = chat.ChatTemplate()
    pairs = preferences.load(tiny_pairs_file(tmp_path / "pairs.jsonl", 4))
    rows = preference.pair_rows(pairs, template, tokenizer, 160).fields
    end_id = tokenizer.encode([template.end_of_turn])[0][-1]
    for n, pair in enumerate(pairs):
        for side, reply in enumerate((pair.chosen, pair.rejected)):
            tokens = rows["tokens"][n, side]
            trained = tokens[rows["completion_mask"][n, side] > 0]
            assert trained[-1] == end_id  # the reply's end-of-turn is trained and ends the row
            assert tokenizer.decode(list(trained[:-1]), skip_special=True) == reply
            assert rows["segment_ids"][n, side].sum() == np.nonzero(tokens == end_id)[0][-1] + 1
    with pytest.raises(DataError, match="exceed the row"):
        preference.pair_rows(pairs, template, tokenizer, 40)


def test_bad_pairs_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", '
                   '"rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        preferences.load(bad)
    with pytest.raises(DataError, match="no such file"):
        preferences.load(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------ on the engine


@pytest.fixture(scope="module")
def tiny_feedback(tmp_path_factory):
    """A tokenizer, pairs, and a reward run trained on them (the RLHF loop's scorer)."""
    root = tmp_path_factory.mktemp("feedback")
    tokenizer, _ = tiny_chat_files(root)
    pairs = tiny_pairs_file(root / "pairs.jsonl")
    spec = (f"experiments/configs/lm/feedback.py:model=,size=tiny,tokenizer={tokenizer},"
            f"pairs={pairs},prompts=16,eval_prompts=4,new_tokens=48,batch=8,lr=3e-3")
    config = load_config(spec, ["task=reward", "train.steps=6", "train.async_checkpoint=false"])
    setup = preference.build_setup(config, root / "reward")
    final = trainer.train(config, root / "reward", setup.task, setup.data)
    assert final["eval_accuracy"] > 0.5  # the wrong final letter is learnable
    return spec, root / "reward"


def test_bad_feedback_settings_fail_before_any_work(tiny_feedback, tmp_path):
    spec, reward_run = tiny_feedback
    for overrides, message in ((["task=ppo", "lora.rank=4"], "value head"),
                               (["task=grpo", "grpo.group_size=3"], "multiple of"),
                               (["task=reward", "lora.rank=4"], "head whole"),
                               (["task=grpo", f"feedback.reward_model={tmp_path}"],
                                "not a run directory|config.json"),
                               (["task=grpo", "feedback.tasks=spelling"], "spelling"),
                               (["task=dpo", "feedback.beta=0"], "beta > 0"),
                               (["task=dpo", "dpo.kind=ipo2"], "did you mean 'ipo'"),
                               (["task=grpo", "grpo.aggregation=mean"], "grpo.aggregation")):
        config = load_config(spec, overrides)
        with pytest.raises(ConfigError, match=message):
            (online_rl if config.task in ("ppo", "grpo") else preference).build_setup(
                config, tmp_path)


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "ppo"])
def test_feedback_step_on_a_2x2x2_mesh_equals_one_device(algorithm, tiny_feedback, tmp_path):
    """Three steps: DPO on the pairs; GRPO and PPO on rollouts scored by the reward run (so the
    rewards vary), PPO with 2 epochs of 2 minibatches per rollout. SGD, so that the updates are
    linear in the gradients (Adam's m / sqrt(v) turns a rounding difference in a near-zero
    gradient into a whole step)."""
    spec, reward_run = tiny_feedback
    common = [f"task={algorithm}", "train.steps=3", "train.async_checkpoint=false",
              f"feedback.reward_model={reward_run}", "ppo.epochs=2", "ppo.minibatches=2",
              "optim.name=sgd", "optim.learning_rate=0.3", "optim.clip_norm=0"]
    updates = {}
    for name, mesh in (("one", ["mesh.num_devices=1", "mesh.ici.data=1"]),
                       ("mesh", ["mesh.ici.data=2", "mesh.ici.fsdp=2", "mesh.ici.tensor=2"])):
        config = load_config(spec, [*common, *mesh])
        module = preference if algorithm == "dpo" else online_rl
        setup = module.build_setup(config, tmp_path / name)
        final = trainer.train(config, tmp_path / name, setup.task, setup.data)
        if algorithm != "dpo":
            assert final["reward"] != 0 and final["kl"] != 0  # moving, with varied rewards
        engine, state, _ = restore_state(config, setup.task, tmp_path / name)
        updates[name] = jax.tree_util.tree_map(np.subtract, jax.device_get(state.params),
                                               jax.device_get(engine.init_state().params))
    one, mesh = train_losses(tmp_path / "one"), train_losses(tmp_path / "mesh")
    np.testing.assert_allclose([mesh[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                               rtol=2e-4, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(updates["mesh"]),
                            jax.tree_util.tree_leaves(updates["one"])):
        assert np.abs(b).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max(),
                                   err_msg=jax.tree_util.keystr(path))


def test_export_writes_the_policy_alone_with_our_chat_tokenizer(tiny_feedback, tmp_path):
    """A PPO run's export is its policy (no reference, no value head), which transformers reads
    as we compute it; a reward run refuses export (it is a scorer, not a causal LM)."""
    import argparse

    import torch
    import transformers
    from lm import commands
    spec, reward_run = tiny_feedback
    config = load_config(spec, ["task=ppo", "train.steps=2", "train.async_checkpoint=false",
                                f"feedback.reward_model={reward_run}",
                                "mesh.num_devices=1", "mesh.ici.data=1"])
    setup = online_rl.build_setup(config, tmp_path / "ppo")
    trainer.train(config, tmp_path / "ppo", setup.task, setup.data)
    written = commands.export(config, argparse.Namespace(workdir=str(tmp_path / "ppo"),
                                                         out=str(tmp_path / "out")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    engine, state, _ = restore_state(config, setup.task, tmp_path / "ppo")
    assert "value_head" in state.params and np.abs(state.params["value_head"]["kernel"]).max() > 0
    tokens = np.random.default_rng(3).integers(0, setup.task.model_cfg.vocab_size, (2, 12))
    ours = np.asarray(setup.task.model.apply({"params": jax.device_get(state.params)},
                                             jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    with pytest.raises(ConfigError, match="scorer"):
        commands.export(load_config(spec, ["task=reward"]),
                        argparse.Namespace(workdir=str(reward_run), out=str(tmp_path / "rm")))


@pytest.mark.parametrize("base_format", ["", "nf4_dq"], ids=["lora", "qlora"])
def test_grpo_through_lora_reads_its_base_as_the_reference(base_format, tiny_feedback, tmp_path):
    """The reference of a LoRA run is its base with the adapters off: no frozen copy, and at
    step 1 (B = 0) the policy is the base exactly, so the measured KL is 0."""
    from core.metrics import read_jsonl
    spec, reward_run = tiny_feedback
    config = load_config(spec, ["task=grpo", "train.steps=3", "train.async_checkpoint=false",
                                f"feedback.reward_model={reward_run}", "lora.rank=4",
                                f"lora.base_format={base_format}", "optim.learning_rate=3e-2"])
    setup = online_rl.build_setup(config, tmp_path)
    trainer.train(config, tmp_path, setup.task, setup.data)
    kl = {r["step"]: r["kl"] for r in read_jsonl(tmp_path / "metrics.jsonl")
          if r["split"] == "train"}
    assert kl[1] == 0 and kl[3] != 0
    state = restore_state(config, setup.task, tmp_path)[1]
    assert set(state.params) == {"layers"}  # adapters only: A and B of the adapted kernels


def test_rollouts_draw_only_the_prompts_that_fit(tiny_feedback, tmp_path):
    """feedback.drop_long_prompts: the prompts over the limit are dropped before the prompt order
    is made, so an epoch of rollouts visits only those kept (it once indexed past them)."""
    from lm.objectives import feedback
    spec, reward_run = tiny_feedback
    common = ["task=grpo", "train.steps=5", "train.async_checkpoint=false",
              f"feedback.reward_model={reward_run}", "feedback.drop_long_prompts=true"]
    setup = online_rl.build_setup(load_config(spec, common), tmp_path / "probe", need_train=False)
    items = feedback.training_prompts(load_config(spec, common))
    lengths = sorted(len(ids) for ids in setup.sampler.encode([i for _, i in items])[1])
    limit = lengths[len(lengths) // 2]
    config = load_config(spec, [*common, f"feedback.max_prompt_tokens={limit}"])
    setup = online_rl.build_setup(config, tmp_path / "run")
    kept = len(setup.data.train.items)
    assert 0 < kept < len(items)
    trainer.train(config, tmp_path / "run", setup.task, setup.data)  # 5 steps: past one epoch
    assert setup.data.train.order.step == 5
