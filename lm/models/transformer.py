"""The transformer: config, presets and the Flax module.

One module covers the GPT-2 family (learned positions, LayerNorm, GELU, biases, tied embeddings),
the LLaMA family (RoPE, RMSNorm, SwiGLU, no biases, untied, grouped-query attention) and, with
causal=False, BERT-style encoders (post-norm, embedding LayerNorm, token types, erf GELU; ALBERT's
factorised embeddings and shared layers as options); each choice is a config field. Building
blocks live in lm/models/layers.py. `Transformer` is the decoder and, with causal=False, the
encoder. The
encoder-decoder (T5, lm/models/encoder_decoder.py) runs the same blocks through `run_blocks`, its
decoder's blocks with a cross-attention sublayer.

Parameters (`Transformer(cfg).init(rng, tokens_BT)["params"]`), with their logical axis names:
  token_embed  (V, D)        ("vocab", "embed")       (V, E) and embed_proj (E, D) with embed_dim E
  type_embed   (types, D)    (None, "embed")                          type_vocab_size > 0 only
  embed_norm/{scale,bias}                                             embed_norm only
  pos_embed    (max_len, D)  ("length", "embed")                      pos_emb == "learned" only
  rel_bias     (buckets, N)  (None, "heads"), one for all layers      pos_emb == "relative" only
  layers/...   every block parameter with a leading ("layers",) axis  scan_layers=True
  layers_{i}/... one subtree per block                                scan_layers=False
  layers_shared/... the one block every layer runs                    share_layers=True
     attn_norm/{scale,bias}  ("norm",)                                bias: layernorm + use_bias
     attn/w_q (D, N, H) ("embed", "heads", "head_dim");  b_q (N, H) ("heads", "head_dim")
     attn/w_k, w_v (D, K, H) ("embed", "kv_heads", "head_dim");  b_k, b_v (K, H)
     attn/w_o (N, H, D) ("heads", "head_dim", "embed");  b_o (D,) ("embed",)
     cross_attn_norm/..., cross_attn/... as attn                      encoder-decoder's decoder
     mlp_norm/{scale,bias}
     mlp/w_up (D, F) ("embed", "mlp"), b_up (F,) ("mlp",); swiglu adds w_gate/b_gate likewise
     mlp/w_down (F, D) ("mlp", "embed"), b_down (D,) ("embed",)
  final_norm/{scale,bias}                                             norm_position="pre" only
  unembed      (D, V)        ("embed", "vocab")                       tie_embeddings=False only
`stack_layers` / `unstack_layers` (lm/models/param_tree.py, with the parameter and FLOP counts)
convert between the two layer layouts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core.config import ConfigError, check_ranges
from lm.models import layers

Array = jax.Array

POS_EMBS = ("learned", "rope", "relative")  # relative: T5's bucketed bias (lm/models/layers.py)
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "gelu_exact", "swiglu")
REMATS = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn")
ATTENTIONS = ("full", "sliding_window", "linformer", "lsh")  # lm/models/efficient_attention.py
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a transformer. Fields left None are derived (resolved_*).

    causal=True is a decoder (GPT, LLaMA); causal=False a bidirectional encoder (BERT)."""
    vocab_size: int                   # 0 = not yet known (set from the tokenizer before init)
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int | None = None   # None -> num_heads (MHA); fewer -> grouped-query attention
    head_dim: int | None = None       # None -> d_model // num_heads
    d_ff: int | None = None           # None -> 4*d_model (gelu); 8/3*d_model up to k*256 (swiglu)
    max_len: int = 1024
    pos_emb: str = "learned"          # "learned" | "rope" | "relative" (T5's bias)
    rope_base: float = 10000.0
    relative_buckets: int = 32        # relative: buckets of key - query offsets (half per side
    relative_max_distance: int = 128  # in an encoder); offsets beyond this share the last one
    norm: str = "layernorm"           # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"        # "pre" (x + f(norm(x)), final norm) | "post" (BERT)
    embed_norm: bool = False          # a norm on the embeddings (BERT)
    causal: bool = True               # False: every token sees its whole segment (encoders)
    type_vocab_size: int = 0          # > 0: token-type (sentence A/B) embeddings (BERT)
    embed_dim: int | None = None      # ALBERT: tokens embed in this width, projected to d_model
    share_layers: bool = False        # ALBERT: one block's parameters used by every layer
    mlp: str = "gelu"                 # "gelu" (tanh, GPT-2) | "gelu_exact" (erf, BERT) | "swiglu"
    use_bias: bool = True             # biases of every projection and of LayerNorm
    tie_embeddings: bool = True
    dropout: float = 0.0              # on embeddings and residual branches (not attention probs)
    dtype: str = "float32"            # compute dtype; "bfloat16" for mixed precision
    param_dtype: str = "float32"
    remat: str = "none"               # "none" | "full" (save nothing) | "dots" (save projections)
    scan_layers: bool = True          # nn.scan over layers (stacked params) vs a Python loop
    init_std: float = 0.02            # output projections use init_std / sqrt(2 * num_layers)
    # "xla" (einsums; causal by query blocks) | "dot_product_attention" (jax.nn's XLA path) |
    # "cudnn" (NVIDIA GPUs: the fused flash kernel, packed rows as segments)
    attention_impl: str = "xla"
    # Rows per chunk of the training loss's vocabulary projection (core/losses.py: no B x T x V
    # logits); 0 computes the full logits. A training-time field, like dtype and remat.
    loss_chunk: int = 0
    # Attention pattern for long sequences (lm/models/efficient_attention.py); "full" uses attention_impl.
    attention: str = "full"           # "full" | "sliding_window" | "linformer" | "lsh"
    window: int = 256                 # sliding_window: keys this far on each side
    global_tokens: int = 0            # sliding_window: the first n tokens of each row are global
    linformer_len: int = 256          # linformer: keys/values projected to this many rows
    lsh_hashes: int = 4               # lsh: hash rounds, buckets, chunk length
    lsh_buckets: int = 32
    lsh_chunk: int = 64

    def __post_init__(self):
        def choice(field, valid):
            if getattr(self, field) not in valid:
                raise ValueError(f"{field}={getattr(self, field)!r}; expected one of {valid}")
        choice("pos_emb", POS_EMBS)
        choice("norm", NORMS)
        choice("norm_position", NORM_POSITIONS)
        choice("mlp", MLPS)
        choice("remat", REMATS)
        choice("attention_impl", ATTENTION_IMPLS)
        choice("attention", ATTENTIONS)
        for field in ("window", "linformer_len", "lsh_hashes", "lsh_buckets", "lsh_chunk"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.relative_buckets < 4 or self.relative_buckets % 2:
            raise ValueError(f"relative_buckets must be even and >= 4, got {self.relative_buckets}")
        if self.relative_max_distance <= self.relative_buckets // 2:
            raise ValueError(f"relative_max_distance ({self.relative_max_distance}) must exceed "
                             f"relative_buckets // 2 ({self.relative_buckets // 2}), where the "
                             "logarithmic buckets begin")
        if self.pos_emb == "relative" and self.attention != "full":
            raise ValueError(f"pos_emb='relative' adds a bias to full attention scores; "
                             f"attention={self.attention!r} has none: use attention='full'")
        if self.attention == "linformer" and self.causal:
            raise ValueError("attention='linformer' mixes future positions into every key: it "
                             "needs causal=False (an encoder)")
        choice("dtype", DTYPES)
        choice("param_dtype", DTYPES)
        if self.embed_dim is not None and self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive or None, got {self.embed_dim}")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be positive (or 0 = unset), got {self.vocab_size}")
        for field in ("num_layers", "d_model", "num_heads", "max_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        for field in ("num_kv_heads", "head_dim", "d_ff"):
            if getattr(self, field) is not None and getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive or None, got {getattr(self, field)}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim explicitly")
        if self.num_heads % self.resolved_num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.pos_emb == "rope" and self.resolved_head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.resolved_head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def resolved_num_kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # LLaMA: 2/3 of 4*d_model, rounded up to a multiple of 256
            return 256 * math.ceil(int(8 * self.d_model / 3) / 256)
        return 4 * self.d_model

    @property
    def d_attn(self) -> int:
        """Width of the concatenated query heads, N * H."""
        return self.num_heads * self.resolved_head_dim


_GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True)
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False)
# BERT (Devlin et al. 2019): a bidirectional encoder, post-norm, LayerNorm on the embeddings.
BERT_STYLE = dict(pos_emb="learned", norm="layernorm", norm_position="post", embed_norm=True,
                  causal=False, mlp="gelu_exact", use_bias=True, tie_embeddings=True,
                  norm_eps=1e-12)

