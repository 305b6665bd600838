"""Weight-only quantisation of a parameter tree, dequantised where each kernel is used.

Formats (a kernel is viewed as a matrix (In, Out), In = its input axes, the matmul's reduction;
a block is `block` consecutive inputs of one output channel, with one scale):
  int8    per output channel (block = In), float32 scale absmax/127, round half away from zero
  q8_0    GGUF Q8_0: blocks of 32, float16 scale absmax/127; codes equal ggml's bit for bit
  q4_0    GGUF Q4_0: blocks of 32, float16 scale d = -(signed absmax)/8, codes 0..15, x = (q-8) d
  int4    symmetric absmax, blocks of 64, float32 scale absmax/7, codes -7..7
  nf4     QLoRA's NormalFloat-4 (torchao's codebook), blocks of 64, float32 absmax scale
  nf4_dq  nf4 with QLoRA's double quantisation, as torchao's `to_nf4`: the block scales minus
          their mean, in blocks of 256 (in torchao's order: output channel major), quantised to
          int8 with a float32 factor 128/absmax per block; 4 + 8/64 + 32/16384 = 4.127 bits
Codes and scales are computed in NumPy float32 (one-off, on the host), so they can be compared
with the reference quantisers bit for bit.

A quantised kernel is a `QuantizedKernel` pytree that stands in for the float kernel in the
params tree. The model only ever calls `w.astype(dtype)` on a kernel, and on a QuantizedKernel
that dequantises: under jit the weights stay quantised in device memory and each one is expanded
where it is used (inside the layer scan, one layer at a time). No model code changes. Its codes
have the kernel's shape (4-bit codes as jnp.int4/uint4), so Flax's parameter shape check and
nn.scan's slicing of the stacked layer axis work on it as on the float kernel.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from core.config import ConfigError
from lm.models.lora import KERNEL_AXES, param_path

# torchao 0.18's NF4 codebook (QLoRA appendix E, rounded to 4 decimals as torchao has it).
NF4_CODEBOOK = np.array([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                         0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0], np.float32)
DQ_BLOCK = 256  # scales per double-quantisation block (torchao's scaler_block_size)


@dataclasses.dataclass(frozen=True)
class Format:
    block: int          # inputs per scale; 0: the whole input (per channel)
    code_dtype: Any
    scale_dtype: Any


FORMATS = {
    "int8": Format(0, np.int8, np.float32),
    "q8_0": Format(32, np.int8, np.float16),
    "q4_0": Format(32, ml_dtypes.uint4, np.float16),
    "int4": Format(64, ml_dtypes.int4, np.float32),
    "nf4": Format(64, ml_dtypes.uint4, np.float32),
    "nf4_dq": Format(64, ml_dtypes.uint4, np.int8),
}

# Every matmul kernel of the blocks; embeddings, norms and the output head stay float.
DEFAULT_KERNELS = r"(^|/)(attn|cross_attn)/w_[qkvo]$|(^|/)mlp/w_(gate|up|down)$"


@flax.struct.dataclass
class QuantizedKernel:
    """A kernel of shape (lead..., in..., out...) stored as codes (that shape) and block scales
    (lead..., In/block, Out); nf4_dq adds the scales' per-256 factors and their mean."""
    codes: jax.Array
    scales: jax.Array
    dq_factor: jax.Array | None = None   # (lead..., scale blocks)   nf4_dq only
    dq_mean: jax.Array | None = None     # (lead...,)                nf4_dq only
    fmt: str = flax.struct.field(pytree_node=False, default="int8")
    out_axes: int = flax.struct.field(pytree_node=False, default=1)
    float_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return len(self.codes.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.float_dtype)

    def astype(self, dtype) -> jax.Array:
        """The dequantised kernel: what the model's `w.astype(dtype)` gets."""
        return dequantize(self, dtype)

    def __add__(self, other):  # a LoRA delta added to a quantised base (QLoRA)
        return dequantize(self, jnp.float32) + other

    __radd__ = __add__


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """ggml's roundf (gguf.quants.np_roundf): halves go away from zero."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _nearest_code(x: np.ndarray, codebook: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Index of the nearest codebook value (ties to the lower index, as torch's min)."""
    flat, out = x.reshape(-1), np.empty(x.size, np.uint8)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk, None]
        out[start:start + chunk] = np.argmin(np.abs(part - codebook), axis=1)
    return out.reshape(x.shape)


