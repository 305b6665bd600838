"""AdamW's weight decay reaches weight matrices and embeddings only; parameter groups get their
own settings; the parameter EMA follows its formula, shards and checkpoints like the parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.optim import _decay_mask
from lm.models import transformer as model_lib


def test_decay_mask_spares_every_bias_and_norm():
    cfg = model_lib.preset("gpt2", vocab_size=64, num_layers=1, d_model=16, num_heads=2,
                           max_len=8)
    params = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8), "int32"))["params"]
    mask = {jax.tree_util.keystr(path): decays for path, decays in
            jax.tree_util.tree_leaves_with_path(_decay_mask(params))}
    spared = sorted(name for name, decays in mask.items() if not decays)
    decayed = sorted(name for name, decays in mask.items() if decays)
    assert any("b_q" in n for n in spared) and any("b_down" in n for n in spared)
    assert all("norm" in n or "'b_" in n for n in spared), spared
    assert all("'w_" in n or "embed" in n for n in decayed), decayed
    assert any("token_embed" in n for n in decayed) and any("w_up" in n for n in decayed)


# --- parameter groups and the parameter EMA ----------------------------------------------------

def _sgd(**overrides):
    """Plain SGD at a constant rate from step 1 (warmup 1 makes step 0's rate 0)."""
    from core.optim import optim_config
    settings = dict(name="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.0, clip_norm=0.0,
                    warmup_steps=1, min_lr_ratio=1.0)
    return optim_config(**{**settings, **overrides})


def _params():
    return {"generator": {"w": jnp.ones((3, 2))}, "discriminator": {"w": jnp.ones((4,))}}


def _grads(scale=1.0):
    return {"generator": {"w": jnp.full((3, 2), 2.0 * scale)},
            "discriminator": {"w": jnp.full((4,), -1.0 * scale)}}


def _step_updates(cfg, grads, steps=2):
    """Updates of the last of `steps` optimizer steps with the same gradients."""
    from core.optim import build_optimizer
    optimizer, _ = build_optimizer(cfg, 100)
    params = _params()
    state = optimizer.init(params)
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, params)
    return updates


def test_each_group_gets_its_own_learning_rate_and_the_rest_the_base_one():
    cfg = _sgd()
    cfg.groups = {"disc": {"match": "^discriminator/", "learning_rate": 0.4}}
    updates = _step_updates(cfg, _grads())
    np.testing.assert_allclose(updates["generator"]["w"], -0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["discriminator"]["w"], -0.4 * -1.0, rtol=1e-6)


