"""Hugging Face BERT checkpoints (BertModel safetensors + config.json) -> our encoder's parameters.

BERT is the same transformer as lm/models/transformer.py with causal=False, post-norm blocks, a LayerNorm on
the embeddings, token-type embeddings and the exact (erf) GELU. Linear weights are stored
[out, in] and are transposed here. Keys may carry a task model's `bert.` prefix; the pooler and
task heads are not read (sentence embeddings pool the hidden states themselves).
"""
from __future__ import annotations

import numpy as np

from lm.models import param_tree
from lm.models import transformer as model_lib


def config_from_hf(hf: dict, **overrides) -> model_lib.TransformerConfig:
    if hf.get("model_type") != "bert":
        raise ValueError(f"model_type {hf.get('model_type')!r}: this reader takes 'bert'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r}: our BERT MLP is the erf GELU ('gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r}: only "
                         "'absolute' (learned) positions are supported")
    fields = dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
                  d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
                  d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
                  type_vocab_size=hf.get("type_vocab_size", 2),
                  scan_layers=False)
    fields["norm_eps"] = float(hf.get("layer_norm_eps", 1e-12))
    fields.update(overrides)
    return model_lib.TransformerConfig(**{**model_lib.BERT_STYLE, **fields})


def from_hf_tensors(tensors: dict[str, np.ndarray], cfg: model_lib.TransformerConfig) -> dict:
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    D, N, H = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim

    def t(name):
        if name not in tensors:
            raise KeyError(f"tensor {name!r} missing from the BERT checkpoint (is it a BertModel?)")
        return np.asarray(tensors[name], np.float32)

    def norm(prefix):  # LayerNorm.weight/bias, or the original checkpoints' gamma/beta
        if prefix + ".weight" not in tensors and prefix + ".gamma" in tensors:
            return {"scale": t(prefix + ".gamma"), "bias": t(prefix + ".beta")}
        return {"scale": t(prefix + ".weight"), "bias": t(prefix + ".bias")}

    params = {"token_embed": t("embeddings.word_embeddings.weight"),
              "pos_embed": t("embeddings.position_embeddings.weight"),
              "type_embed": t("embeddings.token_type_embeddings.weight"),
              "embed_norm": norm("embeddings.LayerNorm")}
    for i in range(cfg.num_layers):
        pre = f"encoder.layer.{i}."
        heads = lambda name: t(pre + f"attention.self.{name}.weight").T.reshape(D, N, H)
        params[f"layers_{i}"] = {
            "attn_norm": norm(pre + "attention.output.LayerNorm"),
            "mlp_norm": norm(pre + "output.LayerNorm"),
            "attn": {"w_q": heads("query"), "w_k": heads("key"), "w_v": heads("value"),
                     "b_q": t(pre + "attention.self.query.bias").reshape(N, H),
                     "b_k": t(pre + "attention.self.key.bias").reshape(N, H),
                     "b_v": t(pre + "attention.self.value.bias").reshape(N, H),
                     "w_o": t(pre + "attention.output.dense.weight").T.reshape(N, H, D),
                     "b_o": t(pre + "attention.output.dense.bias")},
            "mlp": {"w_up": t(pre + "intermediate.dense.weight").T,
                    "b_up": t(pre + "intermediate.dense.bias"),
                    "w_down": t(pre + "output.dense.weight").T,
                    "b_down": t(pre + "output.dense.bias")},
        }
    if cfg.scan_layers:
        params = param_tree.stack_layers(params, cfg.num_layers)
    return params
