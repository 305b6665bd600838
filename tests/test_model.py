"""The decoder (lm/models/transformer.py) against an independent PyTorch implementation, and its invariants.

Tiny models (2 layers, width 64, vocabulary 128) keep every test to a few seconds on 2 cores.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.torch_gpt import TorchDecoder, load_flax_params
from lm.models import param_tree
from lm.models import transformer as M

B, T, V = 2, 16, 128
GPT2 = M.preset("tiny-gpt2", vocab_size=V, max_len=32)
LLAMA = M.preset("tiny-llama", vocab_size=V, max_len=32)  # rope, rmsnorm, swiglu, untied, 4q/2kv
STYLES = {"gpt2": GPT2, "llama": LLAMA}
AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "length", "layers", "norm"}

# Two documents packed in row 0 (6 and 7 tokens) then 3 padding tokens; one document in row 1.
SEGMENTS_BT = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * T], np.int32)
POSITIONS_BT = np.array([list(range(6)) + list(range(7)) + list(range(3)), list(range(T))],
                        np.int32)


def tokens(seed=0, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


def shapes(cfg):
    """Boxed abstract params (jax.eval_shape: traced, never compiled or allocated)."""
    return jax.eval_shape(M.Transformer(cfg).init, jax.random.key(0), tokens())["params"]


def init(cfg, seed=0):
    """Random params of the right structure drawn with numpy (no XLA compile: fast tests).

    Norm scales are 1 + noise and biases are nonzero, which tests more than the real init would.
    """
    rng = np.random.default_rng(seed)
    def draw(path, x):
        noise = rng.normal(0.0, 0.05, x.shape).astype(np.float32)
        return jnp.asarray(noise + 1.0 if path[-1].key == "scale" else noise)
    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes(cfg)))


@functools.lru_cache(maxsize=None)  # one jitted function per config, so tests share compilations
def logits_fn(cfg):
    return jax.jit(lambda params, tokens_BT, positions_BT=None, segment_ids_BT=None:
                   M.Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT,
                                        segment_ids_BT))


def torch_logits(cfg, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
    model = load_flax_params(TorchDecoder(cfg), params).eval()
    as_t = lambda x: None if x is None else torch.tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        return model(as_t(tokens_BT), as_t(positions_BT), as_t(segment_ids_BT)).numpy()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_matches_torch(style):
    cfg = STYLES[style]
    params, toks = init(cfg), tokens()
    f = logits_fn(cfg)
    plain = np.asarray(f(params, toks))
    packed = np.asarray(f(params, toks, POSITIONS_BT, SEGMENTS_BT))
    assert plain.dtype == np.float32 and plain.shape == (B, T, V)
    np.testing.assert_allclose(plain, torch_logits(cfg, params, toks), atol=1e-4, rtol=0)
    np.testing.assert_allclose(packed, torch_logits(cfg, params, toks, POSITIONS_BT, SEGMENTS_BT),
                               atol=1e-4, rtol=0)
    assert np.abs(packed[0] - plain[0]).max() > 1e-2  # the segments did change row 0


def test_torch_loads_per_layer_params():
    cfg = dataclasses.replace(GPT2, scan_layers=False)
    params, toks = init(cfg), tokens()
    np.testing.assert_allclose(logits_fn(cfg)(params, toks), torch_logits(cfg, params, toks),
                               atol=1e-4, rtol=0)


def test_causal():
    params, f = init(LLAMA), logits_fn(LLAMA)
    a, b = tokens(0), tokens(1)
    t = 7
    mixed = jnp.concatenate([a[:, :t + 1], b[:, t + 1:]], axis=1)
    la, lm = np.asarray(f(params, a)), np.asarray(f(params, mixed))
    np.testing.assert_allclose(la[:, :t + 1], lm[:, :t + 1], atol=1e-5, rtol=0)
    assert np.abs(la[:, t + 1:] - lm[:, t + 1:]).max() > 1e-2


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_packed_equals_separate(style):
    cfg = STYLES[style]
    params, toks, f = init(cfg), tokens(), logits_fn(cfg)
    packed = np.asarray(f(params, toks, POSITIONS_BT, SEGMENTS_BT))
    first = np.asarray(f(params, toks[:1, :6]))
    second = np.asarray(f(params, toks[:1, 6:13]))
    np.testing.assert_allclose(packed[0, :6], first[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, 6:13], second[0], atol=1e-5, rtol=0)
    assert np.isfinite(packed).all()  # padding rows included


def test_scan_equals_loop():
    scanned = init(LLAMA)
    loop_cfg = dataclasses.replace(LLAMA, scan_layers=False)
    looped = param_tree.unstack_layers(scanned)
    assert set(looped) == {"token_embed", "unembed", "final_norm", "layers_0", "layers_1"}
    fresh_loop = nn.meta.unbox(shapes(loop_cfg))
    assert jax.tree.structure(fresh_loop) == jax.tree.structure(looped)
    assert param_tree.count_params(fresh_loop) == param_tree.count_params(scanned)
    np.testing.assert_allclose(logits_fn(loop_cfg)(looped, tokens()),
                               logits_fn(LLAMA)(scanned, tokens()), atol=1e-6, rtol=0)
    restacked = param_tree.stack_layers(looped, LLAMA.num_layers)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), restacked, scanned))


def test_gqa_equals_mha_with_repeated_kv():
    """4 query heads sharing 2 kv heads == MHA whose kv heads are those 2, each repeated twice."""
    mha_cfg = dataclasses.replace(LLAMA, num_kv_heads=None)
    gqa = init(LLAMA)
    mha = jax.tree.map(lambda x: x, gqa)
    for name in ("w_k", "w_v"):  # stacked (layers, D, K, H): query head n uses kv head n // 2
        mha["layers"]["attn"][name] = jnp.repeat(gqa["layers"]["attn"][name], 2, axis=2)
    np.testing.assert_allclose(logits_fn(mha_cfg)(mha, tokens()), logits_fn(LLAMA)(gqa, tokens()),
                               atol=1e-5, rtol=0)
    # and num_kv_heads == num_heads is exactly MHA
    explicit = dataclasses.replace(LLAMA, num_kv_heads=LLAMA.num_heads)
    np.testing.assert_array_equal(logits_fn(explicit)(mha, tokens()),
                                  logits_fn(mha_cfg)(mha, tokens()))


def test_dot_product_attention_impl_matches():
    cfg = dataclasses.replace(LLAMA, attention_impl="dot_product_attention")
    params, toks = init(LLAMA), tokens()
    np.testing.assert_allclose(logits_fn(cfg)(params, toks, POSITIONS_BT, SEGMENTS_BT),
                               logits_fn(LLAMA)(params, toks, POSITIONS_BT, SEGMENTS_BT),
                               atol=1e-5, rtol=0)


@functools.lru_cache(maxsize=None)
def _loss_grads(cfg):
    """Gradients of the next-token loss w.r.t. the same (numpy-drawn) params for any remat."""
    toks = tokens()

    def loss(p):
        logits = M.Transformer(cfg).apply({"params": p}, toks[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))
    return jax.jit(jax.grad(loss))(init(cfg))


@pytest.mark.parametrize("remat,scan", [("full", True), ("dots", True), ("full", False)])
def test_remat_same_gradients(remat, scan):
    cfg = dataclasses.replace(GPT2, scan_layers=scan)
    ref = _loss_grads(cfg)
    got = _loss_grads(dataclasses.replace(cfg, remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got, ref)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref)) > 1e-3


def test_bfloat16_compute():
    cfg = dataclasses.replace(LLAMA, dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(shapes(cfg))))
    params = init(LLAMA)
    low = np.asarray(logits_fn(cfg)(params, tokens()))
    high = np.asarray(logits_fn(LLAMA)(params, tokens()))
    assert low.dtype == np.float32
    err = np.abs(low - high).max()
    assert 0 < err < 0.05 * np.abs(high).max(), err  # really computed in bf16, and close


@pytest.mark.parametrize("style,scan", [("gpt2", True), ("gpt2", False), ("llama", True),
                                        ("llama", False)])
def test_every_param_has_logical_axes(style, scan):
    cfg = dataclasses.replace(STYLES[style], scan_layers=scan)
    boxed = shapes(cfg)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
    assert len(leaves) > 10 and all(is_box(box) for _, box in leaves)
    for path, box in leaves:
        assert len(box.names) == box.value.ndim and set(box.names) <= AXIS_NAMES, (path, box)
        in_scan = scan and path[0].key == "layers"
        assert (box.names[0] == "layers") == in_scan, (path, box.names)


def test_sharded_matches_unsharded():
    """Under a 2x2x2 mesh with logical rules, the constraints apply and change nothing numerically."""
    rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("heads", "tensor"),
             ("kv_heads", "tensor"), ("mlp", "tensor"), ("embed", "fsdp"), ("length", None),
             ("head_dim", None), ("layers", None), ("norm", None))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
                             ("data", "fsdp", "tensor"))
    boxed, params = shapes(LLAMA), init(LLAMA)
    with mesh, nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        sharded = jax.device_put(params, shardings)
        f = jax.jit(lambda p, t, pos, s: M.Transformer(LLAMA).apply({"params": p}, t, pos, s))
        out = f(sharded, tokens(), POSITIONS_BT, SEGMENTS_BT)
    assert sharded["layers"]["mlp"]["w_up"].sharding.spec == jax.P(None, "fsdp", "tensor")
    np.testing.assert_allclose(out, logits_fn(LLAMA)(params, tokens(), POSITIONS_BT, SEGMENTS_BT),
                               atol=1e-5, rtol=0)


def test_dropout_uses_rng():
    cfg = dataclasses.replace(GPT2, dropout=0.5)
    params, toks = init(cfg), tokens()
    f = jax.jit(lambda seed: M.Transformer(cfg).apply({"params": params}, toks, deterministic=False,
                                                  rngs={"dropout": jax.random.key(seed)}))
    a, a2, b = f(0), f(0), f(1)
    np.testing.assert_array_equal(a, a2)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
    clean = logits_fn(cfg)(params, toks)
    assert np.abs(np.asarray(a) - np.asarray(clean)).max() > 1e-2


def test_gpt2_124m_param_count_and_flops():
    cfg = M.preset("gpt2")
    n = param_tree.count_params(shapes(cfg))
    assert n == 124_439_808
    n_non_embedding = param_tree.count_params(shapes(cfg), exclude_embeddings=True)
    assert n_non_embedding == n - (50257 + 1024) * 768
    # nanoGPT's estimate: 6 * (all params minus the position table) + 12 L d T
    n_matmul = n - 1024 * 768
    assert param_tree.flops_per_token(cfg, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024
    assert (param_tree.flops_per_token(cfg, 1024, causal_halved=True)
            == 6 * n_matmul + 6 * 12 * 768 * 1024)
    # untied LLaMA-style: the unembedding is a matmul, the input table is not
    llama = M.preset("llama")
    n_llama = param_tree.count_params(shapes(llama))
    assert param_tree.flops_per_token(llama, 0) == 6 * (n_llama - 32000 * 768)


def test_init():
    """The real initialiser: N(0, 0.02), output projections N(0, 0.02/sqrt(2L)), norms 1, biases 0;
    a fresh model predicts a near-uniform next token (loss ~ log V)."""
    cfg = dataclasses.replace(GPT2, d_model=128)
    params = nn.meta.unbox(jax.jit(M.Transformer(cfg).init)(jax.random.key(0), tokens())["params"])
    np.testing.assert_allclose(np.std(params["token_embed"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(params["layers"]["attn"]["w_q"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(params["layers"]["mlp"]["w_down"]), 0.01, rtol=0.05)
    assert (params["layers"]["attn_norm"]["scale"] == 1).all()
    assert (params["layers"]["mlp"]["b_up"] == 0).all()
    logits = logits_fn(cfg)(params, tokens())
    loss = -jnp.mean(jax.nn.log_softmax(logits))  # mean over every possible target
    assert abs(float(loss) - np.log(V)) < 0.15


def test_config_validation_and_presets():
    for bad, match in [(dict(pos_emb="alibi"), "learned"), (dict(norm="batchnorm"), "rmsnorm"),
                       (dict(mlp="relu"), "swiglu"), (dict(remat="some"), "dots"),
                       (dict(num_kv_heads=3), "multiple"), (dict(d_model=65), "divisible"),
                       (dict(dropout=1.0), "dropout")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(GPT2, **bad)
    with pytest.raises(ValueError, match="unknown preset"):
        M.preset("gpt5")
    assert M.preset("llama").resolved_d_ff == 2048 and GPT2.resolved_d_ff == 256
    assert M.preset("llama", num_heads=6).num_kv_heads == 3  # keeps 2 query heads per kv head
    assert M.preset("gpt2", num_heads=16).resolved_num_kv_heads == 16
    with pytest.raises(ValueError, match="unset"):
        M.Transformer(M.preset("gpt2", vocab_size=0)).init(jax.random.key(0), tokens())
