"""Long-sequence attention (lm/models/efficient_attention.py) against full attention and its own rules.

Small shapes (T <= 64, head width 16) keep the whole file to a few seconds on 2 cores.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.config import ConfigError
from lm.models import efficient_attention as ea
from lm.models import attention

B, T, N, K, H = 2, 37, 4, 2, 16  # grouped-query: 2 query heads per kv head; T not a block multiple
# Two documents and 2 padding tokens in row 0, one document in row 1.
SEGMENTS_BT = jnp.array([[1] * 20 + [2] * 15 + [0] * 2, [1] * T], jnp.int32)
GLOBAL_BT = jnp.zeros((B, T), bool).at[0, [3, 25]].set(True).at[1, [5, 30]].set(True)


# Jitted once per static setting: op-by-op dispatch of these many small ops is far slower.
FULL = jax.jit(ea.full_attention, static_argnames=("causal",))
SLIDING = jax.jit(ea.sliding_window_attention, static_argnames=("causal", "window", "max_global"))
LSH = jax.jit(ea.lsh_attention, static_argnames=("causal", "n_hashes", "n_buckets", "chunk"))


def qkv(seed=0, t=T, h=H):
    """Random q, k, v (numpy's generator: eager jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, t, heads, h)), jnp.float32)
                 for heads in (N, K, K))


def outputs_and_grads(fn, q, k, v, cotangent):
    """(fn(q, k, v), and its gradients in q, k and v for the given output cotangent)."""
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(cotangent))


def longformer_mask(window, causal, global_BT):
    """The dense (B, T, S) mask sliding_window_attention must match, built the obvious way."""
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    allowed_BTS = (jnp.abs(i - j) <= window)[None] | global_BT[:, None, :] | global_BT[:, :, None]
    return attention.attention_mask(SEGMENTS_BT, T, causal) & allowed_BTS


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_variants_table():
    assert set(ea.ATTENTION_VARIANTS) == {"full", "sliding_window", "linformer", "lsh"}
    q, k, v = qkv()
    reference = jax.jit(lambda q, k, v: attention.dot_product_attention(
        q, k, v, attention.attention_mask(SEGMENTS_BT, T, True)))
    assert_close(FULL(q, k, v, SEGMENTS_BT, True), reference(q, k, v), atol=0)


# --- sliding window -------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("global_BT", [None, GLOBAL_BT], ids=["local", "global"])
def test_window_covering_sequence_is_full_attention(causal, global_BT):
    q, k, v = qkv()
    for window in (T - 1, 64):
        out = SLIDING(q, k, v, SEGMENTS_BT, causal, window=window, global_BT=global_BT,
                      max_global=2)
        assert_close(out, FULL(q, k, v, SEGMENTS_BT, causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 4, 7])
def test_window_matches_dense_longformer_mask(causal, window):
    q, k, v = qkv(1)
    for global_BT in (jnp.zeros((B, T), bool), GLOBAL_BT):
        out = SLIDING(q, k, v, SEGMENTS_BT, causal, window=window, global_BT=global_BT,
                      max_global=2)
        ref = attention.dot_product_attention(q, k, v, longformer_mask(window, causal, global_BT))
        assert_close(out, ref)


@pytest.mark.parametrize("causal", [True, False])
def test_global_token_output_is_full_attention(causal):
    q, k, v = qkv(2)
    out = SLIDING(q, k, v, SEGMENTS_BT, causal, window=2, global_BT=GLOBAL_BT, max_global=2)
    full = FULL(q, k, v, SEGMENTS_BT, causal)
    b, t = np.nonzero(np.asarray(GLOBAL_BT))
    assert_close(out[b, t], full[b, t])
    assert np.abs(np.asarray(out - full)).max() > 1e-2  # the other tokens do differ


