"""`quantized`: KIVI-style asymmetric integer quantization, then zstd.

Keys are quantized per channel (each channel's min/max over a group of ``group`` tokens: key
outliers live in fixed channels), values per token (min/max over ``group`` consecutive channels).
Each group stores its minimum and step in fp16, counted in the payload. With b bits the error of an
element is at most step/2, step = (max − min)/(2^b − 1). Codes are bit-packed (8, 4, 3 or 2 bits) and
the sections go through zstd when it pays. Every chunk quantizes only its own tokens, so chunks stay
independent.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
import torch

from densecomm_core.codec.base import Codec, CodecError, integer_in
from densecomm_core.codec.bytes import tensor_bytes, tensor_from_bytes
from densecomm_core.codec.zstd import pack_section, unpack_section

SUPPORTED_BITS = (2, 3, 4, 8)
CODES_PER_WORD = 8  # codes are packed 8 at a time into ``bits`` bytes (one uint32 word for bits <= 4)


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """uint8 codes in [0, 2^bits) -> ceil(n * bits / 8) bytes, little-endian bit order (first code lowest)."""
    flat = codes.reshape(-1).cpu().numpy()  # codes of a CUDA cache are packed on the host
    if bits == 8:
        return flat.tobytes()
    count = flat.size
    pad = (-count) % CODES_PER_WORD
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    octets = flat.reshape(-1, CODES_PER_WORD)
    word = octets[:, 0].astype(np.uint32)
    for i in range(1, CODES_PER_WORD):
        word |= octets[:, i].astype(np.uint32) << np.uint32(bits * i)
    packed = word.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :bits]
    return np.ascontiguousarray(packed).tobytes()[: packed_size(count, bits)]


def unpack_codes(data: bytes | memoryview, count: int, bits: int) -> torch.Tensor:
    packed = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(packed[:count].copy())
    words = -(-count // CODES_PER_WORD)
    flat = np.zeros(words * bits, dtype=np.uint8)  # the last word's missing bytes read as zero
    flat[: packed.size] = packed[: flat.size]
    octets = np.zeros((words, 4), dtype=np.uint8)
    octets[:, :bits] = flat.reshape(words, bits)
    word = octets.view("<u4").reshape(-1)
    mask = np.uint32((1 << bits) - 1)
    codes = np.empty((words, CODES_PER_WORD), dtype=np.uint8)
    for i in range(CODES_PER_WORD):
        codes[:, i] = (word >> np.uint32(bits * i)) & mask
    return torch.from_numpy(codes.reshape(-1)[:count])


def packed_size(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def balanced_group(length: int, group: int) -> int:
    """The group size used along an axis of ``length``: at most ``group``, balanced so that the padded
    tail is shorter than one element per group (180 tokens in groups of at most 64 become 3 groups of
    60, not 4 of 64 with 76 codes of padding)."""
    groups = math.ceil(length / group)
    return max(1, math.ceil(length / max(1, groups)))


def group_lastdim(x: torch.Tensor, group: int) -> torch.Tensor:
    """(..., L) -> float32 (..., ceil(L / group), group); the tail repeats the edge value (no range widening)."""
    pad = (-x.shape[-1]) % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group).float()


def quantize_lastdim(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the last dim (padded to a multiple of ``group``); return codes (..., n, group), min and step (..., n) in fp16."""
    x = group_lastdim(x, group)
    low = x.amin(dim=-1).to(torch.float16)
    step = ((x.amax(dim=-1) - low.float()) / ((1 << bits) - 1)).to(torch.float16)
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant groups (and fp16 underflow)
    codes = torch.round((x - low.float()[..., None]) / step.float()[..., None]).clamp(0, (1 << bits) - 1).to(torch.uint8)
    return codes, low, step


def dequantize_lastdim(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, length: int) -> torch.Tensor:
    x = codes.float() * step.float()[..., None] + low.float()[..., None]
    return x.reshape(*x.shape[:-2], -1)[..., :length]


