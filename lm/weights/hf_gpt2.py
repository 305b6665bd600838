"""Hugging Face GPT-2 checkpoints (safetensors + config.json) <-> our Transformer's parameters.

GPT-2 uses Conv1D layers, whose weights are stored [in, out] (no transpose, unlike Linear), and
one fused c_attn projection whose output columns are q, k, v one after another. Keys may carry
GPT2LMHeadModel's `transformer.` prefix or not (the original checkpoints do not).
"""
from __future__ import annotations

import numpy as np

from lm.models import param_tree
from lm.models import transformer as model_lib


def config_from_hf(hf: dict, **overrides) -> model_lib.TransformerConfig:
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"model_type {hf.get('model_type')!r}: this reader takes 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r}: our GPT-2 MLP is the tanh GELU")
    fields = dict(vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], d_model=hf["n_embd"],
                  num_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                  max_len=hf["n_positions"], norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)), scan_layers=False)
    fields.update(overrides)
    return model_lib.preset("gpt2", **fields)


def hf_config(cfg: model_lib.TransformerConfig) -> dict:
    if cfg.pos_emb != "learned" or cfg.norm != "layernorm" or cfg.mlp != "gelu" or not cfg.use_bias:
        raise ValueError("only GPT-2-style models (learned positions, LayerNorm, GELU, biases) "
                         "export to GPT2LMHeadModel")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_layer": cfg.num_layers, "n_embd": cfg.d_model,
            "n_head": cfg.num_heads, "n_inner": cfg.resolved_d_ff, "n_positions": cfg.max_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "torch_dtype": "float32"}


def from_hf_tensors(tensors: dict[str, np.ndarray], cfg: model_lib.TransformerConfig) -> dict:
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    D, N, H = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    t = lambda name: np.asarray(tensors[name], np.float32)
    norm = lambda pre: {"scale": t(pre + ".weight"), "bias": t(pre + ".bias")}
    params = {"token_embed": t("wte.weight"), "pos_embed": t("wpe.weight"),
              "final_norm": norm("ln_f")}
    if not cfg.tie_embeddings:
        params["unembed"] = t("lm_head.weight").T
    for i in range(cfg.num_layers):
        pre = f"h.{i}."
        w_q, w_k, w_v = np.split(t(pre + "attn.c_attn.weight"), 3, axis=1)
        b_q, b_k, b_v = np.split(t(pre + "attn.c_attn.bias"), 3)
        params[f"layers_{i}"] = {
            "attn_norm": norm(pre + "ln_1"), "mlp_norm": norm(pre + "ln_2"),
            "attn": {"w_q": w_q.reshape(D, N, H), "w_k": w_k.reshape(D, N, H),
                     "w_v": w_v.reshape(D, N, H), "b_q": b_q.reshape(N, H),
                     "b_k": b_k.reshape(N, H), "b_v": b_v.reshape(N, H),
                     "w_o": t(pre + "attn.c_proj.weight").reshape(N, H, D),
                     "b_o": t(pre + "attn.c_proj.bias")},
            "mlp": {"w_up": t(pre + "mlp.c_fc.weight"), "b_up": t(pre + "mlp.c_fc.bias"),
                    "w_down": t(pre + "mlp.c_proj.weight"), "b_down": t(pre + "mlp.c_proj.bias")},
        }
    if cfg.scan_layers:
        params = param_tree.stack_layers(params, cfg.num_layers)
    return params


def to_hf_tensors(params: dict, cfg: model_lib.TransformerConfig) -> dict[str, np.ndarray]:
    params = param_tree.unstack_layers(params) if "layers" in params else dict(params)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    D = cfg.d_model
    out = {"transformer.wte.weight": f32(params["token_embed"]),
           "transformer.wpe.weight": f32(params["pos_embed"]),
           "transformer.ln_f.weight": f32(params["final_norm"]["scale"]),
           "transformer.ln_f.bias": f32(params["final_norm"]["bias"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = f32(np.asarray(params["unembed"]).T)
    for i in range(cfg.num_layers):
        layer, pre = params[f"layers_{i}"], f"transformer.h.{i}."
        attn, mlp = layer["attn"], layer["mlp"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[pre + theirs + ".weight"] = f32(layer[ours]["scale"])
            out[pre + theirs + ".bias"] = f32(layer[ours]["bias"])
        out[pre + "attn.c_attn.weight"] = f32(np.concatenate(
            [np.asarray(attn[w]).reshape(D, -1) for w in ("w_q", "w_k", "w_v")], axis=1))
        out[pre + "attn.c_attn.bias"] = f32(np.concatenate(
            [np.asarray(attn[b]).reshape(-1) for b in ("b_q", "b_k", "b_v")]))
        out[pre + "attn.c_proj.weight"] = f32(np.asarray(attn["w_o"]).reshape(-1, D))
        out[pre + "attn.c_proj.bias"] = f32(attn["b_o"])
        out[pre + "mlp.c_fc.weight"] = f32(mlp["w_up"])
        out[pre + "mlp.c_fc.bias"] = f32(mlp["b_up"])
        out[pre + "mlp.c_proj.weight"] = f32(mlp["w_down"])
        out[pre + "mlp.c_proj.bias"] = f32(mlp["b_down"])
    return out