def test_far_tokens_do_not_interact():
    """Gradients of one output reach only keys within the window and the global tokens."""
    q, k, v = qkv(3)
    window, t = 3, 18
    global_BT = jnp.zeros((B, T), bool).at[:, 2].set(True)

    def out_t(q, k, v):
        out = ea.sliding_window_attention(q, k, v, None, False, window=window, global_BT=global_BT,
                                          max_global=1)
        return jnp.sum(out[:, t])

    out_t = jax.jit(out_t)
    grads = jax.jit(jax.grad(out_t, argnums=(0, 1, 2)))(q, k, v)
    reach = np.abs(np.asarray(grads[1])).sum(axis=(0, 2, 3)) + np.abs(np.asarray(grads[2])).sum(
        axis=(0, 2, 3))
    near = set(range(t - window, t + window + 1)) | {2}
    assert all(reach[s] > 0 for s in near)
    assert all(reach[s] == 0 for s in range(T) if s not in near)
    assert np.abs(np.asarray(grads[0])).sum(axis=(0, 2, 3))[t] > 0
    assert np.abs(np.asarray(grads[0])).sum(axis=(0, 2, 3))[np.arange(T) != t].max() == 0

    # And a perturbation far away (not global) leaves the output untouched.
    far = t + window + 5
    bumped = [x.at[:, far].add(10.0) for x in (q, k, v)]
    assert out_t(*bumped) == out_t(q, k, v)


def test_sliding_window_max_global():
    """Outside jit the number of global tokens is read from global_BT; under jit it is needed."""
    q, k, v = qkv(4)
    # Closed over, global_BT is a constant while tracing, so M = 2 is read from it.
    inferred = jax.jit(lambda q, k, v: ea.sliding_window_attention(
        q, k, v, SEGMENTS_BT, True, window=4, global_BT=np.asarray(GLOBAL_BT)))
    assert_close(inferred(q, k, v),
                 SLIDING(q, k, v, SEGMENTS_BT, True, window=4, global_BT=GLOBAL_BT, max_global=3))
    with pytest.raises(ValueError, match="max_global"):
        jax.jit(functools.partial(ea.sliding_window_attention, window=4))(
            q, k, v, SEGMENTS_BT, global_BT=GLOBAL_BT)


# --- Linformer ------------------------------------------------------------------------------

def test_linformer_identity_projection_is_full_attention():
    q, k, v = qkv(5)
    eye_SL = jnp.eye(T)
    out = jax.jit(ea.linformer_attention)(q, k, v, None, e_SL=eye_SL, f_SL=eye_SL)
    assert_close(out, FULL(q, k, v, None, False))


def test_linformer_projects_and_ignores_padding():
    S_max, L, t = 64, 16, 48
    q, k, v = qkv(6, t)
    rng = np.random.default_rng(7)
    e_SL, f_SL = (jnp.asarray(rng.standard_normal((S_max, L)) / np.sqrt(L), jnp.float32)
                  for _ in range(2))
    segments_BT = jnp.array([[1] * 40 + [0] * 8, [1] * t], jnp.int32)
    f = jax.jit(functools.partial(ea.linformer_attention, causal=False))
    out = f(q, k, v, segments_BT, e_SL=e_SL, f_SL=f_SL)
    assert out.shape == (B, t, N, H) and np.isfinite(np.asarray(out)).all()
    bumped = f(q, k.at[0, 40:].add(5.0), v.at[0, 40:].add(5.0), segments_BT, e_SL=e_SL, f_SL=f_SL)
    assert_close(bumped, out, atol=0)


def test_linformer_refuses_causal():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="future"):
        ea.linformer_attention(q, k, v, None, True, e_SL=jnp.eye(T), f_SL=jnp.eye(T))


# --- LSH ------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_lsh_one_bucket_one_chunk_is_full_attention(causal):
    q, k, v = qkv(8)
    for n_hashes in (1, 3):  # several identical rounds must not count a key twice
        out = LSH(q, k, v, SEGMENTS_BT, causal, n_hashes=n_hashes, n_buckets=1,
                  rng_key=jax.random.key(0), chunk=T)
        assert_close(out, FULL(q, k, v, SEGMENTS_BT, causal))