class KiviGroupedCodec(Codec):
    """The frame both grouped quantizers share (KIVI): keys grouped per channel along tokens (key
    outliers live in fixed channels), values per token along channels; key section, then value
    section. Subclasses encode and decode one grouped tensor; ``key`` says which side it is."""

    lossless = False
    group: int

    def group_for(self, length: int) -> int:
        return balanced_group(length, self.group)

    def grouping(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(group size, groups along the last axis, groups in all) of a grouped tensor of ``shape``."""
        *lead, length = shape
        group = self.group_for(length)
        groups = math.ceil(length / group)
        return group, groups, math.prod(lead) * groups

    @abstractmethod
    def encode_grouped(self, x: torch.Tensor, key: bool) -> bytes:
        """(..., L) grouped along L -> payload section."""

    @abstractmethod
    def decode_grouped(self, view: memoryview, offset: int, shape: tuple[int, ...], key: bool) -> tuple[torch.Tensor, int]:
        """The float32 tensor of ``shape`` stored at ``offset``, and the offset after it."""

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        keys_by_channel = keys.transpose(2, 3)  # (B, H, D, t): groups run along tokens
        return self.encode_grouped(keys_by_channel, key=True) + self.encode_grouped(values, key=False)

    def decode(self, payload, key_shape, value_shape, dtype):
        view = memoryview(payload)
        b, h, t, d = key_shape
        keys_by_channel, offset = self.decode_grouped(view, 0, (b, h, d, t), key=True)
        values, offset = self.decode_grouped(view, offset, tuple(value_shape), key=False)
        if offset != len(view):
            raise CodecError(f"{self.name} payload has {len(view) - offset} trailing bytes")
        keys = keys_by_channel.transpose(2, 3)
        if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
            raise CodecError(f"{self.name} payload decodes to non-finite values")
        return keys.to(dtype).contiguous(), values.to(dtype).contiguous()


class QuantizedCodec(KiviGroupedCodec):
    name = "quantized"

    def __init__(self, key_bits: int = 4, value_bits: int = 4, group: int = 32, level: int | None = 1) -> None:
        for field, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
            if not integer_in(bits, 0) or bits not in SUPPORTED_BITS:
                raise CodecError(f"{field} must be one of {SUPPORTED_BITS}, got {bits!r}")
        if not integer_in(group, 4, 1024):
            raise CodecError(f"group must be an integer in [4, 1024], got {group!r}")
        if level is not None and not integer_in(level, -7, 19):
            raise CodecError(f"level must be null or an integer in [-7, 19], got {level!r}")
        self.key_bits, self.value_bits, self.group, self.level = key_bits, value_bits, group, level

    @property
    def params(self) -> dict:
        return {"key_bits": self.key_bits, "value_bits": self.value_bits, "group": self.group, "level": self.level}

    def encode_grouped(self, x: torch.Tensor, key: bool) -> bytes:
        bits = self.key_bits if key else self.value_bits
        codes, low, step = quantize_lastdim(x, bits, self.group_for(x.shape[-1]))
        return b"".join(
            [pack_section(pack_codes(codes, bits), self.level),
             pack_section(tensor_bytes(low), self.level),
             pack_section(tensor_bytes(step), self.level)]
        )

    def decode_grouped(self, view: memoryview, offset: int, shape: tuple[int, ...], key: bool) -> tuple[torch.Tensor, int]:
        bits = self.key_bits if key else self.value_bits
        *lead, length = shape
        group, groups, n_groups = self.grouping(shape)
        codes_bytes, offset = unpack_section(view, offset, packed_size(n_groups * group, bits))
        low_bytes, offset = unpack_section(view, offset, 2 * n_groups)
        step_bytes, offset = unpack_section(view, offset, 2 * n_groups)
        codes = unpack_codes(codes_bytes, n_groups * group, bits).reshape(*lead, groups, group)
        low = tensor_from_bytes(low_bytes, (*lead, groups), torch.float16)
        step = tensor_from_bytes(step_bytes, (*lead, groups), torch.float16)
        return dequantize_lastdim(codes, low, step, length), offset
