"""Hugging Face LLaMA checkpoints (safetensors + config.json) <-> our Transformer's parameters.

Both sides use the rotate-half RoPE layout, so q/k need no permutation here (GGUF does; see
lm/weights/import_gguf.py). HF stores Linear weights as [out, in]; we store [in, (heads, head_dim)].
lm/weights/hf_checkpoint.py writes and reads whole directories (GPT-2 or LLaMA by the model's shape).
"""
from __future__ import annotations

import numpy as np

from lm.models import param_tree
from lm.models import transformer as model_lib


def hf_config(cfg: model_lib.TransformerConfig, bos_id: int = 1, eos_id: int = 2) -> dict:
    if cfg.pos_emb != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.use_bias:
        raise ValueError("only LLaMA-style models (rope, rmsnorm, swiglu, no biases) export to "
                         "LlamaForCausalLM")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.resolved_d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.resolved_num_kv_heads,
        "head_dim": cfg.resolved_head_dim, "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }


def config_from_hf(hf: dict, **overrides) -> model_lib.TransformerConfig:
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type {hf.get('model_type')!r}: this reader takes 'llama'")
    fields = dict(
        vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
        rope_base=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), scan_layers=False)
    fields.update(overrides)
    return model_lib.preset("llama", **fields)


def to_hf_tensors(params: dict, cfg: model_lib.TransformerConfig) -> dict[str, np.ndarray]:
    params = param_tree.unstack_layers(params) if "layers" in params else dict(params)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    D = cfg.d_model
    out = {"model.embed_tokens.weight": f32(params["token_embed"]),
           "model.norm.weight": f32(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = f32(np.asarray(params["unembed"]).T)
    for i in range(cfg.num_layers):
        layer, pre = params[f"layers_{i}"], f"model.layers.{i}."
        attn, mlp = layer["attn"], layer["mlp"]
        out[pre + "input_layernorm.weight"] = f32(layer["attn_norm"]["scale"])
        out[pre + "post_attention_layernorm.weight"] = f32(layer["mlp_norm"]["scale"])
        for ours, theirs in (("w_q", "q_proj"), ("w_k", "k_proj"), ("w_v", "v_proj")):
            out[pre + f"self_attn.{theirs}.weight"] = f32(np.asarray(attn[ours]).reshape(D, -1).T)
        out[pre + "self_attn.o_proj.weight"] = f32(np.asarray(attn["w_o"]).reshape(-1, D).T)
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            out[pre + f"mlp.{theirs}.weight"] = f32(np.asarray(mlp[ours]).T)
    return out


def from_hf_tensors(tensors: dict[str, np.ndarray], cfg: model_lib.TransformerConfig) -> dict:
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
    t = lambda name: np.asarray(tensors[name], np.float32)
    params = {"token_embed": t("model.embed_tokens.weight"),
              "final_norm": {"scale": t("model.norm.weight")}}
    if not cfg.tie_embeddings:
        params["unembed"] = t("lm_head.weight").T
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        params[f"layers_{i}"] = {
            "attn_norm": {"scale": t(pre + "input_layernorm.weight")},
            "mlp_norm": {"scale": t(pre + "post_attention_layernorm.weight")},
            "attn": {"w_q": t(pre + "self_attn.q_proj.weight").T.reshape(D, N, H),
                     "w_k": t(pre + "self_attn.k_proj.weight").T.reshape(D, K, H),
                     "w_v": t(pre + "self_attn.v_proj.weight").T.reshape(D, K, H),
                     "w_o": t(pre + "self_attn.o_proj.weight").T.reshape(N, H, D)},
            "mlp": {"w_gate": t(pre + "mlp.gate_proj.weight").T,
                    "w_up": t(pre + "mlp.up_proj.weight").T,
                    "w_down": t(pre + "mlp.down_proj.weight").T},
        }
    if cfg.scan_layers:
        params = param_tree.stack_layers(params, cfg.num_layers)
    return params
