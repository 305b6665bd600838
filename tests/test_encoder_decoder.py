"""The encoder-decoder shape (T5): relative position buckets, causality, padding, span corruption,
training, sharding and cached decoding."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUIET, REPO, train_losses
from core.config import load_config
from core.engine import Engine
from lm import pipeline
from lm.data.tokenizer import EOS_ID
from lm.decode import decoding, seq2seq
from lm.models import encoder_decoder, layers
from lm.objectives import span_corruption
from lm.models import transformer as model_lib
from lm.objectives import registry

T5 = str(REPO / "experiments/configs/lm/t5.py")
V = 96  # divides over the 2x2x2 mesh
MESH_222 = ["--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2", "--config.mesh.ici.tensor=2"]


def t5_bucket(relative_position: int, bidirectional: bool, num_buckets: int,
              max_distance: int) -> int:
    """T5's _relative_position_bucket (mesh_tensorflow / Hugging Face), one offset at a time."""
    bucket, n = 0, -relative_position
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40)])
def test_relative_buckets_are_t5s(bidirectional, num_buckets, max_distance):
    offsets = np.arange(-400, 401)
    expected = [t5_bucket(int(o), bidirectional, num_buckets, max_distance) for o in offsets]
    got = layers.relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(got, expected)
    # The jitted lookup, from (query, key) positions, as attention uses it.
    rng = np.random.default_rng(0)
    q_BT, k_BS = rng.integers(0, 500, (2, 30)), rng.integers(0, 500, (2, 40))
    ids_BTS = layers.relative_bucket_ids(jnp.asarray(q_BT), jnp.asarray(k_BS), bidirectional,
                                         num_buckets, max_distance)
    expected_BTS = [[[t5_bucket(int(k - q), bidirectional, num_buckets, max_distance)
                      for k in k_S] for q in q_T] for q_T, k_S in zip(q_BT, k_BS)]
    np.testing.assert_array_equal(ids_BTS, expected_BTS)
    # Known facts: the query's own key is bucket 0; a causal stack puts every later key there.
    assert got[400] == 0
    if not bidirectional:
        assert (got[401:] == 0).all() and got[399] == 1
    else:
        assert got[401] == num_buckets // 2 + 1 and got[399] == 1


