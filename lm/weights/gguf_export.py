"""Our LLaMA-shaped models as GGUF v3 files (llama.cpp's layout), with Q8_0, Q4_0 or F32 kernels.

The inverse of lm/weights/import_gguf.py: matrices go back to [out, in] (PyTorch's Linear
layout), q/k rows back to llama.cpp's interleaved-RoPE order (`permute_rope_rows`), and the
block kernels are quantised by lm/weights/quantize.py along their input axis, which is what
ggml's blocks of 32 run along. Embeddings, the output head and the norms are written F32 (the
kernels chosen are quantize.DEFAULT_KERNELS'), so a file read back equals our
`dequantize_params(quantize_params(params, "q8_0"))`. The tokenizer goes in as GGUF metadata
(`tokenizer.*` keys): pass a GGUF-sourced model's own keys through, or build them from one of
our sentencepiece tokenizers with `sentencepiece_metadata`.
"""
from __future__ import annotations

import pathlib
import struct
from typing import Any

import flax.linen as nn
import numpy as np

from core.config import ConfigError
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.weights import quantize as quant
from lm.weights.gguf import GGML_TYPES, MAGIC

TYPES = {"f32": 0, "q4_0": 2, "q8_0": 8}  # file type name -> ggml type of the block kernels
ALIGNMENT = 32
_ID = {name: code for code, (name, _, _) in GGML_TYPES.items()}


def permute_rope_rows(w_OD: np.ndarray, num_heads: int) -> np.ndarray:
    """Rotate-half rows (Hugging Face, ours) -> interleaved-RoPE rows (GGUF), per head:
    llama.cpp's converter; import_gguf.unpermute_rope_rows is its inverse."""
    out, rest = w_OD.shape[0], w_OD.shape[1:]
    half = out // num_heads // 2
    return w_OD.reshape(num_heads, 2, half, *rest).swapaxes(1, 2).reshape(w_OD.shape)


def ggml_blocks(w_OI: np.ndarray, type_name: str) -> np.ndarray:
    """The bytes of an [out, in] float matrix in ggml blocks along `in` (F32: raw floats)."""
    w_OI = np.asarray(w_OI, np.float32)
    if type_name == "F32":
        return np.ascontiguousarray(w_OI).reshape(-1).view(np.uint8)
    q = quant.quantize(np.ascontiguousarray(w_OI.T), type_name.lower(), out_axes=1)
    codes = np.asarray(q.codes).astype(np.uint8 if type_name == "Q4_0" else np.int8).T
    codes = codes.reshape(-1, 32)
    d = np.asarray(q.scales, np.float16).T.reshape(-1, 1).view(np.uint8)  # (blocks, 2)
    if type_name == "Q4_0":  # low nibbles: values 0..15 of the block, high nibbles 16..31
        codes = codes[:, :16] | (codes[:, 16:] << 4)
    return np.concatenate([d, codes.view(np.uint8)], axis=1).reshape(-1)


