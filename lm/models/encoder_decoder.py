"""The encoder-decoder transformer (T5, the original Transformer) from lm/models/transformer.py's blocks.

An encoder stack (bidirectional, causal=False) reads the inputs; a decoder stack (causal) reads
the targets shifted right and, in every block, cross-attends to the encoder's output. Both stacks
are `model.run_blocks` over `model.Block` with one TransformerConfig, so every option of the
decoder-only and encoder-only shapes (norms, MLPs, GQA, remat, scan, dtype, sharding names)
carries over. One token embedding is shared by the encoder, the decoder and (tie_embeddings) the
output projection, as in T5. Positions: T5's relative bias (pos_emb="relative": one table per
stack, bidirectional buckets in the encoder, causal in the decoder, none in cross-attention), or
rope / learned (one table shared by both stacks). Packed windows carry segment ids on both
sides: encoder and decoder self-attention stay inside a segment, and a target token
cross-attends only to the input tokens of its own segment.

Parameters: token_embed (V, D); pos_embed (max_len, D) if learned; encoder/{rel_bias, layers/...,
final_norm}; decoder/{rel_bias, layers/... (with cross_attn, cross_attn_norm), final_norm};
unembed (D, V) if untied. Unlike T5 the attention logits keep the 1/sqrt(H) scale and a tied
output is not rescaled by D^-1/2: the same choices as lm/models/transformer.py's Transformer.

`generate` is greedy (or sampled) decoding: the encoder runs once, the decoder step by step with
the self-attention KV cache of lm/models/layers.py (cross-attention keys are projected from the memory
at each step; they are small next to the cache for the short targets of span corruption).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import layers
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.models.transformer import TransformerConfig

Array = jax.Array


def _check(cfg: TransformerConfig) -> None:
    if cfg.vocab_size == 0:
        raise ValueError("TransformerConfig.vocab_size is 0 (unset); set it before init")
    if cfg.attention != "full":
        raise ValueError(f"the encoder-decoder supports attention='full' only, got "
                         f"{cfg.attention!r}")
    unsupported = {"embed_dim": cfg.embed_dim, "type_vocab_size": cfg.type_vocab_size,
                   "share_layers": cfg.share_layers, "embed_norm": cfg.embed_norm}
    set_fields = [name for name, value in unsupported.items() if value]
    if set_fields:
        raise ValueError(f"the encoder-decoder does not support {', '.join(set_fields)} (BERT/"
                         "ALBERT options); leave them at their defaults")


class Stack(nn.Module):
    """Embedded tokens (B, T, D) -> hidden states (B, T, D): blocks, then the final norm of a
    pre-norm config. With a memory, every block cross-attends to it (the decoder)."""
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array | None,
                 deterministic: bool = True, decode: bool = False,
                 memory_BSD: Array | None = None,
                 memory_segment_ids_BS: Array | None = None) -> Array:
        cfg = self.cfg
        rel_table_RN = (layers.relative_bias_table(self, cfg) if cfg.pos_emb == "relative"
                        else None)
        x_BTD = model_lib.run_blocks(cfg, x_BTD, positions_BT, segment_ids_BT, deterministic,
                                     decode, rel_table_RN, memory_BSD, memory_segment_ids_BS)
        if cfg.norm_position == "pre":
            x_BTD = layers.Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, jnp.dtype(cfg.dtype),
                                jnp.dtype(cfg.param_dtype), name="final_norm")(x_BTD)
        return x_BTD


def _default_positions(tokens_BT: Array) -> Array:
    B, T = tokens_BT.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


class EncoderDecoder(nn.Module):
    """(inputs (B, S), decoder inputs (B, T)) -> logits (B, T, V) float32 of the targets.

    Segment ids (0 = padding) and positions default to one segment and arange. `encode` and
    `decode` are the two halves (for decoding: encode once, then decode with decode=True)."""
    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        _check(cfg)
        init = nn.initializers.normal(cfg.init_std)
        pdtype = jnp.dtype(cfg.param_dtype)
        self.token_embed = layers.logical_param(self, "token_embed", init,
                                                (cfg.vocab_size, cfg.d_model),
                                                ("vocab", "embed"), pdtype)
        if cfg.pos_emb == "learned":
            self.pos_embed = layers.logical_param(self, "pos_embed", init,
                                                  (cfg.max_len, cfg.d_model),
                                                  ("length", "embed"), pdtype)
        if not cfg.tie_embeddings:
            self.unembed = layers.logical_param(self, "unembed", init,
                                                (cfg.d_model, cfg.vocab_size),
                                                ("embed", "vocab"), pdtype)
        self.encoder = Stack(dataclasses.replace(cfg, causal=False), name="encoder")
        self.decoder = Stack(dataclasses.replace(cfg, causal=True), name="decoder")
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, tokens_BT: Array, positions_BT: Array, deterministic: bool) -> Array:
        dtype = jnp.dtype(self.cfg.dtype)
        x_BTD = jnp.take(self.token_embed, tokens_BT, axis=0).astype(dtype)
        if self.cfg.pos_emb == "learned":
            x_BTD = x_BTD + jnp.take(self.pos_embed, positions_BT, axis=0).astype(dtype)
        x_BTD = self.dropout(x_BTD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

    def encode(self, inputs_BS: Array, segment_ids_BS: Array | None = None,
               positions_BS: Array | None = None, deterministic: bool = True) -> Array:
        """The memory (B, S, D): the encoder's final hidden states."""
        if positions_BS is None:
            positions_BS = _default_positions(inputs_BS)
        x_BSD = self._embed(inputs_BS, positions_BS, deterministic)
        return self.encoder(x_BSD, positions_BS, segment_ids_BS, deterministic)

    def decode(self, tokens_BT: Array, memory_BSD: Array,
               memory_segment_ids_BS: Array | None = None, segment_ids_BT: Array | None = None,
               positions_BT: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
        """Logits (B, T, V) of the next target token at each decoder input."""
        if positions_BT is None:
            positions_BT = _default_positions(tokens_BT)
        x_BTD = self._embed(tokens_BT, positions_BT, deterministic)
        x_BTD = self.decoder(x_BTD, positions_BT, segment_ids_BT, deterministic, decode,
                             memory_BSD, memory_segment_ids_BS)
        dtype = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, self.token_embed.astype(dtype),
                                    preferred_element_type=jnp.float32)
        else:
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.unembed.astype(dtype),
                                    preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))

    def __call__(self, inputs_BS: Array, decoder_inputs_BT: Array,
                 input_segment_ids_BS: Array | None = None,
                 target_segment_ids_BT: Array | None = None,
                 input_positions_BS: Array | None = None,
                 target_positions_BT: Array | None = None,
                 deterministic: bool = True, decode: bool = False) -> Array:
        memory_BSD = self.encode(inputs_BS, input_segment_ids_BS, input_positions_BS,
                                 deterministic)
        return self.decode(decoder_inputs_BT, memory_BSD, input_segment_ids_BS,
                           target_segment_ids_BT, target_positions_BT, deterministic, decode)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

