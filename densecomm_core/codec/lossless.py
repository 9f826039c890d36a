"""`lossless`: bit-exact. Byte planes of the floats are split before zstd.

The high byte of an fp16/bf16 value holds the sign and most of the exponent, which vary little
between neighbouring KV values; the low byte holds mantissa bits, which look random. Plain zstd over
interleaved bytes sees neither pattern; per-plane zstd compresses the exponent plane well and stores
the mantissa plane as is (compression is skipped where it does not pay, which also keeps it fast).

Plane i holds byte i (little-endian) of every element. Two-byte dtypes split and merge with 16-bit
shifts (one pass each, several times faster than strided byte gathers); fp32 uses the byte gather.
Memory, not arithmetic, is the cost at this speed: encoding splits into thread-local scratch planes when
its frame is joined at once (``encode_frame_parts``), decoding decompresses the exponent plane into
scratch and merges straight into the receiver's storage (``decode_into``), so no chunk faults in fresh
pages.

Levels are zstd's, tuned for byte planes (``zstd.compressor``): 1 to 3 its fast levels; -k its acceleration
k (``zstd --fast=k``) with the exponent plane still Huffman-coded. Most of an exponent plane's gain is its
entropy stage; the rest is short repeats, which deep layers hold more of and which a faster match finder
misses. On the Qwen3-4B-geometry cache of ``densecomm bench codec`` (2 threads; rows ``lossless`` and
``lossless 1``) level 1 gives ratio 1.65 at ~0.93 GB/s encode, the default -16 ratio 1.55 at ~1.2 GB/s;
decode is ~2 GB/s at both. A sender with CPU to spare or a slow link uses level 1 (a deployment's
``default_codec_params``, or a request's codec params); the default suits a sender
whose codec, not its link, is the bottleneck (two cores against a 10 Gb/s link and up).
"""

from __future__ import annotations

import numpy as np
import torch

from densecomm_core.codec.base import Codec, CodecError, integer_in
from densecomm_core.codec.bytes import flat_words, numpy_words, tensor_uint8
from densecomm_core.codec.zstd import scratch, section_parts, unpack_section

# Planes at least this big decompress into thread-local scratch (below it, one-shot decompress is cheaper).
SCRATCH_MIN_BYTES = 32 << 10


def byte_planes(tensor: torch.Tensor, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The tensor's element bytes as itemsize contiguous uint8 planes, low byte first (written into
    ``out``, itemsize buffers of numel bytes, when given)."""
    if tensor.element_size() == 2:
        words = flat_words(tensor)
        low, high = out or (np.empty(words.size, dtype=np.uint8), np.empty(words.size, dtype=np.uint8))
        np.copyto(low, words, casting="unsafe")  # one pass each
        np.right_shift(words, 8, out=high, casting="unsafe")
        return [low, high]
    planes = tensor_uint8(tensor)  # (n, itemsize): column i = byte i of every element
    if planes.shape[1] == 1:
        return [planes.reshape(-1)]  # one byte per element: the tensor's own bytes, no copy
    if out is None:
        return [np.ascontiguousarray(planes[:, i]) for i in range(planes.shape[1])]
    for i, plane in enumerate(out):
        np.copyto(plane, planes[:, i])
    return list(out)


def merge_planes(planes: list, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``byte_planes``: a writable tensor of ``shape``/``dtype`` (fresh memory: the planes may
    be scratch)."""
    out = torch.empty(shape, dtype=dtype)
    write_planes(planes, out)
    return out


def write_planes(planes: list, out: torch.Tensor) -> None:
    """Inverse of ``byte_planes`` into ``out`` (a CPU tensor, possibly a strided view of a bigger one)."""
    words = numpy_words(out)  # (..., D) unsigned, the same memory
    if out.element_size() == 2:
        low, high = (np.frombuffer(p, dtype=np.uint8).reshape(words.shape) for p in planes)
        np.left_shift(high, 8, out=words, dtype=np.uint16)  # two passes straight into the output
        np.bitwise_or(words, low, out=words)
        return
    words[...] = 0
    for i, plane in enumerate(planes):
        shifted = np.frombuffer(plane, dtype=np.uint8).reshape(words.shape).astype(words.dtype)
        np.bitwise_or(words, np.left_shift(shifted, 8 * i, dtype=words.dtype), out=words)


DEFAULT_LEVEL = -16  # see the module's docstring: the speed / ratio trade


class LosslessCodec(Codec):
    name = "lossless"
    writes_in_place = True
    token_wise = True
    packs_layers = True

    def reconstruct(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return keys, values  # bit-exact

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        if not integer_in(level, -64, 19):
            raise CodecError(f"lossless level must be an integer in [-64, 19], got {level!r}")
        self.level = level

    @property
    def params(self) -> dict:
        return {"level": self.level}

    def encode_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        return self._encode((keys, values), scratch_planes=False)

    def encode_frame_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        return self._encode((keys, values), scratch_planes=True)

    def encode_packed_parts(self, tensors: list[torch.Tensor]) -> list:
        # one run of elements: two planes, two zstd calls for the whole group (not four per layer)
        flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)
        return self._encode((flat,), scratch_planes=False)

    def _encode(self, tensors: tuple[torch.Tensor, ...], scratch_planes: bool) -> list:
        parts = []
        for which, tensor in enumerate(tensors):
            n, size = tensor.numel(), tensor.element_size()
            # Scratch planes: no fresh pages to fault in per chunk (26 MB of planes per Qwen3-4B cache).
            out = [scratch(n, ("encode", which, i)) for i in range(size)] if scratch_planes and size > 1 else None
            planes = byte_planes(tensor, out)
            for i, plane in enumerate(planes):  # the top plane (sign, exponent) always shrinks: no probe
                parts.extend(section_parts(plane, self.level, float_planes=True, probe=i < len(planes) - 1))
        return parts

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        return b"".join(self.encode_parts(keys, values))

    def decode(self, payload, key_shape, value_shape, dtype):
        keys, values = torch.empty(key_shape, dtype=dtype), torch.empty(value_shape, dtype=dtype)
        self.decode_into(payload, keys, values)
        return keys, values

    def decode_into(self, payload, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._decode(payload, (keys, values))

    def decode_packed_into(self, payload, out: torch.Tensor) -> None:
        self._decode(payload, (out,))

    def _decode(self, payload, outs: tuple[torch.Tensor, ...]) -> None:
        view = memoryview(payload)
        offset = 0
        for out in outs:
            n = out.numel()
            planes = []
            for i in range(out.element_size()):  # compressed planes land in this thread's scratch, merged at once
                plane, offset = unpack_section(view, offset, n, scratch(n, ("decode", i)) if n >= SCRATCH_MIN_BYTES else None)
                planes.append(plane)
            write_planes(planes, out)
        if offset != len(view):
            raise CodecError(f"lossless payload has {len(view) - offset} trailing bytes")