def _double_quantize(absmax_LNO: np.ndarray):
    """torchao's double_quantize_scalers per lead index: int8 codes (shape of the scales),
    the float32 factor of each block of 256 and the mean. A last partial block is padded with
    zeros (after the mean is taken), which changes neither its absmax nor its codes."""
    lead, (nb, out) = absmax_LNO.shape[:-2], absmax_LNO.shape[-2:]
    s = np.swapaxes(absmax_LNO, -1, -2).reshape(lead + (nb * out,))  # torchao: out major
    mean = s.mean(axis=-1, dtype=np.float32)
    centred = s - mean[..., None]
    n_blocks = -(-s.shape[-1] // DQ_BLOCK)
    pad = [(0, 0)] * len(lead) + [(0, n_blocks * DQ_BLOCK - s.shape[-1])]
    blocks = np.pad(centred, pad).reshape(lead + (n_blocks, DQ_BLOCK))
    absmax = np.abs(blocks).max(axis=-1)
    with np.errstate(divide="ignore"):
        factor = np.where(absmax == 0, np.float32(1), np.float32(256) / (2 * absmax))
    factor = factor.astype(np.float32)
    q = np.clip(np.round(blocks * factor[..., None]), -128, 127).astype(np.int8)
    q = q.reshape(lead + (-1,))[..., :nb * out].reshape(lead + (out, nb))
    return np.swapaxes(q, -1, -2), factor, mean.astype(np.float32)


def quantize(w, fmt: str, out_axes: int, lead_axes: int = 0, name: str = "kernel"
             ) -> QuantizedKernel:
    """Quantises one kernel (lead..., in..., out...) along its input axes."""
    codes, scales, extra = _quantize_numpy(np.asarray(jax.device_get(w), np.float32), fmt,
                                           out_axes, lead_axes, name)
    return QuantizedKernel(codes=jnp.asarray(codes), scales=jnp.asarray(scales),
                           **{k: jnp.asarray(v) for k, v in extra.items()},
                           fmt=fmt, out_axes=out_axes)


def _quantize_numpy(w: np.ndarray, fmt: str, out_axes: int, lead_axes: int, name: str):
    """(codes, scales, {dq_factor, dq_mean}) as NumPy arrays in the format's dtypes; NumPy only,
    so that it can run inside a host callback (quantize_traced)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantisation format {fmt!r}; expected one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    lead = w.shape[:lead_axes]
    n_in = int(np.prod(w.shape[lead_axes:w.ndim - out_axes]))
    n_out = int(np.prod(w.shape[w.ndim - out_axes:]))
    block = spec.block or n_in
    if n_in % block:
        raise ConfigError(f"{name}: input size {n_in} is not a multiple of {fmt}'s block of "
                          f"{block}; leave this kernel float (a narrower kernels regex) or pick "
                          "a format whose block divides it")
    blocks = w.reshape(lead + (n_in // block, block, n_out))
    absmax = np.abs(blocks).max(axis=-2)                      # (lead, nb, Out)
    extra = {}
    if fmt in ("int8", "q8_0", "int4"):
        d = absmax / np.float32(7 if fmt == "int4" else 127)
        q = _round_half_away(blocks * _inverse(d)[..., None, :])
        codes, scales = (np.clip(q, -7, 7) if fmt == "int4" else q), d
    elif fmt == "q4_0":
        at = np.abs(blocks).argmax(axis=-2)[..., None, :]
        d = np.take_along_axis(blocks, at, axis=-2)[..., 0, :] / np.float32(-8)
        x = blocks * _inverse(d)[..., None, :] + np.float32(8.5)
        codes, scales = np.clip(np.trunc(x).astype(np.uint8), 0, 15), d
    else:  # nf4, nf4_dq: codes from the unquantised absmax, as torchao
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(absmax[..., None, :] == 0, 0, blocks / absmax[..., None, :])
        codes, scales = _nearest_code(x.astype(np.float32), NF4_CODEBOOK), absmax
        if fmt == "nf4_dq":
            scales, extra["dq_factor"], extra["dq_mean"] = _double_quantize(absmax)
    return (codes.astype(spec.code_dtype).reshape(w.shape), scales.astype(spec.scale_dtype),
            extra)


def block_scales(q: QuantizedKernel) -> jax.Array:
    """The float32 scale of each block, (lead..., In/block, Out)."""
    if q.fmt != "nf4_dq":
        return q.scales.astype(jnp.float32)
    lead, (nb, out) = q.scales.shape[:-2], q.scales.shape[-2:]
    s = jnp.swapaxes(q.scales, -1, -2).reshape(lead + (nb * out,)).astype(jnp.float32)
    n_blocks = q.dq_factor.shape[-1]
    s = jnp.pad(s, [(0, 0)] * len(lead) + [(0, n_blocks * DQ_BLOCK - nb * out)])
    s = (s.reshape(lead + (n_blocks, DQ_BLOCK)) / q.dq_factor[..., None]).reshape(lead + (-1,))
    s = s[..., :nb * out] + q.dq_mean[..., None]
    return jnp.swapaxes(s.reshape(lead + (out, nb)), -1, -2)


def dequantize(q: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
    """codes * scale ((q - 8) d for q4_0, codebook[q] * scale for nf4), in the kernel's shape."""
    scale_LNO = block_scales(q)
    lead, (nb, out) = scale_LNO.shape[:-2], scale_LNO.shape[-2:]
    codes = q.codes.reshape(lead + (nb, -1, out))
    if q.fmt.startswith("nf4"):
        values = jnp.asarray(NF4_CODEBOOK)[codes.astype(jnp.int32)]
    else:
        values = codes.astype(jnp.float32) - (8.0 if q.fmt == "q4_0" else 0.0)
    return (values * scale_LNO[..., :, None, :]).reshape(q.codes.shape).astype(dtype)


def quantize_params(params: dict, fmt: str, kernels: str = DEFAULT_KERNELS) -> dict:
    """The (unboxed) params tree with every kernel whose path ("layers/mlp/w_up") matches the
    regex replaced by its QuantizedKernel; a stacked "layers" axis is kept as a lead axis."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantisation format {fmt!r}; expected one of {sorted(FORMATS)}")
    pattern, matched = re.compile(kernels), []

    def convert(path, w):
        name = param_path(path)
        if not pattern.search(name):
            return w
        leaf = name.rsplit("/", 1)[-1]
        if leaf not in KERNEL_AXES:
            raise ConfigError(f"{name} matches the kernels regex but is not a matmul kernel this "
                              f"can quantise ({sorted(KERNEL_AXES)}); narrow the regex")
        n_in, n_out = KERNEL_AXES[leaf]
        matched.append(name)
        q = quantize(w, fmt, n_out, np.ndim(w) - n_in - n_out, name)
        return dataclasses.replace(q, float_dtype=jnp.dtype(w.dtype).name)

    out = jax.tree_util.tree_map_with_path(convert, nn.meta.unbox(params))
    if not matched:
        raise ConfigError(f"no parameter path matches the kernels regex {kernels!r}")
    return out


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedKernel)


def dequantize_params(params: dict) -> dict:
    """Every QuantizedKernel back to a float array (its original dtype)."""
    return jax.tree.map(lambda x: dequantize(x, x.dtype) if _is_quantized(x) else x, params,
                        is_leaf=_is_quantized)


def _bits(dtype) -> int:
    dtype = np.dtype(dtype)
    four_bit = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))
    return 4 if dtype in four_bit else dtype.itemsize * 8


def bits_per_parameter(params: Any) -> dict:
    """Storage of the quantised kernels (codes, scales, factors, means) per kernel parameter,
    and of the whole tree per parameter."""
    kernel_bits = kernel_params = other_bits = other_params = 0
    for leaf in jax.tree.leaves(params, is_leaf=_is_quantized):
        if _is_quantized(leaf):
            kernel_params += leaf.codes.size
            kernel_bits += sum(x.size * _bits(x.dtype) for x in jax.tree.leaves(leaf))
        else:
            other_params += np.size(leaf)
            other_bits += np.size(leaf) * _bits(leaf.dtype)
    return {"kernels": kernel_bits / max(kernel_params, 1),
            "all": (kernel_bits + other_bits) / max(kernel_params + other_params, 1),
            "quantized_params": kernel_params, "float_params": other_params}


# On the engine 4-bit codes are held one per byte: arrays placed at run time get XLA's unpacked
# layout while the ahead-of-time compiled step expects packed uint4, and refuses them.
HELD_AS_BYTES = {np.dtype(ml_dtypes.uint4): np.uint8, np.dtype(ml_dtypes.int4): np.int8}


def held_as_bytes(params: dict) -> dict:
    """quantize_params' tree with 4-bit codes widened to bytes, the layout the engine holds (a
    QLoRA base made from pretrained weights must match the one quantize_traced makes)."""
    def widen(x):
        if not _is_quantized(x) or np.dtype(x.codes.dtype) not in HELD_AS_BYTES:
            return x
        return dataclasses.replace(x, codes=np.asarray(x.codes).astype(
            HELD_AS_BYTES[np.dtype(x.codes.dtype)]))
    return jax.tree.map(widen, params, is_leaf=_is_quantized)


def quantize_traced(boxed: Any, fmt: str, kernels: str = DEFAULT_KERNELS) -> Any:
    """quantize_params for a logically boxed tree inside jit or eval_shape (a QLoRA run's frozen
    base, created straight into its shardings): each kernel is quantised by the same NumPy code
    through a host callback, so the codes are those of quantize_params (4-bit ones held as
    bytes, see below). The codes keep the kernel's axis names (sharded like it); scales and their factors are replicated but
    for a stacked layer axis."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantisation format {fmt!r}; expected one of {sorted(FORMATS)}")
    spec, pattern = FORMATS[fmt], re.compile(kernels)

    def convert(path, box):
        name = param_path(path)
        leaf = name.rsplit("/", 1)[-1]
        if not isinstance(box, nn.LogicallyPartitioned) or not pattern.search(name) or \
                leaf not in KERNEL_AXES:
            return box
        w, names = box.value, tuple(box.names)
        n_in, n_out = KERNEL_AXES[leaf]
        lead_axes = w.ndim - n_in - n_out
        lead, lead_names = w.shape[:lead_axes], names[:lead_axes]
        size_in = int(np.prod(w.shape[lead_axes:lead_axes + n_in]))
        size_out = int(np.prod(w.shape[lead_axes + n_in:]))
        if size_in % (spec.block or size_in):
            raise ConfigError(f"{name}: input size {size_in} is not a multiple of {fmt}'s block "
                              f"of {spec.block}; pick another lora.base_format")
        blocks = size_in // (spec.block or size_in)
        host_codes = HELD_AS_BYTES.get(np.dtype(spec.code_dtype), spec.code_dtype)
        parts = [jax.ShapeDtypeStruct(w.shape, host_codes),
                 jax.ShapeDtypeStruct(lead + (blocks, size_out), spec.scale_dtype)]
        if fmt == "nf4_dq":
            parts += [jax.ShapeDtypeStruct(lead + (-(-blocks * size_out // DQ_BLOCK),),
                                           np.float32), jax.ShapeDtypeStruct(lead, np.float32)]

        def host(w_np):
            codes, scales, extra = _quantize_numpy(np.asarray(w_np, np.float32), fmt, n_out,
                                                   lead_axes, name)
            arrays = [codes, scales] + ([extra["dq_factor"], extra["dq_mean"]]
                                        if fmt == "nf4_dq" else [])
            return tuple(np.asarray(a).astype(p.dtype) for a, p in zip(arrays, parts))

        arrays = list(jax.pure_callback(host, tuple(parts), w))
        boxed_parts = [nn.LogicallyPartitioned(arrays[0], names),
                       nn.LogicallyPartitioned(arrays[1], lead_names + (None, None))]
        if fmt == "nf4_dq":
            boxed_parts += [nn.LogicallyPartitioned(arrays[2], lead_names + (None,)),
                            nn.LogicallyPartitioned(arrays[3], lead_names)]
        return QuantizedKernel(*boxed_parts, fmt=fmt, out_axes=n_out,
                               float_dtype=jnp.dtype(w.dtype).name)

    return jax.tree_util.tree_map_with_path(
        convert, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
