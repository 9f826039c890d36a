"""`lossless`: bit-exact. Byte planes of the floats are split before zstd.

The high byte of an fp16/bf16 value holds the sign and most of the exponent, which vary little
between neighbouring KV values; the low byte holds mantissa bits, which look random. Plain zstd over
interleaved bytes sees neither pattern; per-plane zstd compresses the exponent plane well and stores
the mantissa plane as is (compression is skipped where it does not pay, which also keeps it fast).

Plane i holds byte i (little-endian) of every element. Two-byte dtypes split and merge with 16-bit
shifts (one pass each, several times faster than strided byte gathers); fp32 uses the byte gather.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from densecomm_core.codec.base import Codec, CodecError
from densecomm_core.codec.bytes import tensor_from_bytes, tensor_uint8
from densecomm_core.codec.zstd import scratch, section_parts, unpack_section

# Planes at least this big decompress into thread-local scratch (below it, one-shot decompress is cheaper).
SCRATCH_MIN_BYTES = 32 << 10


def byte_planes(tensor: torch.Tensor) -> list[np.ndarray]:
    """The tensor's element bytes as itemsize contiguous uint8 planes, low byte first."""
    if tensor.element_size() == 2:
        words = tensor_uint8(tensor).view(np.uint16).reshape(-1)
        low, high = np.empty(words.size, dtype=np.uint8), np.empty(words.size, dtype=np.uint8)
        np.copyto(low, words, casting="unsafe")  # one pass each, into preallocated planes
        np.right_shift(words, 8, out=high, casting="unsafe")
        return [low, high]
    planes = tensor_uint8(tensor)  # (n, itemsize): column i = byte i of every element
    if planes.shape[1] == 1:
        return [planes.reshape(-1)]  # one byte per element: the tensor's own bytes, no copy
    return [np.ascontiguousarray(planes[:, i]) for i in range(planes.shape[1])]


def merge_planes(planes: list, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``byte_planes``: a writable tensor of ``shape``/``dtype`` (fresh memory: the planes may
    be scratch)."""
    if dtype.itemsize == 2:
        low, high = (np.frombuffer(p, dtype=np.uint8) for p in planes)
        words = np.left_shift(high, 8, dtype=np.uint16)  # two passes, no temporaries
        np.bitwise_or(words, low, out=words)
        return tensor_from_bytes(words.view(np.uint8), shape, dtype, copy=False)
    interleaved = np.empty((n, dtype.itemsize), dtype=np.uint8)
    for i, plane in enumerate(planes):
        interleaved[:, i] = np.frombuffer(plane, dtype=np.uint8)
    return tensor_from_bytes(interleaved, shape, dtype, copy=False)


class LosslessCodec(Codec):
    name = "lossless"

    def __init__(self, level: int = 1) -> None:
        if not isinstance(level, int) or not -7 <= level <= 19:
            raise CodecError(f"lossless level must be an integer in [-7, 19], got {level!r}")
        self.level = level

    @property
    def params(self) -> dict:
        return {"level": self.level}

    def encode_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        parts = []
        for tensor in (keys, values):
            planes = byte_planes(tensor)
            for i, plane in enumerate(planes):  # the top plane (sign, exponent) always shrinks: no probe
                parts.extend(section_parts(plane, self.level, float_planes=True, probe=i < len(planes) - 1))
        return parts

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        return b"".join(self.encode_parts(keys, values))

    def decode(self, payload, key_shape, value_shape, dtype):
        view = memoryview(payload)
        offset = 0
        out = []
        for shape in (key_shape, value_shape):
            n = math.prod(shape)
            planes = []
            for i in range(dtype.itemsize):  # compressed planes land in this thread's scratch, merged at once
                plane, offset = unpack_section(view, offset, n, scratch(n, i) if n >= SCRATCH_MIN_BYTES else None)
                planes.append(plane)
            out.append(merge_planes(planes, n, shape, dtype))
        if offset != len(view):
            raise CodecError(f"lossless payload has {len(view) - offset} trailing bytes")
        return out[0], out[1]