PRESETS: dict[str, TransformerConfig] = {
    # GPT-2 (Radford et al. 2019); vocab 50257 as released (use vocab_size=50304 for speed).
    "gpt2": TransformerConfig(50257, 12, 768, 12, max_len=1024, **_GPT2),            # 124M
    "gpt2-medium": TransformerConfig(50257, 24, 1024, 16, max_len=1024, **_GPT2),    # 355M
    "gpt2-large": TransformerConfig(50257, 36, 1280, 20, max_len=1024, **_GPT2),     # 774M
    "gpt2-xl": TransformerConfig(50257, 48, 1600, 25, max_len=1024, **_GPT2),        # 1.56B
    # LLaMA-style at GPT-2-small width: 12 query heads in 6 groups (2 per kv head), d_ff 2048.
    "llama": TransformerConfig(32000, 12, 768, 12, num_kv_heads=6, max_len=2048, **_LLAMA),
    # SmolLM2-135M (the GGUF weights in DESIGN.md): LLaMA architecture with tied embeddings.
    "smollm2-135m": TransformerConfig(
        49152, 30, 576, 9, num_kv_heads=3, d_ff=1536, max_len=8192, rope_base=100000.0,
        **{**_LLAMA, "tie_embeddings": True}),
    "bert-base": TransformerConfig(30522, 12, 768, 12, max_len=512, type_vocab_size=2,
                                   **BERT_STYLE),                                   # 110M
    # Tiny models for tests and demos.
    "tiny-gpt2": TransformerConfig(256, 2, 64, 4, max_len=128, **_GPT2),
    "tiny-llama": TransformerConfig(256, 2, 64, 4, num_kv_heads=2, max_len=128, **_LLAMA),
    "tiny-bert": TransformerConfig(256, 2, 64, 4, max_len=128, **BERT_STYLE),
}


