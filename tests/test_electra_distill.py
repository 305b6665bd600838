"""ELECTRA (replaced-token detection) and DistilBERT (distillation) on the shared engine."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET, REPO, train_losses
from core.config import ConfigError, load_config
from core.engine import Engine
from lm import pipeline
from lm.objectives import distillation as distill, electra
from lm.models import transformer as model_lib
from lm.objectives import registry

CONFIGS = REPO / "experiments/configs/lm"
FEW_STEPS = [*QUIET, "--config.train.steps=30", "--config.train.checkpoint_every=100"]


def _train(spec, workdir, *overrides):
    from core import trainer
    config = load_config(str(CONFIGS / spec), [*FEW_STEPS, *overrides])
    setup = pipeline.build(config, workdir)
    trainer.train(config, workdir, setup.task, setup.data)
    return config, setup


def _falls(losses, by):
    early = np.mean([losses[s] for s in range(1, 6)])
    late = np.mean([losses[s] for s in range(26, 31)])
    assert late < early - by, (early, late)


# ---------------------------------------------------------------------------------- ELECTRA

def test_labels_are_token_differs_and_only_masked_positions_change():
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    chosen = jnp.array([[False, True, True, False, True, False]])
    sampled = jnp.array([[1, 6, 3, 4, 9, 2]])  # position 1 and 4 sample the original
    inputs, replaced = electra.replace_masked(tokens, chosen, sampled)
    np.testing.assert_array_equal(inputs, [[5, 6, 3, 8, 9, 10]])
    np.testing.assert_array_equal(replaced, [[False, False, True, False, False, False]])


def _tiny_electra(**kwargs):
    cfg = model_lib.preset("tiny-bert", vocab_size=128, max_len=16)
    return electra.ElectraTask(cfg, 16, mask_id=100, **kwargs)


def _batch(rng, batch=4, length=17, vocab=100):
    tokens = jax.random.randint(rng, (batch, length), 0, vocab)
    segments = jnp.ones_like(tokens).at[0, 10:].set(0).at[1, 8:].set(2)
    return {"tokens": tokens, "segment_ids": segments}


def test_generator_shares_embeddings_and_gets_no_gradient_from_the_discriminator():
    task = _tiny_electra()
    assert task.generator_cfg.d_model == 16 and task.generator_cfg.embed_dim == 64
    import flax.linen as nn
    params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    assert "token_embed" not in params["generator"]
    batch, rng = _batch(jax.random.key(1)), jax.random.key(2)

    def parts(p):  # [discriminator's weighted loss, generator's MLM loss]
        sums = task.loss(p, batch, rng, train=True)
        gen = sums.extra["generator_loss"]
        return jnp.stack([sums.loss - gen, gen])

    grads = jax.jit(jax.jacrev(parts))(params)
    disc_grads, gen_grads = (jax.tree.map(lambda g: g[i], grads) for i in (0, 1))
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))
    assert norm(disc_grads["generator"]) == 0.0
    assert norm(disc_grads["discriminator"]) > 0 and norm(disc_grads["discriminator_head"]) > 0
    assert norm(gen_grads["generator"]) > 0
    assert norm(gen_grads["discriminator"]["token_embed"]) > 0  # the shared table
    sums = jax.jit(lambda p: task.loss(p, batch, rng, train=False))(params)
    real = float(jnp.sum(batch["segment_ids"][:, :16] > 0))
    # Only masked tokens can be replaced: the replaced tokens are at most the masked ones.
    replaced = float(sums.extra["replaced_fraction"]) * real / float(sums.weight)
    assert 0 < replaced <= float(sums.weight)


def test_electra_loss_falls_on_the_tiny_config(tmp_path):
    config, setup = _train("electra.py:size=tiny,corpus=austen", tmp_path)
    assert isinstance(setup.task, electra.ElectraTask)
    losses = train_losses(tmp_path)
    _falls(losses, 1.0)


def test_bad_electra_ratio_is_a_clear_error():
    with pytest.raises(ConfigError, match="generator_width_ratio"):
        _tiny_electra(generator_width_ratio=0.55)
    with pytest.raises(ConfigError, match="generator_width_ratio"):
        _tiny_electra(generator_width_ratio=1.5)


# ------------------------------------------------------------------------------- DistilBERT

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    # Learned positions, so that the student is checked to copy the position table too.
    _train("bert.py:size=tiny,corpus=austen,positions=learned", workdir, "--config.train.steps=20")
    return workdir


def test_soft_target_loss_matches_numpy():
    rng = np.random.default_rng(0)
    student, teacher_logits = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7)) * 3
    T = 2.5
    p = np.exp(teacher_logits / T)
    p /= p.sum(-1, keepdims=True)
    s = student / T
    log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
    want = -T ** 2 * (p * log_q).sum(-1)
    got = distill.soft_cross_entropy(jnp.asarray(student), jnp.asarray(teacher_logits), T)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_head_logits_are_the_models_logits():
    import flax.linen as nn
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
    for cfg in (model_lib.preset("tiny-llama"),  # untied output layer
                model_lib.preset("tiny-bert", embed_dim=32)):  # tied, factorised
        model = model_lib.Transformer(cfg)
        params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])

        @jax.jit
        def both(p):
            hidden = model.apply({"params": p}, tokens, return_hidden=True)
            return distill.head_logits(cfg, p, hidden), model.apply({"params": p}, tokens)
        np.testing.assert_allclose(*both(params), rtol=1e-5, atol=1e-5)


def test_student_starts_from_the_chosen_teacher_layers(teacher, tmp_path):
    _, weights, _ = distill.load_teacher(str(teacher))
    spec = f"distill.py:teacher={teacher},size=tiny"
    config = load_config(str(CONFIGS / spec), FEW_STEPS)
    assert config.model.num_layers == 1 and config.data.tokenizer.path.startswith(str(teacher))
    assert registry.make_task(config, config_vocab(teacher)).teacher_layers == (0,)  # one in two
    config = load_config(str(CONFIGS / spec), [*FEW_STEPS, "--config.distill.teacher_layers=1"])
    task = registry.make_task(config, config_vocab(teacher))
    student = jax.device_get(Engine(config, task).init_state().params)
    jax.tree.map(np.testing.assert_array_equal, student["layers"],
                 jax.tree.map(lambda x: x[1:2], weights["layers"]))
    for name in ("token_embed", "pos_embed", "embed_norm"):
        jax.tree.map(np.testing.assert_array_equal, student[name], weights[name])


def test_distillation_loss_falls_and_the_teacher_never_moves(teacher, tmp_path):
    _, before, _ = distill.load_teacher(str(teacher))
    # From random weights (the paper's ablation): a 20-step teacher is too close to uniform for
    # a student that starts as the teacher to have much left to learn in 30 steps.
    _, setup = _train(f"distill.py:teacher={teacher},size=tiny", tmp_path,
                      "--config.distill.init=scratch")
    jax.tree.map(np.testing.assert_array_equal, setup.task.teacher_params, before)
    _, after, _ = distill.load_teacher(str(teacher))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    _falls(train_losses(tmp_path), 1.0)


def test_missing_or_wrong_teacher_is_a_clear_error(teacher, tmp_path):
    with pytest.raises(ConfigError, match="teacher=WORKDIR"):
        load_config(str(CONFIGS / "distill.py:size=tiny"))
    with pytest.raises(ConfigError, match="train the teacher first"):
        load_config(str(CONFIGS / f"distill.py:teacher={tmp_path / 'nowhere'}"))
    config = load_config(str(CONFIGS / f"distill.py:teacher={teacher},size=tiny"),
                         [f"--config.distill.teacher={tmp_path / 'gone'}"])
    with pytest.raises(ConfigError, match="train a teacher first"):
        registry.make_task(config, 512)
    config = load_config(str(CONFIGS / f"distill.py:teacher={teacher},size=tiny"),
                         ["--config.distill.teacher_layers=0,1"])
    with pytest.raises(ConfigError, match="model.num_layers"):
        registry.make_task(config, config_vocab(teacher))


def config_vocab(workdir):
    from lm.data.tokenizer import Tokenizer
    return Tokenizer.load(workdir / "tokenizer.model").vocab_size


def test_config_student_is_the_teachers_architecture(teacher):
    config = load_config(str(CONFIGS / f"distill.py:teacher={teacher},size=tiny"))
    task = registry.make_task(config, config_vocab(teacher))
    assert dataclasses.replace(task.teacher_cfg, num_layers=1) == task.model_cfg
