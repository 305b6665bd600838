"""The Gato-style generalist (multimodal/): tokenisation, sequences, model, experts."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET
from core.config import ConfigError, load_config
from core.engine import Engine
from multimodal import (data as gato_data, environments, evaluate, sequences,
                        setup as setup_lib, tokens)


def test_mu_law_is_the_papers_formula_and_round_trips_within_a_bin():
    # Reed et al. 2022, eq. in 2.1, written out by hand for a few values
    for x in (0.0, 0.5, -1.0, 3.0, 256.0):
        expected = math.copysign(math.log(abs(x) * 100 + 1) / math.log(256 * 100 + 1), x)
        assert tokens.mu_law(np.array(x)) == pytest.approx(expected, abs=1e-12)
    vocab = tokens.Vocabulary(text=300)
    x = np.random.default_rng(0).normal(0, 20, 5000)
    ids = vocab.continuous_ids(x)
    assert ids.min() >= 300 and ids.max() < 300 + 1024
    half_bin = 1.0 / 1024  # bins of width 2/1024 in the companded space
    assert np.abs(tokens.mu_law(vocab.continuous_values(ids)) - tokens.mu_law(x)).max() \
        <= half_bin + 1e-9
    assert np.all(vocab.continuous_ids(np.array([-1e9, 1e9])) == [300, 300 + 1023])  # clipped


def test_vocabulary_ranges_do_not_overlap():
    vocab = tokens.Vocabulary(text=300, bins=1024, discrete=16)
    actions = vocab.discrete_ids(np.arange(16))
    assert actions.min() == 300 + 1024 and actions.max() < vocab.separator < vocab.image
    assert vocab.size == vocab.image + 1
    assert np.all(vocab.discrete_values(actions) == np.arange(16))
    assert vocab.is_discrete(actions).all() and not vocab.is_discrete([299, vocab.separator]).any()
    with pytest.raises(ValueError, match="discrete values"):
        vocab.discrete_ids([16])


@pytest.mark.parametrize("shape,side", [((28, 28, 1), 7), ((28, 28, 1), 4), ((16, 8, 3), 4)])
def test_image_patches_reassemble_the_image(shape, side):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    cut = tokens.patches(image, side)
    assert cut.shape == (shape[0] * shape[1] // side ** 2, side * side * shape[2])
    assert np.abs(cut).max() <= 1 / math.sqrt(side) + 1e-6
    # the first patch is the top-left square, row-major inside
    assert np.allclose(cut[0], (image[:side, :side].reshape(-1) / 127.5 - 1) / math.sqrt(side))
    assert np.array_equal(tokens.image_from_patches(cut, shape[0], shape[1], side), image)


@pytest.mark.parametrize("name,episodes,at_least", [
    ("cartpole", 100, 500.0),   # the maximum, every episode
    ("acrobot", 100, -100.0),   # -84 measured over these seeds; random: about -495
    ("minigrid", 20, 0.8),      # 0.86 over 100 episodes; random: about 0.02
])
def test_scripted_experts_reach_the_returns_they_claim(name, episodes, at_least):
    control = environments.task(name)
    expert, _ = environments.mean_return(control, control.expert, episodes)
    randomly, _ = environments.mean_return(control, environments.random_policy(0), 10)
    assert expert >= at_least and randomly < at_least
    if name == "cartpole":
        assert environments.play(control, control.expert, seed=3).ret == 500.0


def test_an_episode_records_what_the_policy_saw_and_did():
    control = environments.task("minigrid")
    episode = environments.play(control, control.expert, seed=5)
    steps = len(episode.actions)
    assert episode.discrete.shape == (steps, 50) and episode.continuous.shape == (steps, 0)
    assert set(episode.actions) <= {0, 1, 2} and 0 < episode.ret <= 1
    assert episode.discrete.max() < 256
    with pytest.raises(Exception, match="control task"):
        environments.task("pong")


# ------------------------------------------------------------------------------ rows and model

GATO = "experiments/configs/multimodal/gato.py"
MESH_222 = ["--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gato")
    config = load_config(GATO + ":size=tiny", QUIET)
    return config, setup_lib.build(config, workdir), workdir


def test_the_loss_covers_exactly_text_and_action_tokens_and_never_crosses_examples(tiny):
    _, setup, _ = tiny
    vocab = setup.vocab
    seen = set()
    for _ in range(4):
        batch = next(setup.data.train)
        for row in range(len(batch["tokens"])):
            tok, tgt, w, seg = (batch[k][row] for k in ("tokens", "targets", "weights",
                                                        "segments"))
            domain = gato_data.DOMAINS[batch["domain"][row]]
            seen.add(domain)
            real = seg > 0
            if domain == "text":
                expected = real
            elif domain == "captions":  # the caption's words and end-of-text, after the image
                expected = real & (tgt < vocab.text)
                assert np.all(tgt[real & ~expected] == vocab.image)
            else:  # an action follows every separator, and nothing else is trained
                expected = real & (tok == vocab.separator)
                assert vocab.is_discrete(tgt[expected]).all()
            assert np.array_equal(w > 0, expected), domain
            same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)  # inside one example: shifted by one
            assert np.array_equal(tgt[:-1][same], tok[1:][same])
            assert np.all(batch["patches"][row][tok != vocab.image] == 0)
            assert np.all(np.abs(batch["patches"][row][tok == vocab.image]).sum(-1) > 0)
    assert seen == set(gato_data.DOMAINS)


def test_batches_are_a_function_of_the_step(tiny):
    _, setup, _ = tiny
    again = gato_data.MixedBatches(setup.sources, {d: 1.0 for d in gato_data.DOMAINS},
                                   setup.task.seq_len, setup.data.train.global_batch_size,
                                   setup.data.train.seed, setup.tokenizer.pad_id,
                                   setup.data.train.images, setup.data.train.patch_side,
                                   identity=setup.tokenizer.fingerprint)
    for step in (0, 3):
        a, b = setup.data.train.batch(step), again.batch(step)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert setup.data.train.get_state()["fingerprint"] == again.get_state()["fingerprint"]


def test_a_mistyped_domain_is_one_clear_error():
    config = load_config(GATO + ":size=tiny", QUIET)
    with config.unlocked():
        config.gato.mixture = {"txt": 1.0}
    with pytest.raises(ConfigError, match="unknown domains \\['txt'\\]"):
        setup_lib.weights(config)


def test_decoding_an_action_with_the_cache_equals_a_full_forward(tiny):
    _, setup, _ = tiny
    task, vocab = setup.task, setup.vocab
    params = nn.unbox(task.init_params(jax.random.key(3)))
    control = environments.task("acrobot")
    episode = setup.validation["acrobot"].episodes[0]
    example = sequences.control_example(control, vocab, episode, 0, 3)
    ids, local = example.ids[None], example.local[None]
    per_step = sequences.observation_length(control) + 2
    context = evaluate.CachedContext(task.model, params, 1, task.seq_len, task.pixels)
    context.restart(ids[:, :per_step - 1], local[:, :per_step - 1])     # step 0 up to its sep
    cached = context.feed(ids[:, per_step - 1:2 * per_step - 1],         # its action, step 1
                          local[:, per_step - 1:2 * per_step - 1])
    n = 2 * per_step - 1
    full = task.model.apply({"params": params}, jnp.asarray(ids[:, :n]),
                            jnp.zeros((1, n, task.pixels)), jnp.asarray(local[:, :n]))
    assert ids[0, n - 1] == vocab.separator
    np.testing.assert_allclose(cached[0], full[0, -1], atol=2e-5)


@pytest.mark.slow
def test_a_2x2x2_mesh_gives_the_one_device_loss_and_gradients(tmp_path):
    config = load_config(GATO + ":size=tiny", [*QUIET, *MESH_222])
    setup = setup_lib.build(config, tmp_path)
    engine = Engine(config, setup.task)
    host_params = jax.tree.map(
        lambda s: np.random.default_rng(s.size).normal(0, 0.1, s.shape).astype(s.dtype),
        engine.abstract_state.params)
    params = jax.device_put(host_params, engine.state_shardings.params)
    assert "tensor" in str(params["decoder"]["layers"]["attn"]["w_q"].sharding.spec)
    local = next(setup.data.train)
    batch = engine.global_batch(local)

    def loss_and_grads(params, batch):
        (_, sums), grads = jax.value_and_grad(
            lambda p: (lambda s: (s.loss, s))(setup.task.loss(p, batch, jax.random.key(4), True)),
            has_aux=True)(params)
        return sums.loss / sums.weight, grads

    with engine.scope():
        sharded_loss, sharded_grads = jax.jit(loss_and_grads)(params, batch)
    one = jax.devices()[0]
    loss, grads = jax.jit(loss_and_grads)(jax.device_put(host_params, one),
                                          jax.device_put(local, one))
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(sharded_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_a_specialist_sees_the_rows_of_its_domain_the_generalist_saw():
    generalist = load_config(GATO + ":size=cpu")
    specialist = load_config(GATO + ":size=cpu,specialist=acrobot")
    share = generalist.gato.mixture["acrobot"] / sum(generalist.gato.mixture.values())
    assert specialist.train.steps == round(generalist.train.steps * share)
    assert specialist.train.global_batch_size == generalist.train.global_batch_size
    assert {d for d, w in specialist.gato.mixture.items() if w > 0} == {"acrobot"}


@pytest.mark.slow
def test_train_then_measure_through_the_commands(tmp_path):
    from experiments import main as experiments_main
    assert experiments_main.main(["train", "--config", GATO + ":size=tiny", "--workdir",
                                  str(tmp_path), *QUIET]) == 0
    evaluate.main(["--workdir", str(tmp_path), "--episodes", "3", "--images", "16"])
    result = json.loads((tmp_path / "gato_eval.json").read_text())
    assert {"text", "captions", "cartpole", "acrobot", "minigrid"} <= set(result)
    assert result["cartpole"]["expert"] == 500.0 and result["cartpole"]["random"] < 100
    assert result["text"]["bits_per_byte"] > 0
    assert 0 <= result["captions"]["zero_shot_accuracy"] <= 1
    # the study's table: this run as the generalist, no specialist measured yet
    from multimodal import study
    plot = tmp_path / "study.png"
    study.main(["--generalist", str(tmp_path), "--specialists", str(tmp_path / "none-{domain}"),
                "--plot", str(plot), "--out", str(tmp_path / "study.json")])
    rows = json.loads((tmp_path / "study.json").read_text())
    bpb = next(r for r in rows if r["domain"] == "text")
    assert bpb["generalist"] == result["text"]["bits_per_byte"] and bpb["specialist"] is None
    assert plot.stat().st_size > 0


def test_aot_compiles_the_generalist_without_its_data(tiny):
    """launch.aot builds the task from the config alone: same parameters as the trained setup."""
    from launch import aot
    config, setup, _ = tiny
    result = aot.run(config, aot.parse_target("8xH100"), method="cpu-estimate")
    params = setup.task.init_params(jax.random.key(0))
    assert result["parameters"] == sum(x.size for x in jax.tree.leaves(params))
    assert result["fits"] and result["per_device_bytes"]["arguments"] > 0