def clustered_qkv(seed, t=64, h=32, clusters=8, noise=0.3):
    """One head; each token's query and key sit near its cluster's centre, so full attention
    is (almost) an average over the token's cluster, which hashing can find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, h))
    centres *= 4.0 * h ** 0.25 / np.linalg.norm(centres, axis=-1, keepdims=True)
    cluster_T = rng.integers(0, clusters, t)
    q = centres[cluster_T] + noise * rng.standard_normal((t, h))
    k = centres[cluster_T] + noise * rng.standard_normal((t, h))
    v = rng.standard_normal((t, h))
    return tuple(jnp.asarray(x[None, :, None], jnp.float32) for x in (q, k, v))


@pytest.mark.parametrize("causal", [True, False])
def test_lsh_more_hashes_approximate_full_attention(causal):
    # Seen: 1 hash 0.44-0.89 relative error, 8 hashes 0.003-0.021.
    for seed in range(3):
        q, k, v = clustered_qkv(seed)
        full = FULL(q, k, v, None, causal)
        error = {}
        for n_hashes in (1, 8):
            out = LSH(q, k, v, None, causal, n_hashes=n_hashes, n_buckets=8,
                      rng_key=jax.random.key(100 + seed), chunk=16)
            error[n_hashes] = float(jnp.linalg.norm(out - full) / jnp.linalg.norm(full))
        assert error[8] < 0.1 and error[8] < error[1] / 4, (seed, error)


def test_lsh_causal_gradients_stay_in_the_past():
    q, k, v = qkv(9)
    t = 20

    def past(q, k, v):
        out = ea.lsh_attention(q, k, v, None, True, n_hashes=2, n_buckets=4,
                               rng_key=jax.random.key(1), chunk=8)
        return jnp.sum(out[:, :t])

    grads = jax.jit(jax.grad(past, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.abs(np.asarray(g[:, t:])).max() == 0
    assert np.abs(np.asarray(grads[2][:, :t])).max() > 0


def test_lsh_rejects_odd_buckets():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="even"):
        ea.lsh_attention(q, k, v, None, True, n_hashes=1, n_buckets=3,
                         rng_key=jax.random.key(0), chunk=8)


@pytest.mark.parametrize("variant", [
    dict(attention="sliding_window", window=32),                        # window covers all
    dict(attention="lsh", lsh_hashes=1, lsh_buckets=1, lsh_chunk=32),   # one bucket, one chunk
])
def test_model_attention_choice_reduces_to_full_attention(variant):
    """The same encoder with the variant as its attention config equals full attention when the
    variant's own limits cover the whole (packed, padded) sequence."""
    from lm.models import transformer as model_lib
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
    segments = jnp.ones((2, 32), jnp.int32).at[1, 20:].set(0).at[0, 16:].set(2)
    full = model_lib.Transformer(model_lib.preset("tiny-bert"))
    params = full.init(jax.random.key(0), tokens)["params"]
    other = model_lib.Transformer(model_lib.preset("tiny-bert", **variant))
    np.testing.assert_allclose(other.apply({"params": params}, tokens, None, segments),
                               full.apply({"params": params}, tokens, None, segments), atol=1e-5)


def test_model_attention_choices_train_and_refuse_what_they_cannot_do():
    from lm.models import transformer as model_lib
    tokens = jnp.zeros((1, 16), jnp.int32)
    cfg = model_lib.preset("tiny-bert", attention="linformer", linformer_len=8)
    params = model_lib.Transformer(cfg).init(jax.random.key(0), tokens)["params"]
    assert params["layers"]["attn"]["e_proj"].value.shape == (2, 128, 8)  # per layer, max_len x L
    with pytest.raises(ValueError, match="causal=False"):
        model_lib.preset("tiny-gpt2", attention="linformer")
    with pytest.raises(ValueError, match="KV-cache"):
        model_lib.Transformer(model_lib.preset("tiny-gpt2", attention="sliding_window")).init(
            jax.random.key(0), tokens, decode=True)
    with pytest.raises(ValueError, match="attention="):
        model_lib.preset("tiny-gpt2", attention="sparse")


# --- causal attention by query blocks (the CPU's XLA path) -----------------------------------