def param_shapes(cfg: TransformerConfig):
    one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(EncoderDecoder(cfg).init, jax.random.key(0), one, one)["params"]


def flops_per_example(cfg: TransformerConfig, inputs_len: int, targets_len: int) -> float:
    """Training FLOPs of one (inputs, targets) pair, as param_tree.flops_per_token counts them:
    6 x (matmul parameters x the tokens they see) + 12 L d_attn per query-key pair. The encoder
    and the decoder's cross-attention keys/values see the S inputs, the rest of the decoder and
    the output projection (V x D) the T targets; pairs are S^2 + T^2 + T S per layer."""
    shapes = nn.meta.unbox(param_shapes(cfg))
    encoder = param_tree.count_params(shapes["encoder"])
    decoder = param_tree.count_params(shapes["decoder"])
    cross_kv = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["decoder"]):
        names = [getattr(key, "key", None) for key in path]
        if "cross_attn" in names and names[-1] in ("w_k", "w_v", "b_k", "b_v"):
            cross_kv += math.prod(leaf.shape)
    matmuls = ((encoder + cross_kv) * inputs_len +
               (decoder - cross_kv + cfg.vocab_size * cfg.d_model) * targets_len)
    pairs = inputs_len ** 2 + targets_len ** 2 + targets_len * inputs_len
    return 6.0 * matmuls + 12.0 * cfg.num_layers * cfg.d_attn * pairs