def llama_tensors(params: dict, cfg: model_lib.TransformerConfig) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in GGUF's numpy layout ([out, in] for matrices)."""
    if not (cfg.pos_emb == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and
            not cfg.use_bias and cfg.norm_position == "pre" and cfg.causal and
            not cfg.embed_dim and not cfg.share_layers):
        raise ConfigError("GGUF export writes LLaMA-shaped models (rope, rmsnorm, swiglu, no "
                          "biases, pre-norm, causal); this config is not one (use style=llama)")
    params = nn.meta.unbox(params)
    params = param_tree.unstack_layers(params) if "layers" in params else dict(params)
    f32 = lambda x: np.asarray(x, np.float32)
    D, N, K = cfg.d_model, cfg.num_heads, cfg.resolved_num_kv_heads
    tensors = {"token_embd.weight": f32(params["token_embed"]),
               "output_norm.weight": f32(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        tensors["output.weight"] = f32(params["unembed"]).T
    for i in range(cfg.num_layers):
        layer = params[f"layers_{i}"]
        attn, mlp = layer["attn"], layer["mlp"]
        blk = f"blk.{i}."
        tensors.update({
            blk + "attn_norm.weight": f32(layer["attn_norm"]["scale"]),
            blk + "attn_q.weight": permute_rope_rows(f32(attn["w_q"]).reshape(D, -1).T, N),
            blk + "attn_k.weight": permute_rope_rows(f32(attn["w_k"]).reshape(D, -1).T, K),
            blk + "attn_v.weight": f32(attn["w_v"]).reshape(D, -1).T,
            blk + "attn_output.weight": f32(attn["w_o"]).reshape(-1, D).T,
            blk + "ffn_norm.weight": f32(layer["mlp_norm"]["scale"]),
            blk + "ffn_gate.weight": f32(mlp["w_gate"]).T,
            blk + "ffn_up.weight": f32(mlp["w_up"]).T,
            blk + "ffn_down.weight": f32(mlp["w_down"]).T,
        })
    return {name: np.ascontiguousarray(w) for name, w in tensors.items()}


def llama_metadata(cfg: model_lib.TransformerConfig, name: str) -> dict[str, Any]:
    """The llama.* keys lm/weights/import_gguf.py (and llama.cpp) read."""
    return {
        "general.architecture": "llama", "general.name": name, "general.alignment": ALIGNMENT,
        "llama.block_count": cfg.num_layers, "llama.context_length": cfg.max_len,
        "llama.embedding_length": cfg.d_model, "llama.feed_forward_length": cfg.resolved_d_ff,
        "llama.attention.head_count": cfg.num_heads,
        "llama.attention.head_count_kv": cfg.resolved_num_kv_heads,
        "llama.rope.dimension_count": cfg.resolved_head_dim,
        "llama.rope.freq_base": float(cfg.rope_base),
        "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "llama.vocab_size": cfg.vocab_size,
    }


def sentencepiece_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """tokenizer.* keys for one of our sentencepiece tokenizers (lm/data/tokenizer.py): its
    pieces, padded with unused ids up to the model's (padded) vocabulary. No merge scores, so
    llama.cpp cannot tokenise with it; our importer and gguf's reader only need the pieces."""
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    pieces += [f"<unused_{i}>" for i in range(len(pieces), vocab_size)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.bos_token_id": tokenizer.bos_id,
            "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
            "tokenizer.ggml.padding_token_id": tokenizer.pad_id}


def tokenizer_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.* keys of a GGUF file's metadata (GGUFFile.metadata), to pass through."""
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


# GGUF metadata value types.
_U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64 = 4, 5, 6, 7, 8, 9, 10


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kind(value) -> int:
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _U32 if 0 <= value < 2**32 else _U64 if value >= 0 else _I32
    if isinstance(value, float):
        return _F32
    if isinstance(value, str):
        return _STRING
    if isinstance(value, (list, tuple)):
        return _ARRAY
    raise ConfigError(f"GGUF metadata value {value!r} has type {type(value).__name__}; use "
                      "str, int, float, bool or a list of one of them")


def _value(value, kind: int) -> bytes:
    if kind == _STRING:
        return _string(value)
    if kind == _ARRAY:
        inner = _kind(value[0]) if len(value) else _I32
        if inner in (_U32, _U64):
            inner = _I32  # token types and other int arrays: ggml writes INT32
        return struct.pack("<IQ", inner, len(value)) + b"".join(_value(v, inner) for v in value)
    return struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?", _U64: "<Q"}[kind], value)


def write_gguf(path: str | pathlib.Path, tensors: dict[str, np.ndarray],
               types: dict[str, str], metadata: dict[str, Any]) -> pathlib.Path:
    """A GGUF v3 file: metadata, one record per tensor (dims fastest first), aligned data."""
    path = pathlib.Path(path)
    header = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        kind = _kind(value)
        header += [_string(key), struct.pack("<I", kind), _value(value, kind)]
    blobs, offset = [], 0
    for name, w in tensors.items():
        blob = ggml_blocks(w, types[name]).tobytes()
        header += [_string(name), struct.pack("<I", w.ndim),
                   struct.pack(f"<{w.ndim}Q", *reversed(w.shape)),
                   struct.pack("<IQ", _ID[types[name]], offset)]
        blob += b"\0" * (-len(blob) % ALIGNMENT)
        blobs.append(blob)
        offset += len(blob)
    head = b"".join(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % ALIGNMENT))
        for blob in blobs:
            f.write(blob)
    return path


def export_gguf(path: str | pathlib.Path, params: dict, cfg: model_lib.TransformerConfig,
                tokenizer_keys: dict[str, Any], file_type: str = "q8_0",
                name: str = "genlab") -> pathlib.Path:
    """Writes a LLaMA-shaped model (float params, stacked or per layer) as GGUF: the block
    kernels as Q8_0/Q4_0 (or F32), everything else F32."""
    if file_type not in TYPES:
        raise ConfigError(f"GGUF file type {file_type!r} is not one of {sorted(TYPES)}")
    if "tokenizer.ggml.tokens" not in tokenizer_keys:
        raise ConfigError("the tokenizer keys hold no tokenizer.ggml.tokens; pass tokenizer_"
                          "metadata(GGUFFile(src).metadata) or sentencepiece_metadata(tok)")
    tensors = llama_tensors(params, cfg)
    kernel = GGML_TYPES[TYPES[file_type]][0]
    is_kernel = lambda n: n.startswith("blk.") and not n.endswith("norm.weight")
    types = {n: kernel if is_kernel(n) else "F32" for n in tensors}
    for n, w in tensors.items():
        if types[n] != "F32" and w.shape[-1] % 32:
            raise ConfigError(f"{n} has rows of {w.shape[-1]} values, not a multiple of ggml's "
                              f"block of 32; export it as f32")
    return write_gguf(path, tensors, types, {**llama_metadata(cfg, name), **tokenizer_keys})
