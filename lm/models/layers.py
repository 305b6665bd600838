"""Building blocks of the decoder: norms, rotary positions, attention and the MLP.

Shape suffixes (DESIGN principle 9): B batch, T query length, S key length, D model width,
N query heads, K key/value heads, G query heads per kv head (N = K*G), H head width,
F MLP hidden width, V vocabulary.

Every parameter is created through `logical_param`, which boxes it with its logical axis names
(nn.with_logical_partitioning). The names used here:
  "embed"     model width D            "heads"     query heads N
  "kv_heads"  key/value heads K        "head_dim"  head width H
  "mlp"       MLP hidden width F       "norm"      norm scales and biases (small, replicated)
The decoder adds "vocab", "length" (learned position table) and "layers" (the scan axis).
T5's relative position bias table (buckets, N) is boxed (None, "heads").
Norm parameters carry "norm" rather than "embed" so that the rules table can replicate them (as
MaxText does) while still sharding "embed" for FSDP.

Computation is in the config's `dtype`; parameters are stored in `param_dtype` and cast at use.
Norm statistics, rotary embeddings and attention softmax are always float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models import efficient_attention as efficient, lora
from lm.models.attention import (attention_mask, causal_block_attention, cross_attention_mask,
                                 cudnn_attention, dot_product_attention, segments_see)

Array = jax.Array

def logical_param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
                  axes: tuple[str, ...], dtype: Any) -> Array:
    """Creates a parameter boxed with logical axis names (one name per dimension). A LoRA
    adapter of that name in the "lora" collection (lm/models/lora.py) is added to it here, so
    each layer's adapted kernel exists only while that layer runs."""
    assert len(shape) == len(axes), (name, shape, axes)
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    if module.has_variable("lora", name):
        adapter = module.get_variable("lora", name)
        value = value + lora.delta(adapter["a"], adapter["b"]).astype(value.dtype)
    return value


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
    """A logical sharding constraint; a no-op unless axis rules (and a mesh) are in scope."""
    return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
    """LayerNorm (mean-centred, with optional bias) or RMSNorm, computed in float32."""
    kind: str                    # "layernorm" | "rmsnorm"
    eps: float = 1e-5
    use_bias: bool = True        # LayerNorm only; RMSNorm never has a bias
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        d = x_BTD.shape[-1]
        x = x_BTD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        scale_D = logical_param(self, "scale", nn.initializers.ones, (d,), ("norm",),
                                self.param_dtype)
        y = y * scale_D
        if self.kind == "layernorm" and self.use_bias:
            y = y + logical_param(self, "bias", nn.initializers.zeros, (d,), ("norm",),
                                  self.param_dtype)
        return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------