@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_causal_blocks_equal_full_attention(dtype, atol, blocks):
    """Same outputs and gradients as the unblocked XLA path, packed and padded rows, GQA
    (bfloat16: within 2e-2, absolute or relative, one rounding of a value near 4 is 0.03)."""
    t = 32
    segments_BT = jnp.array([[1] * 9 + [2] * 20 + [0] * 3, [1] * t], jnp.int32)
    mask_BTT = attention.attention_mask(segments_BT, t, True)
    q, k, v = (x.astype(dtype) for x in qkv(5, t))
    cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), dtype)

    blocked = jax.jit(lambda: outputs_and_grads(
        lambda q, k, v: attention.causal_block_attention(q, k, v, mask_BTT, blocks=blocks),
        q, k, v, cotangent))()
    full = jax.jit(lambda: outputs_and_grads(
        lambda q, k, v: attention.dot_product_attention(q, k, v, mask_BTT),
        q, k, v, cotangent))()
    for got, want in zip(blocked, full):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("mask_rows", [B, 1], ids=["mask_per_row", "mask_broadcast"])
def test_single_query_attention_equals_dot_product_attention(dtype, atol, mask_rows):
    """A decode step's attention by multiplies and sums equals the matmul path: grouped-query
    heads, cache slots that are empty or padding masked out, a mask of one row broadcast."""
    q, k, v = (x.astype(dtype) for x in qkv(8))
    q_B1NH = q[:, :1]
    seen_BS = np.random.default_rng(9).random((mask_rows, T)) < 0.6
    seen_BS[:, 0] = True  # every query sees at least one slot (its own, in decoding)
    mask_B1S = jnp.asarray(seen_BS)[:, None]
    got = jax.jit(attention.single_query_attention)(q_B1NH, k, v, mask_B1S)
    # the matmul path: dot_product_attention sends a single query to single_query_attention,
    # so the query is asked twice and the first answer kept
    want = jax.jit(attention.dot_product_attention)(
        jnp.concatenate([q_B1NH] * 2, axis=1), k, v, jnp.concatenate([mask_B1S] * 2, axis=1))[:, :1]
    assert got.shape == want.shape == (B, 1, N, H) and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=atol)


def test_causal_blocks_default_and_refusal():
    assert attention.causal_blocks(256) == 4 and attention.causal_blocks(64) == 1
    assert attention.causal_blocks(4096) == attention.MAX_BLOCKS
    assert attention.causal_blocks(200) == 1  # 3 blocks of 64 do not divide it
    q, k, v = qkv(0, 30)
    with pytest.raises(ValueError, match="do not divide"):
        attention.causal_block_attention(q, k, v, attention.attention_mask(None, 30), blocks=4)


# --- cuDNN's packed segments (the kernel itself needs a GPU) ---------------------------------

def test_packed_segments_rebuild_the_rows():
    """Each run of equal ids (padding included, as attention_mask treats it) is one segment;
    the lengths and starts cuDNN receives rebuild every row, and -1 fills the rest."""
    segments_BT = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1] * 8, [1, 2, 3, 4, 5, 6, 7, 8]])
    lengths_BM, starts_BM1 = (np.asarray(x) for x in attention.packed_segments(
        jnp.asarray(segments_BT)))
    assert lengths_BM.shape == (3, 8) and starts_BM1.shape == (3, 9)
    for row, lengths, starts in zip(segments_BT, lengths_BM, starts_BM1):
        used = lengths[lengths > 0]
        assert (lengths[len(used):] == -1).all() and (starts[len(used):] == -1).all()
        rebuilt = np.concatenate([np.full(n, row[s]) for s, n in zip(starts, used)])
        np.testing.assert_array_equal(rebuilt, row)
        assert (np.diff(starts[:len(used)]) == used[:-1]).all()


@pytest.mark.parametrize("refusal,advice", [
    (RuntimeError("cuDNN is not detected."), "needs an NVIDIA GPU.*attention_impl=xla"),
    (NotImplementedError("Packed layout requires a GPU with at least Hopper architecture."),
     "cannot run this step.*document_masking=false")])