def random_params(model, *example_args):
    """Random parameters of the model's shapes (norm scales near 1). Compiling a model's own
    init costs seconds even for tiny models; these tests need any parameters, not its init."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_args))
    rng = np.random.default_rng(1)
    fill = lambda path, s: (float(getattr(path[-1], "key", "") == "scale") +
                            0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes["params"])


def tiny_encdec(pos_emb: str = "relative"):
    cfg = model_lib.TransformerConfig(V, 2, 32, 4, max_len=64, pos_emb=pos_emb, norm="rmsnorm",
                                      mlp="swiglu", use_bias=False, tie_embeddings=False,
                                      scan_layers=False)
    model = encoder_decoder.EncoderDecoder(cfg)
    return model, random_params(model, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 4), jnp.int32))


def random_tokens(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, V, shape).astype(np.int32)


@pytest.mark.parametrize("pos_emb", ["relative", "rope", "learned"])
def test_decoder_is_causal_and_encoder_bidirectional(pos_emb):
    model, params = tiny_encdec(pos_emb)
    inputs, targets = random_tokens((2, 12)), random_tokens((2, 9), seed=1)
    logits = jax.jit(lambda i, t: model.apply({"params": params}, i, t))
    base = np.asarray(logits(inputs, targets))
    later = targets.copy()
    later[:, 6] = (later[:, 6] + 1) % V
    moved = np.abs(logits(inputs, later) - base).max(axis=(0, 2))
    assert (moved[:6] == 0).all() and (moved[6:] > 1e-4).all(), moved
    # The last input token reaches the first target (and the encoder's first position).
    last_input = inputs.copy()
    last_input[:, -1] = (last_input[:, -1] + 1) % V
    assert np.abs(logits(last_input, targets)[:, 0] - base[:, 0]).max() > 1e-4
    encode = jax.jit(lambda i: model.apply({"params": params}, i,
                                           method=encoder_decoder.EncoderDecoder.encode))
    assert np.abs(encode(last_input)[:, 0] - encode(inputs)[:, 0]).max() > 1e-4


def test_encoder_padding_does_not_change_real_outputs():
    model, params = tiny_encdec()
    inputs, targets = random_tokens((1, 7)), random_tokens((1, 5), seed=1)
    encode = jax.jit(lambda i, s: model.apply({"params": params}, i, s,
                                              method=encoder_decoder.EncoderDecoder.encode))
    alone = encode(inputs, np.ones_like(inputs))
    padded = np.concatenate([inputs, random_tokens((1, 6), seed=2)], axis=1)  # junk padding
    segments = (np.arange(13) < 7).astype(np.int32)[None]
    np.testing.assert_allclose(encode(padded, segments)[:, :7], alone, atol=1e-5)
    # Nor does the decoder see it through cross-attention: other junk, the same logits.
    apply = jax.jit(lambda i: model.apply({"params": params}, i, targets, segments,
                                          np.ones_like(targets)))
    other = np.concatenate([inputs, random_tokens((1, 6), seed=3)], axis=1)
    np.testing.assert_allclose(apply(padded), apply(other), atol=1e-5)


# ----------------------------------------------------------------------------- span corruption

def windows(rows: int, length: int, seed: int = 0):
    """Random tokens with 1-3 documents per row and, on some rows, trailing padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 400, (rows, length)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    for r in range(rows):
        for cut in sorted(rng.choice(np.arange(5, length - 5), rng.integers(0, 3), replace=False)):
            segments[r, cut:] += 1
        if r % 3 == 2:
            segments[r, rng.integers(length // 2, length):] = 0
    return tokens, segments


def reconstruct(pair: dict, row: int, vocab: int, segment: int) -> list[int]:
    """A document's tokens from its inputs and targets: each sentinel in the inputs replaced by
    the tokens after the same sentinel in the targets; a span continued from the previous
    document opens the targets without a sentinel."""
    take = lambda name, segments: np.asarray(pair[name][row])[
        np.asarray(pair[segments][row]) == segment].tolist()
    inputs = take("inputs", "input_segment_ids")
    targets = take("targets", "target_segment_ids")
    if targets and targets[-1] == EOS_ID:
        targets = targets[:-1]
    is_sentinel = lambda t: t >= vocab - 100
    spans, current = {}, "carried"
    for token in targets:
        if is_sentinel(token):
            current = token
            spans[current] = []
        else:
            spans.setdefault(current, []).append(token)
    out = list(spans.pop("carried", []))
    for token in inputs:
        out.extend(spans.pop(token) if is_sentinel(token) else [token])
    assert not spans, "a target span has no sentinel in the inputs"
    return out


def test_inputs_and_targets_rebuild_every_document_exactly():
    tokens, segments = windows(24, 64)
    pair = span_corruption.span_corrupt(jax.random.key(3), tokens, segments, vocab_size=512)
    assert pair["inputs"].shape == (24, 64 - 10 + 3) and pair["targets"].shape == (24, 14)
    for row in range(24):
        for segment in set(segments[row].tolist()) - {0}:
            assert reconstruct(pair, row, 512, segment) == \
                tokens[row][segments[row] == segment].tolist(), (row, segment)
        # Sentinels restart at <extra_id_0> (the top id) in every document.
        for segment in set(segments[row].tolist()) - {0}:
            inputs = np.asarray(pair["inputs"][row])[np.asarray(
                pair["input_segment_ids"][row]) == segment]
            sentinels = inputs[inputs >= 412]
            assert (sentinels == 511 - np.arange(len(sentinels))).all()
        # The decoder reads the targets shifted right, from the start id at each document.
        targets, dec = np.asarray(pair["targets"][row]), np.asarray(pair["decoder_inputs"][row])
        seg = np.asarray(pair["target_segment_ids"][row])
        starts = np.concatenate([[True], seg[1:] != seg[:-1]])
        assert (dec[starts] == 0).all() and (dec[1:][~starts[1:]] == targets[:-1][~starts[1:]]).all()


def test_noise_density_and_span_lengths_are_t5s():
    length, rows = 200, 3000
    masks = np.asarray(jax.vmap(lambda k: span_corruption.random_spans_noise_mask(
        k, length, 0.15, 3.0))(jax.random.split(jax.random.key(0), rows)))
    assert abs(masks.mean() - 0.15) < 0.005
    assert not masks[:, 0].any() and masks[:, -1].all()  # opens with a gap, ends in noise
    edges = np.diff(np.concatenate([np.zeros((rows, 1)), masks, np.zeros((rows, 1))], axis=1),
                    axis=1)
    lengths = np.concatenate([np.flatnonzero(e == -1) - np.flatnonzero(e == 1) for e in edges])
    assert abs(lengths.mean() - 3.0) < 0.05
    # 30 noise tokens in 10 spans, each partition equally likely: P(len = l) is
    # C(30 - l - 1, 8) / C(29, 9).
    for span in range(1, 6):
        p = math.comb(30 - span - 1, 8) / math.comb(29, 9)
        assert abs((lengths == span).mean() - p) < 0.01, (span, (lengths == span).mean(), p)


def test_corruption_is_deterministic_under_a_seed():
    tokens, segments = windows(8, 64, seed=1)
    run = lambda seed: span_corruption.span_corrupt(jax.random.key(seed), tokens, segments,
                                                    vocab_size=512)
    first, again, other = run(5), run(5), run(6)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert (np.asarray(first["inputs"]) != np.asarray(other["inputs"])).any()


def test_bad_span_corruption_settings_are_clear_errors():
    config = load_config(T5 + ":size=tiny", [])
    with pytest.raises(ValueError, match="noise_density"):
        registry.make_task(load_config(T5 + ":size=tiny",
                                       ["--config.span_corruption.noise_density=1.5"]), 512)
    with pytest.raises(ValueError, match="num_sentinels"):
        registry.make_task(load_config(T5 + ":size=tiny",
                                       ["--config.span_corruption.num_sentinels=2"]), 512)
    with pytest.raises(ValueError, match="no room"):
        span_corruption.SpanCorruptionTask(model_lib.TransformerConfig(560, 2, 32, 4), 64, 512)
    with pytest.raises(ValueError, match="attention='full'"):
        registry.make_task(load_config(T5 + ":size=tiny",
                                       ["--config.model.attention=sliding_window"]), 512)
    task = registry.make_task(config, 512)
    with pytest.raises(ValueError, match="extra_id_0"):
        span_corruption.encode_prompt(task, None, "no blank here")


# ----------------------------------------------------------------------------- training, sharding

@pytest.mark.slow
def test_loss_falls_on_the_tiny_config(tmp_path):
    from core import trainer
    config = load_config(T5 + ":size=tiny,corpus=austen",
                         [*QUIET, "--config.train.steps=30", "--config.train.checkpoint_every=100",
                          "--config.mesh.num_devices=1", "--config.mesh.ici.data=1"])
    setup = pipeline.build(config, tmp_path)
    assert isinstance(setup.task, span_corruption.SpanCorruptionTask)
    assert setup.task.sentinel(0) == setup.task.model_cfg.vocab_size - 1
    assert setup.task.model_cfg.vocab_size - 100 >= setup.tokenizer.vocab_size
    trainer.train(config, tmp_path, setup.task, setup.data)
    losses = train_losses(tmp_path)
    early, late = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s]
                                                                      for s in range(26, 31)])
    assert late < early - 1.0, (early, late)


