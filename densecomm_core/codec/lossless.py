"""`lossless`: bit-exact. Byte planes of the floats are split before zstd.

The high byte of an fp16/bf16 value holds the sign and exponent, which vary little between
neighbouring KV values; the low byte holds mantissa bits, which look random. Plain zstd over
interleaved bytes sees neither pattern; per-plane zstd compresses the exponent plane well and stores
the mantissa plane as is (compression is skipped where it does not pay, which also keeps it fast).
"""

from __future__ import annotations

import numpy as np
import torch

from densecomm_core.codec.base import Codec, CodecError
from densecomm_core.codec.bytes import tensor_from_bytes, tensor_uint8
from densecomm_core.codec.zstd import pack_section, unpack_section


class LosslessCodec(Codec):
    name = "lossless"

    def __init__(self, level: int = 1) -> None:
        if not isinstance(level, int) or not -7 <= level <= 19:
            raise CodecError(f"lossless level must be an integer in [-7, 19], got {level!r}")
        self.level = level

    @property
    def params(self) -> dict:
        return {"level": self.level}

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        sections = []
        for tensor in (keys, values):
            planes = tensor_uint8(tensor)  # (n, itemsize): column i = byte i of every element
            sections.extend(pack_section(np.ascontiguousarray(planes[:, i]), self.level) for i in range(planes.shape[1]))
        return b"".join(sections)

    def decode(self, payload, key_shape, value_shape, dtype):
        size = dtype.itemsize
        view = memoryview(payload)
        offset = 0
        out = []
        for shape in (key_shape, value_shape):
            n = int(np.prod(shape))
            planes = np.empty((n, size), dtype=np.uint8)
            for i in range(size):
                plane, offset = unpack_section(view, offset, n)
                planes[:, i] = np.frombuffer(plane, dtype=np.uint8)
            out.append(tensor_from_bytes(planes, shape, dtype, copy=False))
        if offset != len(view):
            raise CodecError(f"lossless payload has {len(view) - offset} trailing bytes")
        return out[0], out[1]
