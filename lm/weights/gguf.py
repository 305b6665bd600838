"""A GGUF (llama.cpp) file reader: metadata, tensor index, and dequantisation to float32.

Format (v2/v3): magic "GGUF", version, tensor count, metadata count; typed key/values; one
record per tensor (name, dims with the fastest-varying first, ggml type, offset); then the data,
aligned to `general.alignment` (32 by default). Tensors are memory-mapped and dequantised only
when asked for. Block formats (ggml's, 32 values per block):
  Q4_0: f16 scale d, 16 bytes of nibbles;          x = (q - 8) * d
  Q4_1: f16 scale d, f16 minimum m, 16 bytes;      x = q * d + m
  Q8_0: f16 scale d, 32 int8;                      x = q * d
In a 4-bit block the low nibbles hold values 0..15 and the high nibbles values 16..31.
"""
from __future__ import annotations

import dataclasses
import pathlib
import struct
from typing import Any

import numpy as np

from core.config import DataError

MAGIC = b"GGUF"


class GGUFError(DataError):
    """The file is not GGUF, is truncated, or holds a tensor type this reader cannot decode."""


# ggml tensor types: name, values per block, bytes per block.
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}

# Metadata value types: struct format for the scalar ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: slowest-varying first (GGUF stores the reverse)
    ggml_type: int
    offset: int             # from the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type {self.ggml_type}",))[0]

    @property
    def num_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return int(np.prod(self.shape)) // block * size


class _Cursor:
    def __init__(self, buf: memoryview, path: pathlib.Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path} is truncated (header ends at byte {len(self.buf)})")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.take("<Q")
        raw = bytes(self.buf[self.pos:self.pos + length])
        if len(raw) != length:
            raise GGUFError(f"{self.path} is truncated inside a string")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("<I"), self.take("<Q")
            if item_kind in _SCALARS:  # one numpy view instead of millions of unpack calls
                dtype = np.dtype(_SCALARS[item_kind])
                end = self.pos + count * dtype.itemsize
                values = np.frombuffer(self.buf[self.pos:end], dtype).tolist()
                self.pos = end
                return values
            return [self.value(item_kind) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {kind}")


class GGUFFile:
    """`GGUFFile(path).metadata[key]`, `.tensors[name]` (TensorInfo), `.tensor(name)` (float32)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise GGUFError(f"no GGUF file at {self.path}")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._data), self.path)
        if bytes(self._data[:4]) != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (starts with {bytes(self._data[:4])!r})")
        cursor.pos = 4
        self.version = cursor.take("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        num_tensors, num_kv = cursor.take("<Q"), cursor.take("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.take("<I"))
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(num_tensors):
            name = cursor.string()
            dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
            ggml_type, offset = cursor.take("<I"), cursor.take("<Q")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, offset)
        alignment = int(self.metadata.get("general.alignment", 32))
        self.data_start = -(-cursor.pos // alignment) * alignment
        for info in self.tensors.values():
            if info.ggml_type in GGML_TYPES and (
                    self.data_start + info.offset + info.num_bytes > len(self._data)):
                raise GGUFError(f"{self.path} is truncated: tensor {info.name} runs past the end")

    def raw(self, name: str) -> np.ndarray:
        info = self._info(name)
        start = self.data_start + info.offset
        return self._data[start:start + info.num_bytes]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantised to float32, in numpy shape order."""
        info = self._info(name)
        return dequantize(self.raw(name), info.ggml_type).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path} has no tensor {name!r}")
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            supported = ", ".join(n for n, _, _ in GGML_TYPES.values())
            raise GGUFError(f"tensor {name} is {info.type_name}; this reader decodes {supported}. "
                            "Re-quantise the file (llama.cpp's llama-quantize) to one of them.")
        return info


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Flat float32 values of a run of ggml blocks."""
    name, block, size = GGML_TYPES[ggml_type]
    raw = np.asarray(raw, np.uint8)
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
    if name == "Q8_0":
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1)
    nibbles = blocks[:, 4:] if name == "Q4_1" else blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # [n, 32]
    if name == "Q4_0":
        return ((q - 8.0) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return (q * d + m).reshape(-1)