@pytest.mark.slow
def test_2x2x2_mesh_gives_the_unsharded_loss_and_gradients(tmp_path):
    config = load_config(T5 + ":size=tiny,corpus=austen", [*QUIET, *MESH_222])
    setup = pipeline.build(config, tmp_path)
    engine = Engine(config, setup.task)
    host_params = jax.tree.map(  # any values will do, in the engine's shapes and shardings
        lambda s: np.random.default_rng(s.size).normal(0, 0.1, s.shape).astype(s.dtype),
        engine.abstract_state.params)
    params = jax.device_put(host_params, engine.state_shardings.params)
    split = [leaf for leaf in jax.tree_util.tree_leaves(params)
             if leaf.addressable_shards[0].data.size < leaf.size]
    assert len(split) >= len(jax.tree_util.tree_leaves(params)) // 2
    assert "tensor" in str(params["decoder"]["layers"]["cross_attn"]["w_q"].sharding.spec)
    local = next(setup.data.train)
    batch = engine.global_batch(local)

    def loss_and_grads(params, batch):
        sums, grads = jax.value_and_grad(
            lambda p: (lambda s: (s.loss, s))(setup.task.loss(p, batch, jax.random.key(4), True)),
            has_aux=True)(params)
        return sums[1].loss / sums[1].weight, grads

    with engine.scope():
        sharded_loss, sharded_grads = jax.jit(lambda p, b: loss_and_grads(p, b))(params, batch)
    one = jax.devices()[0]
    loss, grads = jax.jit(lambda p, b: loss_and_grads(p, b))(jax.device_put(host_params, one),
                                                            jax.device_put(local, one))
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(sharded_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- decoding

def test_cached_decoding_equals_recomputing_the_decoder_each_step():
    model, params = tiny_encdec()
    inputs = [random_tokens(9).tolist(), random_tokens(5, seed=1).tolist()]  # right-padded
    sampling = decoding.SamplingConfig(max_new_tokens=7)
    tokens_BN, logits_BNV = seq2seq.decode_steps(
        model, params, *map(jnp.asarray, decoding.pad_prompts(inputs, 0, "right")[:2]),
        sampling, 0)
    full = jax.jit(lambda i, t: model.apply({"params": params}, i, t))
    for row, source in enumerate(inputs):  # each alone, no padding, full decoder every step
        decoded = np.zeros((1, 7), np.int32)  # start id 0, then the tokens so far (the rest
        for step in range(7):                 # is never seen: the decoder is causal)
            logits_V = full(np.array([source]), decoded)[0, step]
            np.testing.assert_allclose(logits_BNV[row, step], logits_V, atol=2e-5)
            if step < 6:
                decoded[0, step + 1] = int(np.argmax(logits_V))
        assert np.asarray(tokens_BN[row, :6]).tolist() == decoded[0, 1:].tolist()
    stop = int(tokens_BN[0, 3])
    stopped = seq2seq.generate(model, params, inputs[:1], decoding.SamplingConfig(
        max_new_tokens=7, stop_ids=(stop,)), 0)[0]
    assert stopped == np.asarray(tokens_BN[0]).tolist()[:np.asarray(tokens_BN[0]).tolist()
                                                          .index(stop)]


def test_decoder_only_relative_positions_decode_with_left_padding():
    cfg = model_lib.preset("tiny-llama", vocab_size=V, d_model=32, pos_emb="relative",
                           relative_buckets=8, relative_max_distance=12)
    model = model_lib.Transformer(cfg)
    params = random_params(model, jnp.zeros((1, 8), jnp.int32))
    prompts = [random_tokens(3).tolist(), random_tokens(11, seed=1).tolist()]
    together = decoding.generate(model, params, prompts,
                                 decoding.SamplingConfig(max_new_tokens=12, padding="left"))
    full = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    for prompt, new in zip(prompts, together):  # the greedy tokens of the uncached forward pass
        row = prompt + new  # right-padded to one length (one compile): causal, so unseen
        logits_TV = full(np.array([row + [0] * (23 - len(row))]))[0]
        assert np.argmax(logits_TV[len(prompt) - 1:len(row) - 1], axis=-1).tolist() == new


def test_relative_bias_is_the_same_in_both_attention_implementations():
    cfg = model_lib.preset("tiny-llama", vocab_size=V, d_model=32, pos_emb="relative",
                           causal=False)
    model = model_lib.Transformer(cfg)
    params = random_params(model, jnp.zeros((1, 8), jnp.int32))
    params["rel_bias"] = params["rel_bias"] * 20  # strong enough to matter
    tokens, segments = random_tokens((2, 10)), np.array([[1] * 10, [1] * 6 + [2] * 4])

    def run(impl, table_scale=1.0):
        p = {**params, "rel_bias": params["rel_bias"] * table_scale}
        apply = lambda t, s: model_lib.Transformer(dataclasses.replace(cfg, attention_impl=impl)
                                               ).apply({"params": p}, t, segment_ids_BT=s)
        return np.asarray(jax.jit(apply)(tokens, segments))

    np.testing.assert_allclose(run("dot_product_attention"), run("xla"), atol=1e-4)
    assert np.abs(run("xla", table_scale=0.0) - run("xla")).max() > 1e-2  # the bias matters
