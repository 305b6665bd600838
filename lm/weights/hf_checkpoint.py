"""Hugging Face model directories: model.safetensors + config.json (+ tokenizer files).

`save_pretrained` writes what `transformers.AutoModelForCausalLM.from_pretrained` reads
(LlamaForCausalLM for LLaMA-style models, GPT2LMHeadModel for GPT-2-style ones), so a model
trained or imported here can be handed to the rest of the ecosystem; `load_pretrained` reads
such a directory (one or several safetensors files) back into our config and parameters.
"""
from __future__ import annotations

import json
import pathlib

from lm.models import transformer as model_lib
from lm.weights import hf_bert, hf_gpt2, hf_llama

_FORMATS = {"llama": hf_llama, "gpt2": hf_gpt2, "bert": hf_bert}  # bert: read only


def _format_of(cfg: model_lib.TransformerConfig):
    return hf_gpt2 if cfg.pos_emb == "learned" else hf_llama


def save_pretrained(directory: str | pathlib.Path, params: dict,
                    cfg: model_lib.TransformerConfig, tokenizer=None) -> pathlib.Path:
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fmt = _format_of(cfg)
    config = fmt.hf_config(cfg)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(fmt.to_hf_tensors(params, cfg), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(directory)
    return directory


def load_pretrained(directory: str | pathlib.Path, **config_overrides):
    """(config, params) from a Hugging Face GPT-2, LLaMA or BERT (BertModel) directory."""
    from safetensors.numpy import load_file
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    hf = json.loads(config_path.read_text())
    if hf.get("model_type") not in _FORMATS:
        raise ValueError(f"model_type {hf.get('model_type')!r} in {config_path}; readable: "
                         f"{sorted(_FORMATS)}")
    fmt = _FORMATS[hf["model_type"]]
    cfg = fmt.config_from_hf(hf, **config_overrides)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    tensors = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return cfg, fmt.from_hf_tensors(tensors, cfg)