def test_cudnn_refusals_are_one_clear_error(monkeypatch, refusal, advice):
    """What jax's cuDNN entry raises without a GPU, or on a GPU that cannot run the packed
    layout, becomes one line that says what to use instead (on any machine: the entry is
    replaced by one that refuses)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    def refuse(*args, **kwargs):
        raise refusal
    monkeypatch.setattr(cudnn, "dot_product_attention", refuse)
    q, k, v = qkv()
    with pytest.raises(ConfigError, match=advice):
        attention.cudnn_attention(q, k, v, SEGMENTS_BT, True)


# --- cuDNN's kernel itself: runs where jax sees an NVIDIA GPU (JAX_PLATFORMS=cuda), else skipped

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu",
                            reason="cuDNN's flash kernel needs an NVIDIA GPU")


@on_gpu
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed_padded"])
def test_cudnn_equals_the_xla_path_on_a_gpu(packed):
    """Outputs and gradients of cuDNN's kernel on bfloat16 inputs equal XLA's attention in
    float32 on the same inputs within 2e-2 (absolute or relative), grouped-query heads; packed:
    two documents and padding in one row, reaching the kernel as segments."""
    t = 256
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(7, t, h=64))
    cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.bfloat16)
    segments_BT = (jnp.array([[1] * 100 + [2] * 140 + [0] * 16, [1] * t], jnp.int32)
                   if packed else None)
    mask_BTT = attention.attention_mask(segments_BT, t, True)

    f32 = lambda x: x.astype(jnp.float32)
    want = jax.jit(lambda: outputs_and_grads(
        lambda q, k, v: attention.dot_product_attention(q, k, v, mask_BTT),
        f32(q), f32(k), f32(v), f32(cotangent)))()
    got = jax.jit(lambda: outputs_and_grads(
        lambda q, k, v: attention.cudnn_attention(q, k, v, segments_BT, True),
        q, k, v, cotangent))()
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=2e-2, rtol=2e-2, err_msg=name)


@on_gpu
def test_cudnn_training_loss_and_gradients_equal_xla_on_a_gpu():
    """A bfloat16 LLaMA-style model on packed, padded windows: the causal-LM loss and every
    parameter's gradient with cuDNN attention equal those with XLA's attention (the loss within
    1e-2 relative, each gradient's difference under 3e-2 of its norm)."""
    from lm.models import transformer as model_lib
    from lm.objectives.causal_lm import CausalLMTask
    t = 128
    rng = np.random.default_rng(3)
    tokens_BT1 = jnp.asarray(rng.integers(0, 256, (2, t + 1)), jnp.int32)
    segments_BT1 = jnp.array([[1] * 50 + [2] * 70 + [0] * 9, [1] * (t + 1)], jnp.int32)
    batch = {"tokens": tokens_BT1, "segment_ids": segments_BT1}

    def loss_and_grads(impl):
        cfg = model_lib.preset("tiny-llama", dtype="bfloat16", attention_impl=impl,
                               scan_layers=False)
        task = CausalLMTask(cfg, t, True)
        params = task.init_params(jax.random.key(0))

        def mean_loss(params):
            sums = task.loss(params, batch, jax.random.key(1), False)
            return sums.loss / sums.weight
        return jax.jit(jax.value_and_grad(mean_loss))(params)

    loss_xla, grads_xla = loss_and_grads("xla")
    loss_cudnn, grads_cudnn = loss_and_grads("cudnn")
    np.testing.assert_allclose(float(loss_cudnn), float(loss_xla), rtol=1e-2)
    for (path, g_cudnn), g_xla in zip(jax.tree_util.tree_leaves_with_path(grads_cudnn),
                                      jax.tree_util.tree_leaves(grads_xla)):
        g_cudnn, g_xla = np.asarray(g_cudnn, np.float32), np.asarray(g_xla, np.float32)
        assert np.linalg.norm(g_cudnn - g_xla) <= 3e-2 * np.linalg.norm(g_xla) + 1e-6, path