def preset(style: str, **overrides: Any) -> TransformerConfig:
    """A named preset with fields replaced, e.g. preset("gpt2", vocab_size=50304, dtype="bfloat16").

    Overriding num_heads alone keeps the preset's query heads per kv head (for GQA presets), so
    preset("llama", num_heads=4) has 2 kv heads.
    """
    if style not in PRESETS:
        raise ValueError(f"unknown preset {style!r}; expected one of {sorted(PRESETS)}")
    base = PRESETS[style]
    if "num_heads" in overrides and "num_kv_heads" not in overrides and base.num_kv_heads:
        group = base.num_heads // base.num_kv_heads
        if overrides["num_heads"] % group:
            raise ValueError(f"preset {style!r} groups {group} query heads per kv head, which does "
                             f"not divide num_heads={overrides['num_heads']}; set num_kv_heads")
        overrides["num_kv_heads"] = overrides["num_heads"] // group
    return dataclasses.replace(base, **overrides)


class Block(nn.Module):
    """Transformer block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Post-norm (BERT):
    norm(x + attn(x)), then norm(x + mlp(x)). Given a memory (the encoder's output) a
    cross-attention sublayer sits between the two, as in T5's and the original Transformer's
    decoder."""
    cfg: TransformerConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array | None,
                 rel_table_RN: Array | None = None, memory_BSD: Array | None = None,
                 memory_segment_ids_BS: Array | None = None):
        cfg = self.cfg
        norm = lambda name: layers.Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, jnp.dtype(cfg.dtype),
                                        jnp.dtype(cfg.param_dtype), name=name)
        drop = nn.Dropout(cfg.dropout)
        pre = cfg.norm_position == "pre"
        sublayers = [(layers.Attention(cfg, self.decode, name="attn"), "attn_norm",
                      (positions_BT, segment_ids_BT, rel_table_RN))]
        if memory_BSD is not None:
            sublayers.append((layers.Attention(cfg, name="cross_attn"), "cross_attn_norm",
                              (positions_BT, segment_ids_BT, None, memory_BSD,
                               memory_segment_ids_BS)))
        sublayers.append((layers.Mlp(cfg, name="mlp"), "mlp_norm", ()))
        for sublayer, name, args in sublayers:
            h_BTD = sublayer(norm(name)(x_BTD) if pre else x_BTD, *args)
            x_BTD = x_BTD + drop(h_BTD, deterministic=self.deterministic)
            if not pre:
                x_BTD = norm(name)(x_BTD)
            x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        return x_BTD, None  # (carry, per-layer output) as nn.scan expects


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, V), float32: next-token logits for a causal config,
    per-token (masked-LM) logits for an encoder."""
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
                 segment_ids_BT: Array | None = None, deterministic: bool = True,
                 decode: bool = False, logits_at_BK: Array | None = None,
                 token_types_BT: Array | None = None, return_hidden: bool = False,
                 with_hidden: bool = False, added_BTD: Array | None = None) -> Array:
        """positions default to arange(T). segment_ids (0 = padding), if given, restrict attention:
        token i attends to j iff j <= i and seg[i] == seg[j]. Dropout draws from the "dropout" rng
        collection when deterministic is False. decode=True reads and writes the KV cache
        (mutable "cache" collection; see lm/decode/decoding.py). logits_at_BK (indices into T) returns
        logits (B, K, V) at those positions only: scorers and prefill need few of them, and the
        vocabulary projection is the largest matmul of a small model. token_types (default 0)
        index the type embeddings of configs with type_vocab_size > 0. return_hidden returns
        the final hidden states (B, T, D) instead of logits (encoders' pooled embeddings);
        with_hidden returns both, (logits, hidden): a value head reads the policy's trunk.
        added_BTD is added to the input embeddings: what a token carries besides its id (the
        generalist's image patches and positions inside an observation, multimodal/model.py)."""
        cfg = self.cfg
        if cfg.vocab_size == 0:
            raise ValueError("TransformerConfig.vocab_size is 0 (unset); set it before init")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T = tokens_BT.shape
        V, D = cfg.vocab_size, cfg.d_model
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        init = nn.initializers.normal(cfg.init_std)

        # E = D, or ALBERT's factorisation: a V x E table and an E x D projection.
        E = cfg.embed_dim or D
        embed_VE = layers.logical_param(self, "token_embed", init, (V, E),
                                        ("vocab", None if cfg.embed_dim else "embed"), pdtype)
        x_BTD = jnp.take(embed_VE, tokens_BT, axis=0).astype(dtype)  # E = D unless factorised
        if cfg.embed_dim:
            proj_ED = layers.logical_param(self, "embed_proj", init, (E, D), (None, "embed"),
                                           pdtype)
            x_BTD = x_BTD @ proj_ED.astype(dtype)
        if cfg.pos_emb == "learned":
            pos_LD = layers.logical_param(self, "pos_embed", init, (cfg.max_len, D),
                                          ("length", "embed"), pdtype)
            x_BTD = x_BTD + jnp.take(pos_LD, positions_BT, axis=0).astype(dtype)
        if cfg.type_vocab_size:
            type_YD = layers.logical_param(self, "type_embed", init, (cfg.type_vocab_size, D),
                                           (None, "embed"), pdtype)
            if token_types_BT is None:
                token_types_BT = jnp.zeros_like(tokens_BT)
            x_BTD = x_BTD + jnp.take(type_YD, token_types_BT, axis=0).astype(dtype)
        if added_BTD is not None:
            x_BTD = x_BTD + added_BTD.astype(dtype)
        if cfg.embed_norm:
            x_BTD = layers.Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, dtype, pdtype,
                                name="embed_norm")(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

        rel_table_RN = (layers.relative_bias_table(self, cfg) if cfg.pos_emb == "relative"
                        else None)
        x_BTD = run_blocks(cfg, x_BTD, positions_BT, segment_ids_BT, deterministic, decode,
                           rel_table_RN)

        if logits_at_BK is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_BK[..., None], axis=1)  # T -> K
        if cfg.norm_position == "pre":  # post-norm blocks end normalised already
            x_BTD = layers.Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, dtype, pdtype,
                                name="final_norm")(x_BTD)
        if return_hidden:
            return x_BTD
        if cfg.tie_embeddings:
            x_BTE = x_BTD @ proj_ED.T.astype(dtype) if cfg.embed_dim else x_BTD
            logits_BTV = jnp.einsum("bte,ve->btv", x_BTE, embed_VE.astype(dtype),
                                    preferred_element_type=jnp.float32)
        else:
            unembed_DV = layers.logical_param(self, "unembed", init, (D, V), ("embed", "vocab"),
                                              pdtype)
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, unembed_DV.astype(dtype),
                                    preferred_element_type=jnp.float32)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
        return (logits_BTV, x_BTD) if with_hidden else logits_BTV