def rope_cos_sin(positions_BT: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """cos and sin tables, float32, shape (B, T, H), in the rotate-half layout.

    Frequency i (i < H/2) rotates the pair (x[i], x[i + H/2]): the GPT-NeoX / Hugging Face LLaMA
    layout. GGUF (llama.cpp) and Meta's original checkpoints store q/k weights for the interleaved
    layout, which rotates (x[2i], x[2i+1]); an importer must permute the rows of w_q and w_k.
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
    """Rotates each head of x by the position angles (rotate-half layout), in float32."""
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BTNH.dtype)


# ---------------------------------------------------------------------------------------------
# T5 relative position bias
# ---------------------------------------------------------------------------------------------

def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """T5's bucket of each relative position (key position - query position), in numpy.

    Offsets below num_buckets/2 (a quarter in each direction when bidirectional) get a bucket
    each; longer ones share logarithmically wider buckets up to max_distance, and everything
    farther shares the last one. Bidirectional (encoder): keys after the query use the upper
    half. Causal (decoder): every key after the query lands in bucket 0. Float64, so the bucket
    edges (offsets 16, 32, 64 for the defaults) fall exactly where the formula puts them.
    """
    n = -np.asarray(relative_position, np.int64)
    bucket = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    log_ratio = np.log(np.maximum(n, 1) / max_exact) / np.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int64)
    return bucket + np.where(n < max_exact, n, np.minimum(large, num_buckets - 1))


def relative_bucket_ids(q_positions_BT: Array, k_positions_BS: Array, bidirectional: bool,
                        num_buckets: int, max_distance: int) -> Array:
    """(B, T, S) int32 buckets of k - q, by lookup in a table of the offsets within
    +-max_distance (beyond it the bucket no longer changes)."""
    offsets = np.arange(-max_distance, max_distance + 1)
    lookup_O = jnp.asarray(relative_position_bucket(offsets, bidirectional, num_buckets,
                                                    max_distance), jnp.int32)
    relative_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
    return lookup_O[jnp.clip(relative_BTS, -max_distance, max_distance) + max_distance]


def relative_bias_table(module: nn.Module, cfg: Any, name: str = "rel_bias") -> Array:
    """The (buckets, N) table of one stack, shared by all its layers as in T5."""
    return logical_param(module, name, nn.initializers.normal(cfg.init_std),
                         (cfg.relative_buckets, cfg.num_heads), (None, "heads"),
                         jnp.dtype(cfg.param_dtype))


def relative_bias(table_RN: Array, q_positions_BT: Array, k_positions_BS: Array,
                  bidirectional: bool, max_distance: int) -> Array:
    """(B, N, T, S) float32 attention-logit bias of each query/key pair (R = buckets)."""
    bucket_BTS = relative_bucket_ids(q_positions_BT, k_positions_BS, bidirectional,
                                     table_RN.shape[0], max_distance)
    bias_BTSN = jnp.take(table_RN.astype(jnp.float32), bucket_BTS, axis=0)
    return bias_BTSN.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head / grouped-query self-attention (causal unless cfg.causal is False) with optional
    rotary positions or T5 relative position bias (rel_table_RN, the stack's shared table).

    With memory_BSD it is cross-attention (the encoder-decoder's decoder): queries from x, keys
    and values from the memory (the encoder's output), no positions, and a query sees every
    memory token of its own segment (lm/models/encoder_decoder.py).
    With decode=True keys and values go to a fixed-size cache (the "cache" collection, created by
    a first call whose T is the cache length, see lm/decode/decoding.py) and queries attend to every
    filled slot of their own segment up to their own slot.
    """
    cfg: Any  # TransformerConfig (not imported, to keep layers free of model.py)
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array | None,
                 rel_table_RN: Array | None = None, memory_BSD: Array | None = None,
                 memory_segment_ids_BS: Array | None = None) -> Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
        B, T, _ = x_BTD.shape
        init = nn.initializers.normal(cfg.init_std)
        out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        zeros = nn.initializers.zeros
        cross = memory_BSD is not None

        def project(source_BSD, name, heads, heads_axis):
            w_DXH = logical_param(self, "w_" + name, init, (D, heads, H),
                                  ("embed", heads_axis, "head_dim"), pdtype)
            y_BSXH = jnp.einsum("bsd,dxh->bsxh", source_BSD, w_DXH.astype(dtype))
            if cfg.use_bias:
                b_XH = logical_param(self, "b_" + name, zeros, (heads, H),
                                     (heads_axis, "head_dim"), pdtype)
                y_BSXH += b_XH.astype(dtype)
            return _constrain(y_BSXH, ("batch", "length", heads_axis, "head_dim"))

        q_BTNH = project(x_BTD, "q", N, "heads")
        k_BSKH = project(memory_BSD if cross else x_BTD, "k", K, "kv_heads")
        v_BSKH = project(memory_BSD if cross else x_BTD, "v", K, "kv_heads")
        if cfg.pos_emb == "rope" and not cross:
            cos_BTH, sin_BTH = rope_cos_sin(positions_BT, H, cfg.rope_base)
            q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
            k_BSKH = apply_rope(k_BSKH, cos_BTH, sin_BTH)
        bias = lambda k_positions_BS: (None if rel_table_RN is None or cross else relative_bias(
            rel_table_RN, positions_BT, k_positions_BS, not cfg.causal, cfg.relative_max_distance))

        if cross:
            if self.decode:
                raise ValueError("cross-attention keeps no cache: build it with decode=False")
            mask_BTS = cross_attention_mask(segment_ids_BT, memory_segment_ids_BS, T,
                                            memory_BSD.shape[1])
            out_BTNH = self._full(q_BTNH, k_BSKH, v_BSKH, mask_BTS, None, False)
        elif cfg.attention != "full":
            if self.decode:
                raise ValueError(f"attention={cfg.attention!r} has no KV-cache decoding; decode "
                                 "with attention='full'")
            out_BTNH = self._efficient(q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT)
        elif self.decode:
            if not cfg.causal:
                raise ValueError("decode=True (the KV cache) needs a causal model; this config "
                                 "has causal=False (an encoder)")
            k_BSKH, v_BSKH, mask_BTS, k_positions_BS = self._cached(k_BSKH, v_BSKH, positions_BT,
                                                                    segment_ids_BT)
            out_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS,
                                             bias(k_positions_BS))
        elif cfg.attention_impl == "cudnn" and rel_table_RN is None:
            out_BTNH = cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg.causal)
        else:
            mask_BTS = (None if segment_ids_BT is None and cfg.attention_impl != "xla" else
                        attention_mask(segment_ids_BT, T, cfg.causal))
            out_BTNH = self._full(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias(positions_BT),
                                  cfg.causal)
        out_BTNH = _constrain(out_BTNH, ("batch", "length", "heads", "head_dim"))

        w_o_NHD = logical_param(self, "w_o", out_init, (N, H, D), ("heads", "head_dim", "embed"),
                                pdtype)
        if self.decode:  # heads flattened: with "btnh,nhd" XLA transposed w_o on every step
            out_BTD = jnp.einsum("btf,fd->btd", out_BTNH.reshape(B, T, N * H),
                                 w_o_NHD.astype(dtype).reshape(N * H, D))
        else:  # (the flat form costs the CPU training step 4-10%)
            out_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, w_o_NHD.astype(dtype))
        if cfg.use_bias:
            out_BTD += logical_param(self, "b_o", zeros, (D,), ("embed",), pdtype).astype(dtype)
        return out_BTD

    def _full(self, q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, causal: bool) -> Array:
        """Full attention by the config's attention_impl: "xla" (the einsums above, by query
        blocks when causal) or jax.nn.dot_product_attention's XLA path ("dot_product_attention",
        and "cudnn" where the kernel cannot serve: cross-attention, T5's bias)."""
        if self.cfg.attention_impl == "xla":
            if causal and bias_BNTS is None:
                return causal_block_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
            return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS)
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS,
            mask=None if mask_BTS is None else mask_BTS[:, None], is_causal=causal)

    def _efficient(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT) -> Array:
        """The config's long-sequence attention (lm/models/efficient_attention.py)."""
        cfg = self.cfg
        args = (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg.causal)
        if cfg.attention == "sliding_window":
            B, T = q_BTNH.shape[:2]  # global: the first tokens of each row (e.g. [CLS])
            global_BT = (jnp.broadcast_to(jnp.arange(T) < cfg.global_tokens, (B, T))
                         if cfg.global_tokens else None)
            return efficient.sliding_window_attention(
                *args, window=cfg.window, global_BT=global_BT,
                max_global=min(cfg.global_tokens, T) if cfg.global_tokens else None)
        if cfg.attention == "linformer":
            init = nn.initializers.normal(1.0 / math.sqrt(cfg.linformer_len))
            e_SL, f_SL = (logical_param(self, name, init, (cfg.max_len, cfg.linformer_len),
                                        ("length", None), jnp.dtype(cfg.param_dtype))
                          for name in ("e_proj", "f_proj"))
            return efficient.linformer_attention(*args, e_SL=e_SL.astype(q_BTNH.dtype),
                                                 f_SL=f_SL.astype(q_BTNH.dtype))
        # LSH: fixed rotations per layer (a deterministic function; the Reformer redraws them)
        return efficient.lsh_attention(*args, n_hashes=cfg.lsh_hashes, n_buckets=cfg.lsh_buckets,
                                       rng_key=jax.random.key(0), chunk=cfg.lsh_chunk)

    def _cached(self, k_BTKH: Array, v_BTKH: Array, positions_BT: Array,
                segment_ids_BT: Array | None):
        """Writes this call's keys/values at the cache's index; returns the whole cache, its mask
        and (relative positions only, else None) each slot's position.

        The first call (cache not yet created) only creates it, with length T, and attends
        within the call. Slots keep their segment id (0 = empty or padding), so a query sees the
        slots of its own segment up to its own: left and right padding both fall out of this.
        """
        B, T, K, H = k_BTKH.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        created = self.has_variable("cache", "key")
        axes = ("batch", "length", "kv_heads", "head_dim")
        zeros = lambda shape, dtype: nn.with_logical_partitioning(jnp.zeros, axes[:len(shape)])(
            shape, dtype)
        key = self.variable("cache", "key", zeros, k_BTKH.shape, k_BTKH.dtype)
        value = self.variable("cache", "value", zeros, v_BTKH.shape, v_BTKH.dtype)
        segments = self.variable("cache", "segment_ids", zeros, (B, T), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        relative = self.cfg.pos_emb == "relative"
        if relative:  # T5's bias needs each slot's position (left padding shifts them)
            positions = self.variable("cache", "positions", zeros, (B, T), jnp.int32)
        if not created:
            return (k_BTKH, v_BTKH, attention_mask(segment_ids_BT, T),
                    positions_BT if relative else None)
        start = index.value
        key.value = _constrain(jax.lax.dynamic_update_slice(
            nn.meta.unbox(key.value), k_BTKH, (0, start, 0, 0)), axes)
        value.value = _constrain(jax.lax.dynamic_update_slice(
            nn.meta.unbox(value.value), v_BTKH, (0, start, 0, 0)), axes)
        segments.value = jax.lax.dynamic_update_slice(
            nn.meta.unbox(segments.value), segment_ids_BT.astype(jnp.int32), (0, start))
        if relative:
            positions.value = jax.lax.dynamic_update_slice(
                nn.meta.unbox(positions.value), positions_BT.astype(jnp.int32), (0, start))
        index.value = start + T
        S = segments.value.shape[1]
        causal_TS = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]
        return (key.value, value.value,
                causal_TS[None] & segments_see(segment_ids_BT, segments.value),
                positions.value if relative else None)


