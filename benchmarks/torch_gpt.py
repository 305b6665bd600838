"""The decoder of lm/models/transformer.py written plainly in PyTorch: a reference for tests, a benchmark peer.

Same architecture family, configured by the same `TransformerConfig`: learned or rotary
positions, LayerNorm or RMSNorm, GELU (tanh) or SwiGLU, MHA or grouped-query attention, tied or
untied embeddings, biases on or off, dropout on embeddings and residual branches. Written the
usual PyTorch way (nanoGPT / Hugging Face LLaMA): fused qkv and gate/up projections,
F.scaled_dot_product_attention with is_causal (or an explicit block-diagonal causal mask when
segment ids are given). Float32 unless the caller casts it.

    model = TorchDecoder(cfg)
    load_flax_params(model, flax_params)   # unboxed or boxed, scanned or per-layer
    logits_BTV = model(tokens_BT, positions_BT=None, segment_ids_BT=None)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _norm(cfg) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.use_bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TorchAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_heads, cfg.resolved_num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                             bias=cfg.use_bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        N, K, H = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.qkv(x).split([N * H, K * H, K * H], dim=-1)
        q, k, v = q.view(B, T, N, H), k.view(B, T, K, H), v.view(B, T, K, H)
        if cos is not None:  # (B, T, 1, H)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, H)
        if K != N:  # query head n uses kv head n // (N // K), as Hugging Face's repeat_kv
            k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(y.transpose(1, 2).reshape(B, T, N * H))


class TorchMlp(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        d_ff = cfg.resolved_d_ff
        self.up = nn.Linear(cfg.d_model, 2 * d_ff if self.swiglu else d_ff, bias=cfg.use_bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class TorchBlock(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.attn = _norm(cfg), TorchAttention(cfg)
        self.mlp_norm, self.mlp = _norm(cfg), TorchMlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class TorchDecoder(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = None
        if cfg.pos_emb == "learned":
            self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TorchBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embed.weight
        if cfg.pos_emb == "rope":
            H = cfg.resolved_head_dim
            inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, H, 2, dtype=torch.float32) / H))
            angles = torch.arange(cfg.max_len, dtype=torch.float32)[:, None] * inv_freq
            angles = torch.cat((angles, angles), dim=-1)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        x = self.token_embed(tokens_BT)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions_BT)
        x = self.drop(x)
        cos = sin = None
        if self.cfg.pos_emb == "rope":
            cos = self.rope_cos[positions_BT][:, :, None]  # (B, T, 1, H)
            sin = self.rope_sin[positions_BT][:, :, None]
        mask = None  # None: plain causal (is_causal=True, the fast path)
        if segment_ids_BT is not None:  # block-diagonal causal: j <= i and seg[i] == seg[j]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = (causal & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]))[:, None]
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.lm_head(self.final_norm(x))


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


@torch.no_grad()
def load_flax_params(model: TorchDecoder, flax_params) -> TorchDecoder:
    """Copies Flax params (from lm.models.transformer.Transformer, boxed or not, scanned or not) into `model`."""
    import flax.linen as flax_nn
    params = flax_nn.meta.unbox(flax_params)
    if set(params) == {"params"}:
        params = params["params"]
    cfg = model.cfg
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim

    def put(dst: torch.Tensor, src: np.ndarray):
        src = torch.from_numpy(np.array(src, dtype=np.float32))  # a writable, contiguous copy
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: torch {tuple(dst.shape)} vs flax {tuple(src.shape)}")
        dst.copy_(src)

    def put_norm(norm: nn.Module, p: dict):
        put(norm.weight, _np(p["scale"]))
        if getattr(norm, "bias", None) is not None:
            put(norm.bias, _np(p["bias"]))

    put(model.token_embed.weight, _np(params["token_embed"]))
    if model.pos_embed is not None:
        put(model.pos_embed.weight, _np(params["pos_embed"]))
    if not cfg.tie_embeddings:
        put(model.lm_head.weight, _np(params["unembed"]).T)
    put_norm(model.final_norm, params["final_norm"])

    to_np = lambda tree: {m: {k: _np(v) for k, v in sub.items()} for m, sub in tree.items()}
    stacked = to_np(params["layers"]) if "layers" in params else None  # scanned: leading layer axis
    for i, block in enumerate(model.blocks):
        if stacked is not None:
            p = {m: {k: v[i] for k, v in sub.items()} for m, sub in stacked.items()}
        else:
            p = to_np(params[f"layers_{i}"])
        put_norm(block.attn_norm, p["attn_norm"])
        put_norm(block.mlp_norm, p["mlp_norm"])
        a = p["attn"]
        qkv = [a["w_q"].reshape(D, N * H), a["w_k"].reshape(D, K * H), a["w_v"].reshape(D, K * H)]
        put(block.attn.qkv.weight, np.concatenate(qkv, 1).T)
        put(block.attn.out.weight, a["w_o"].reshape(N * H, D).T)
        m = p["mlp"]
        up = [m["w_gate"], m["w_up"]] if cfg.mlp == "swiglu" else [m["w_up"]]
        put(block.mlp.up.weight, np.concatenate(up, 1).T)
        put(block.mlp.down.weight, m["w_down"].T)
        if cfg.use_bias:
            put(block.attn.qkv.bias, np.concatenate([a[b].ravel() for b in ("b_q", "b_k", "b_v")]))
            put(block.attn.out.bias, a["b_o"])
            b_up = [m["b_gate"], m["b_up"]] if cfg.mlp == "swiglu" else [m["b_up"]]
            put(block.mlp.up.bias, np.concatenate(b_up))
            put(block.mlp.down.bias, m["b_down"])
    return model
