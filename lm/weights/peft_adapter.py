"""LoRA adapters <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

PEFT names a LLaMA adapter by the Hugging Face module it adapts
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`) and stores A as (r, in) and
B as (out, r), Linear's [out, in] convention; ours are A (in..., r) and B (r, out...) with the
same flattening of heads as lm/weights/hf_llama.py. The merged model exports through
lm/weights/hf_checkpoint.py as any other model.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from core.config import DataError
from lm.models import lora, param_tree, transformer as model_lib
from lm.weights import hf_llama

# Our kernel -> (Hugging Face module under a decoder layer), as lm/weights/hf_llama.py maps them.
MODULES = {"attn/w_q": "self_attn.q_proj", "attn/w_k": "self_attn.k_proj",
           "attn/w_v": "self_attn.v_proj", "attn/w_o": "self_attn.o_proj",
           "mlp/w_gate": "mlp.gate_proj", "mlp/w_up": "mlp.up_proj", "mlp/w_down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers."


def _per_layer(adapters: dict) -> dict[int, dict]:
    """{layer index: {"attn/w_q": {"a", "b"}, ...}} from stacked or per-layer adapters."""
    layers: dict[int, dict] = {}
    for key, sub in adapters.items():
        if key == "layers":  # scanned: a leading layer axis on every array
            count = np.asarray(next(iter(next(iter(sub.values())).values()))["a"]).shape[0]
            per = [{g: {k: {n: np.asarray(v[n])[i] for n in v} for k, v in kernels.items()}
                    for g, kernels in sub.items()} for i in range(count)]
            items = enumerate(per)
        elif key.startswith("layers_") and key[7:].isdigit():
            items = [(int(key[7:]), sub)]
        else:
            raise DataError(f"adapter on {key!r}: PEFT export covers decoder layers only")
        for index, groups in items:
            layers[index] = {f"{g}/{k}": v for g, kernels in groups.items()
                             for k, v in kernels.items()}
    return layers


def export_adapter(directory: str | pathlib.Path, adapters: dict, cfg: lora.LoraConfig,
                   model_cfg: model_lib.TransformerConfig, base_model: str = "") -> pathlib.Path:
    """Writes a PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads onto the Hugging
    Face export of the same base (lm/weights/hf_checkpoint.py)."""
    from safetensors.numpy import save_file
    try:
        hf_llama.hf_config(model_cfg)
    except ValueError:
        raise DataError("PEFT adapters are written for LLaMA-shaped models (rope, rmsnorm, "
                        "swiglu); GPT-2 fuses q, k and v into one c_attn that our separate "
                        "adapters cannot express: export the merged model instead") from None
    directory = pathlib.Path(directory)
    tensors, modules = {}, set()
    for index, kernels in _per_layer(adapters).items():
        for ours, pair in kernels.items():
            if ours not in MODULES:
                raise DataError(f"adapter on {ours!r}: PEFT export knows {sorted(MODULES)}")
            module = MODULES[ours]
            modules.add(module.rsplit(".", 1)[-1])
            a, b = np.asarray(pair["a"], np.float32), np.asarray(pair["b"], np.float32)
            stem = f"{_PREFIX}{index}.{module}"
            tensors[stem + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, cfg.rank).T)
            tensors[stem + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(cfg.rank, -1).T)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
              "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "target_modules": sorted(modules),
              "base_model_name_or_path": base_model, "inference_mode": True}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def import_adapter(directory: str | pathlib.Path, model_cfg: model_lib.TransformerConfig
                   ) -> tuple[dict, lora.LoraConfig]:
    """(adapters, LoRA config) from a PEFT LoRA directory for a LLaMA-shaped model."""
    from safetensors.numpy import load_file
    directory = pathlib.Path(directory)
    config_path, weights_path = (directory / "adapter_config.json",
                                 directory / "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a PEFT adapter directory holds "
                                    "adapter_config.json and adapter_model.safetensors")
    peft_cfg = json.loads(config_path.read_text())
    if peft_cfg.get("peft_type") != "LORA":
        raise DataError(f"{config_path}: peft_type {peft_cfg.get('peft_type')!r}, not 'LORA'")
    cfg = lora.LoraConfig(rank=int(peft_cfg["r"]), alpha=float(peft_cfg["lora_alpha"]),
                          rslora=bool(peft_cfg.get("use_rslora", False)))
    shapes = _kernel_shapes(model_cfg)
    theirs = {module: ours for ours, module in MODULES.items()}
    layers: dict = {}
    for name, tensor in load_file(str(weights_path)).items():
        if not name.startswith(_PREFIX) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise DataError(f"{weights_path}: tensor {name!r} is not a LoRA weight of a decoder "
                            "layer (embeddings and heads are not adapted here)")
        index, rest = name[len(_PREFIX):].split(".", 1)
        module, which = rest.rsplit(".lora_", 1)
        if module not in theirs:
            raise DataError(f"{weights_path}: {name!r} adapts {module!r}; readable: "
                            f"{sorted(theirs)}")
        group, kernel = theirs[module].split("/")
        ins, outs = shapes[theirs[module]]
        value = np.asarray(tensor, np.float32)
        value = value.T.reshape(*ins, cfg.rank) if which == "A.weight" else \
            value.T.reshape(cfg.rank, *outs)
        layers.setdefault(f"layers_{index}", {}).setdefault(group, {}).setdefault(
            kernel, {})["a" if which == "A.weight" else "b"] = value
    if model_cfg.scan_layers:
        layers = param_tree.stack_layers(layers, model_cfg.num_layers)
    return layers, _with_targets(cfg, peft_cfg.get("target_modules") or [])


def _with_targets(cfg: lora.LoraConfig, modules: list[str]) -> lora.LoraConfig:
    """The config with a regex of the kernels PEFT's target_modules name."""
    ours = sorted(k.split("/")[1] for k, m in MODULES.items() if m.rsplit(".", 1)[-1] in modules)
    return dataclasses.replace(cfg, targets=r"(^|/)(attn|mlp)/(" + "|".join(ours) + ")$")


def _kernel_shapes(cfg: model_lib.TransformerConfig) -> dict[str, tuple[tuple, tuple]]:
    D, N, K, H, F = (cfg.d_model, cfg.num_heads, cfg.resolved_num_kv_heads,
                     cfg.resolved_head_dim, cfg.resolved_d_ff)
    return {"attn/w_q": ((D,), (N, H)), "attn/w_k": ((D,), (K, H)), "attn/w_v": ((D,), (K, H)),
            "attn/w_o": ((N, H), (D,)), "mlp/w_gate": ((D,), (F,)), "mlp/w_up": ((D,), (F,)),
            "mlp/w_down": ((F,), (D,))}