class Mlp(nn.Module):
    """GELU MLP (GPT-2: tanh-approximate GELU; BERT: exact erf GELU) or SwiGLU (LLaMA: silu(x W_gate) * x W_up)."""
    cfg: Any

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, F = cfg.d_model, cfg.resolved_d_ff
        init = nn.initializers.normal(cfg.init_std)
        out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        zeros = nn.initializers.zeros

        def up(name):
            w_DF = logical_param(self, "w_" + name, init, (D, F), ("embed", "mlp"), pdtype)
            h_BTF = jnp.einsum("btd,df->btf", x_BTD, w_DF.astype(dtype))
            if cfg.use_bias:
                b_F = logical_param(self, "b_" + name, zeros, (F,), ("mlp",), pdtype)
                h_BTF += b_F.astype(dtype)
            return _constrain(h_BTF, ("batch", "length", "mlp"))

        if cfg.mlp == "swiglu":
            h_BTF = nn.silu(up("gate")) * up("up")
        else:
            h_BTF = nn.gelu(up("up"), approximate=cfg.mlp == "gelu")  # gelu_exact: erf
        h_BTF = _constrain(h_BTF, ("batch", "length", "mlp"))
        w_down_FD = logical_param(self, "w_down", out_init, (F, D), ("mlp", "embed"), pdtype)
        out_BTD = jnp.einsum("btf,fd->btd", h_BTF, w_down_FD.astype(dtype))
        if cfg.use_bias:
            out_BTD += logical_param(self, "b_down", zeros, (D,), ("embed",), pdtype).astype(dtype)
        return out_BTD