def test_groups_with_the_base_settings_change_nothing():
    from core.optim import optim_config
    base = optim_config(learning_rate=1e-2, warmup_steps=1, clip_norm=0.0)
    grouped = optim_config(learning_rate=1e-2, warmup_steps=1, clip_norm=0.0)
    grouped.groups = {"gen": {"match": "^generator/"}, "disc": {"match": "^discriminator/"}}
    grads = _grads()
    for a, b in zip(jax.tree_util.tree_leaves(_step_updates(base, grads, 3)),
                    jax.tree_util.tree_leaves(_step_updates(grouped, grads, 3))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_groups_clipping_sees_only_its_own_gradients():
    cfg = _sgd(clip_norm=1.0)
    cfg.groups = {"gen": {"match": "^generator/"}, "disc": {"match": "^discriminator/",
                                                             "clip_norm": 0.0}}
    updates = _step_updates(cfg, _grads(scale=10.0))
    assert float(optax.global_norm(updates["generator"])) == pytest.approx(0.1, rel=1e-5)
    np.testing.assert_allclose(updates["discriminator"]["w"], 0.1 * 10.0, rtol=1e-6)


@pytest.mark.parametrize("group, message", [
    ({"gen": {"learning_rate": 1.0}}, "needs a 'match'"),
    ({"gen": {"match": "^generator/", "learnig_rate": 1.0}}, "learnig_rate is not a per-group"),
    ({"gen": {"match": "^generator/", "ema_decay": 0.9}}, "ema_decay is not a per-group"),
    ({"gen": {"match": "^genrator/"}}, r"\['gen'\] match no parameter"),
    ({"a": {"match": "w"}, "b": {"match": "generator"}}, "in optim groups"),
    ({"gen": {"match": "(("}}, "not a regular expression"),
])
def test_bad_groups_are_named(group, message):
    from core.config import ConfigError
    cfg = _sgd()
    cfg.groups = group
    with pytest.raises(ConfigError, match=message):
        _step_updates(cfg, _grads(), steps=1)


def test_ema_follows_the_parameters_with_a_warmed_up_decay():
    from core.optim import build_optimizer, ema_params
    optimizer, _ = build_optimizer(_sgd(ema_decay=0.5), 100)
    params = _params()
    state = optimizer.init(params)
    expected = jax.tree_util.tree_map(np.asarray, params)
    for n in range(4):
        updates, state = optimizer.update(_grads(), state, params)
        params = optax.apply_updates(params, updates)
        rate = min(0.5, (1 + n) / (10 + n))
        expected = jax.tree_util.tree_map(lambda e, p: rate * e + (1 - rate) * np.asarray(p),
                                          expected, params)
    for got, want in zip(jax.tree_util.tree_leaves(ema_params(state)),
                         jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert ema_params(build_optimizer(_sgd(), 100)[0].init(params)) is None


def test_without_groups_or_ema_the_optimizer_state_keeps_its_old_layout():
    """Checkpoints written before groups and EMA existed must still restore."""
    from core.optim import build_optimizer
    state = build_optimizer(_sgd(freeze="^generator/"), 100)[0].init(_params())
    assert len(state) == 4  # freeze, weight decay, sgd, freeze: no nesting


def test_groups_and_ema_shard_like_the_parameters_and_survive_a_checkpoint(tmp_path):
    """On a 2x2x2 mesh: the EMA and each group's moments carry their parameters' shardings,
    two engine steps leave the EMA the formula says, and a checkpoint restores it exactly."""
    from conftest import tiny_config
    from core.checkpoint import Checkpointer
    from core.engine import Engine
    from core.optim import ema_params
    from lm import pipeline
    config = tiny_config("--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2",
                         "--config.mesh.ici.tensor=2", "--config.optim.ema_decay=0.9")
    with config.unlocked():
        config.optim.groups = {"embeddings": {"match": "embed", "learning_rate": 3e-3}}
    setup = pipeline.build(config, tmp_path)
    engine = Engine(config, setup.task)
    state = engine.init_state()
    param_specs = [p.sharding.spec for p in jax.tree_util.tree_leaves(state.params)]
    assert [e.sharding.spec for e in jax.tree_util.tree_leaves(ema_params(state.opt_state))] \
        == param_specs
    step = engine.compiled_train_step()
    history = [jax.device_get(state.params)]
    for _ in range(2):
        with engine.scope():
            state, _ = step(state, engine.global_batch(next(setup.data.train)))
        history.append(jax.device_get(state.params))
    rate0, rate1 = 1 / 10, 2 / 11
    expected = jax.tree_util.tree_map(
        lambda p0, p1, p2: rate1 * (rate0 * p0 + (1 - rate0) * p1) + (1 - rate1) * p2, *history)
    ema = jax.device_get(ema_params(state.opt_state))
    for got, want in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpointer.save(2, engine.saved_state(state), {"step": 2})
    restored, _, _ = checkpointer.restore_latest_good(engine.saved_state(engine.abstract_state))
    checkpointer.close()
    for got, want in zip(jax.tree_util.tree_leaves(ema_params(restored["opt_state"])),
                         jax.tree_util.tree_leaves(ema)):
        np.testing.assert_array_equal(np.asarray(got), want)
