"""KV-cache decoding agrees with the full forward pass; samplers keep to their supports."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import mesh as mesh_lib
from lm.decode import decoding
from lm.models import transformer as model_lib

V = 96  # divides over the 2x2x2 mesh


def tiny_model(style: str, scan: bool = False, d_model: int = 32):
    cfg = model_lib.preset(style, vocab_size=V, num_layers=2, d_model=d_model, num_heads=4,
                           max_len=64, scan_layers=scan)
    model = model_lib.Transformer(cfg)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, nn.meta.unbox(params)


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, V, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("style,scan", [("gpt2", False), ("llama", False), ("llama", True)])
def test_cached_logits_equal_full_forward_at_every_position(style, scan):
    model, params = tiny_model(style, scan)
    tokens_BT = random_tokens(2, 20)
    full_BTV = model.apply({"params": params}, tokens_BT)
    cache = decoding.init_cache(model, 2, 24)
    prefix = 7
    positions = lambda start, n: jnp.broadcast_to(jnp.arange(start, start + n), (2, n))
    logits, cache = decoding.forward_with_cache(model, params, cache, tokens_BT[:, :prefix],
                                      positions(0, prefix), jnp.ones((2, prefix), jnp.int32))
    pieces = [logits]
    for t in range(prefix, 20):
        logits, cache = decoding.forward_with_cache(model, params, cache, tokens_BT[:, t:t + 1],
                                          positions(t, 1), jnp.ones((2, 1), jnp.int32))
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full_BTV, atol=2e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_left_and_right_padding_equal_decoding_each_prompt_alone(style):
    model, params = tiny_model(style)
    tokens = random_tokens(3, 11, seed=2)
    prompts = [tokens[0, :3].tolist(), tokens[1, :11].tolist(), tokens[2, :6].tolist()]
    alone = [decoding.generate(model, params, [p], decoding.SamplingConfig(max_new_tokens=8))[0]
             for p in prompts]
    for padding in ("left", "right"):
        sampling = decoding.SamplingConfig(max_new_tokens=8, padding=padding)
        assert decoding.generate(model, params, prompts, sampling) == alone
    # And the greedy tokens are the argmax of the full forward pass over prompt + output.
    for prompt, new in zip(prompts, alone):
        logits_TV = model.apply({"params": params}, np.array([prompt + new]))[0]
        assert np.argmax(logits_TV[len(prompt) - 1:-1], axis=-1).tolist() == new[1:] or \
            np.argmax(logits_TV[len(prompt) - 1:], axis=-1).tolist()[:len(new)] == new


def test_stop_tokens_end_each_row_on_its_own():
    model, params = tiny_model("llama")
    prompts = [random_tokens(1, 5, seed=s)[0].tolist() for s in range(2)]
    free = decoding.generate(model, params, prompts, decoding.SamplingConfig(max_new_tokens=10))
    stop = free[0][3]
    stopped = decoding.generate(model, params, prompts,
                                decoding.SamplingConfig(max_new_tokens=10, stop_ids=(stop,)))
    assert stopped[0] == free[0][:free[0].index(stop)]
    assert stopped[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])


def test_temperature_to_zero_equals_greedy():
    model, params = tiny_model("gpt2")
    prompts = [random_tokens(1, 4, seed=s)[0].tolist() for s in range(3)]
    greedy = decoding.generate(model, params, prompts, decoding.SamplingConfig(max_new_tokens=12))
    cold = decoding.generate(model, params, prompts,
                             decoding.SamplingConfig(max_new_tokens=12, temperature=1e-6, seed=3))
    assert cold == greedy
    warm = decoding.generate(model, params, prompts,
                             decoding.SamplingConfig(max_new_tokens=12, temperature=1.5, seed=3))
    assert warm != greedy  # sampling at temperature 1.5 really samples


def sample_many(logits_V: np.ndarray, n: int, **kw) -> np.ndarray:
    sampling = decoding.SamplingConfig(temperature=kw.pop("temperature", 1.0), **kw)
    logits_NV = jnp.broadcast_to(jnp.asarray(logits_V), (n, logits_V.shape[0]))
    return np.asarray(decoding.choose_tokens(logits_NV, jax.random.key(0), sampling))


def test_top_k_never_leaves_the_k_most_likely():
    logits_V = np.random.default_rng(0).normal(size=V).astype(np.float32) * 3
    drawn = sample_many(logits_V, 4000, top_k=5)
    top5 = set(np.argsort(-logits_V)[:5].tolist())
    assert set(drawn.tolist()) <= top5
    assert len(set(drawn.tolist())) == 5  # and uses all of them at temperature 1


def test_top_p_never_leaves_the_nucleus():
    logits_V = np.random.default_rng(1).normal(size=V).astype(np.float32) * 2
    probs_V = np.exp(logits_V - logits_V.max())
    probs_V /= probs_V.sum()
    order = np.argsort(-probs_V)
    cumulative = np.cumsum(probs_V[order])
    size = int(np.searchsorted(cumulative, 0.7) + 1)  # smallest prefix reaching 0.7
    nucleus = set(order[:size].tolist())
    drawn = set(sample_many(logits_V, 4000, top_p=0.7).tolist())
    assert drawn <= nucleus and len(drawn) >= size - 1
    # Combined with top-k, the smaller of the two sets wins.
    drawn_k = set(sample_many(logits_V, 4000, top_p=0.7, top_k=2).tolist())
    assert drawn_k <= set(order[:2].tolist())


def test_beam_width_one_equals_greedy_and_scores_are_log_likelihoods():
    model, params = tiny_model("llama")
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (3, 7)]
    greedy = decoding.generate(model, params, prompts, decoding.SamplingConfig(max_new_tokens=6))
    beams1, scores1 = decoding.beam_search(model, params, prompts, width=1, max_new_tokens=6)
    assert beams1 == greedy
    beams4, scores4 = decoding.beam_search(model, params, prompts, width=4, max_new_tokens=6)
    for prompt, beam, score in zip(prompts, beams4, scores4):
        logp_TV = jax.nn.log_softmax(model.apply({"params": params}, np.array([prompt + beam]))[0])
        summed = sum(float(logp_TV[len(prompt) - 1 + i, t]) for i, t in enumerate(beam))
        assert summed == pytest.approx(score, abs=1e-3)  # the score is the beam's log-likelihood


def test_beam_as_wide_as_the_vocabulary_finds_the_best_two_tokens():
    model, params = tiny_model("gpt2")
    prompt = random_tokens(1, 4, seed=5)[0].tolist()
    (beam,), (score,) = decoding.beam_search(model, params, [prompt], width=V, max_new_tokens=2)
    # Exhaustive: every first token, then the best second token after it.
    first_V = jax.nn.log_softmax(model.apply({"params": params}, np.array([prompt]))[0, -1])
    batch_VT = np.array([prompt + [t] for t in range(V)])
    second_VV = jax.nn.log_softmax(model.apply({"params": params}, batch_VT)[:, -1])
    total_VV = np.asarray(first_V[:, None] + second_VV)
    best = np.unravel_index(np.argmax(total_VV), total_VV.shape)
    assert beam == [int(best[0]), int(best[1])]
    assert score == pytest.approx(float(total_VV.max()), abs=1e-4)


def test_cache_is_sharded_by_the_logical_rules():
    model, params = tiny_model("llama")
    mesh = mesh_lib.build_mesh(mesh_lib.mesh_config(data=2, fsdp=2, tensor=2))
    rules = mesh_lib.rules_from_config(mesh_lib.DEFAULT_RULES)
    prompts = [random_tokens(1, 5, seed=s)[0].tolist() for s in range(4)]
    sampling = decoding.SamplingConfig(max_new_tokens=5)
    expected = decoding.generate(model, params, prompts, sampling)
    boxed = jax.eval_shape(lambda: decoding.init_cache(model, 4, 10))
    shardings = mesh_lib.tree_shardings(mesh, rules, boxed)
    key_sharding = shardings["layers_0"]["attn"]["key"]
    assert key_sharding.spec[0] == ("data", "fsdp") and key_sharding.spec[2] == "tensor"
    param_shardings = mesh_lib.tree_shardings(
        mesh, rules, jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    )["params"]
    sharded_params = jax.device_put(params, param_shardings)
    with mesh_lib.activate(mesh, rules):
        assert decoding.generate(model, sharded_params, prompts, sampling) == expected
        _, cache = jax.jit(lambda p: decoding.prefill(model, p, tuple(
            jnp.asarray(a) for a in decoding.pad_prompts(prompts, 0, "left")), 10))(sharded_params)
    key = nn.meta.unbox(cache["layers_0"]["attn"]["key"])
    assert len({s.device for s in key.addressable_shards}) == 8
    assert key.addressable_shards[0].data.shape[0] < key.shape[0]  # batch really split


def test_bad_arguments_are_clear_errors():
    model, params = tiny_model("gpt2")
    with pytest.raises(ValueError, match="top_p"):
        decoding.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        decoding.generate(model, params, [[]], decoding.SamplingConfig())
    with pytest.raises(ValueError, match="exceeds the model's learned positions"):
        decoding.generate(model, params, [[5] * 60], decoding.SamplingConfig(max_new_tokens=10))


def test_streaming_yields_what_generate_returns():
    model, params = tiny_model("gpt2")
    prompt = random_tokens(1, 5, seed=7)[0].tolist()
    for sampling in (decoding.SamplingConfig(max_new_tokens=9),
                     decoding.SamplingConfig(max_new_tokens=9, temperature=0.9, top_p=0.9, seed=4)):
        assert list(decoding.stream(model, params, prompt, sampling)) == \
            decoding.generate(model, params, [prompt], sampling)[0]


def test_sample_command_prints_the_greedy_continuation_of_a_checkpoint(tmp_path):
    from conftest import run_cli, train_tiny
    from lm.objectives import saved_run
    train_tiny(tmp_path, "--config.train.steps=3")
    done = run_cli("sample", "--workdir", str(tmp_path), "--prompt", "It is a truth",
                   "--temperature", "0", "--max-new-tokens", "12", env=None)
    assert done.returncode == 0, done.stderr[-2000:]
    # The same continuation, token by token from full forward passes over the restored params.
    run = saved_run.load_run(tmp_path)
    setup, params = run, run.params
    ids = [setup.tokenizer.bos_id] + setup.tokenizer.encode(["It is a truth"])[0]
    prompt_len = len(ids)
    # One compiled forward pass over a fixed length: a causal model's logits at position t do not
    # depend on the (padding) tokens after it.
    params = jax.device_get(params)
    forward = jax.jit(lambda tokens: setup.task.model.apply({"params": params}, tokens))
    for _ in range(12):
        padded = np.array([ids + [0] * (prompt_len + 12 - len(ids))])
        logits_TV = np.asarray(forward(padded))[0]
        token = int(np.argmax(logits_TV[len(ids) - 1]))
        if token == setup.tokenizer.bos_id:
            break
        ids.append(token)
    expected = setup.tokenizer.decode(ids[1:])
    assert done.stdout.strip().endswith(expected.strip()), (done.stdout[-500:], expected)
    assert len(ids) > prompt_len


def test_the_decode_loop_copies_no_weight_and_no_cache_per_token():
    """The compiled decoding loop reads every weight and the KV cache in place: no copy or
    transpose inside the while loop's body is as large as one layer's key cache or the smallest
    weight matrix. With the output projection as "btnh,nhd" XLA transposed w_o on every token
    (30 copies per token for SmolLM2-135M, 15% of a batch-1 step on CPU), and with the step's
    attention as matmuls it copied every layer's key and value cache."""
    from benchmarks import cpu_profile
    model, params = tiny_model("llama", d_model=128)
    cfg = model.cfg
    sampling = decoding.SamplingConfig(max_new_tokens=8, stop_ids=())
    prompts = tuple(jnp.asarray(a) for a in decoding.pad_prompts(
        random_tokens(2, 16).tolist(), sampling.pad_id, sampling.padding, sampling.bucket))
    text = decoding._generate_jit.lower(model, params, prompts, sampling,
                                        jax.random.key(0)).compile().as_text()
    smallest_weight = min(x.nbytes for x in jax.tree.leaves(params) if x.ndim >= 2)
    B, P = prompts[0].shape
    key_cache = (B * (P + sampling.max_new_tokens) * cfg.resolved_num_kv_heads
                 * cfg.resolved_head_dim * jnp.dtype(cfg.dtype).itemsize)
    bodies = cpu_profile.while_bodies(text)
    assert bodies, "no while loop found in the compiled generate"
    copies = {name: size for body in bodies
              for name, (size, _) in cpu_profile.layout_copies(text, body).items()}
    assert all(size < min(smallest_weight, key_cache) for size in copies.values()), copies