def run_blocks(cfg: TransformerConfig, x_BTD: Array, positions_BT: Array,
               segment_ids_BT: Array | None, deterministic: bool, decode: bool,
               rel_table_RN: Array | None = None, memory_BSD: Array | None = None,
               memory_segment_ids_BS: Array | None = None) -> Array:
    """The stack of cfg.num_layers blocks (scanned, looped or shared; rematerialised per
    cfg.remat), created as children of the calling module: its layers/ or layers_{i}/ params."""
    block = Block
    if cfg.remat != "none":
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat],
                         prevent_cse=not cfg.scan_layers)
    args = (positions_BT, segment_ids_BT, rel_table_RN, memory_BSD, memory_segment_ids_BS)
    if cfg.share_layers:
        if decode:
            raise ValueError("share_layers=True has one cache for every layer: decoding "
                             "(decode=True) needs share_layers=False")
        shared = block(cfg, deterministic, decode, name="layers_shared")
        for _ in range(cfg.num_layers):
            x_BTD, _ = shared(x_BTD, *args)
    elif cfg.scan_layers:
        block = nn.scan(block, variable_axes={"params": 0, "cache": 0, "lora": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x_BTD, _ = block(cfg, deterministic, decode, name="layers")(x_BTD, *args)
    else:
        for i in range(cfg.num_layers):
            x_BTD, _ = block(cfg, deterministic, decode, name=f"layers_{i}")(x_BTD, *args)
    return x_BTD


def pool_hidden(hidden_BTD: Array, real_BT: Array, first: bool = False) -> Array:
    """(B, D): the mean of the hidden states over real tokens, or the first token's ([CLS])."""
    if first:
        return hidden_BTD[:, 0]
    real_BT = real_BT.astype(hidden_BTD.dtype)
    return (jnp.sum(hidden_BTD * real_BT[..., None], axis=1) /
            jnp.maximum(jnp.sum(real_BT, axis=1, keepdims=True), 1.0))


def padded_vocab(vocab_size: int, added_ids: int = 0) -> int:
    """The model's vocabulary: the tokenizer's plus the objective's own ids ([MASK], sentinels),
    padded to a multiple of 128 so that it shards."""
    return -(-(vocab_size + added_ids) // 128) * 128


# The numbers a model setting may take (core.config.in_range rules).
RANGES = {"vocab_size": ">= 0", "num_layers": ">= 1", "d_model": ">= 1", "num_heads": ">= 1",
          "max_len": ">= 1", "rope_base": "> 0", "norm_eps": "> 0", "dropout": "[0, 1)",
          "init_std": "> 0", "loss_chunk": ">= 0"}


def check_config(model_section) -> None:
    """The model section as the run will build it, before any data or compile: unknown fields,
    values out of range, and the choices and combinations TransformerConfig refuses."""
    check_ranges("model", model_section, RANGES)
    fields = dict(model_section)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TransformerConfig)})
    if unknown:
        raise ConfigError(f"model section has fields {unknown} that TransformerConfig does not")
    try:
        TransformerConfig(**fields)
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None


def config_from(config, vocab_size: int) -> TransformerConfig:
    """The run config's `model` section as a TransformerConfig; model.vocab_size 0 follows the
    given vocabulary (the tokenizer's, padded by the objective)."""
    fields = dict(config.model)
    if not fields.get("vocab_size"):
        fields["vocab_size"] = vocab_size
    elif fields["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size {fields['vocab_size']} is smaller than the "
                          f"tokenizer's {vocab_size}; set model.vocab_size=0 to follow the tokenizer")
    return TransformerConfig(**fields)
