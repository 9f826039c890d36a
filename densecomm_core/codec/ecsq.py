"""`ecsq`: entropy-coded scalar quantization, KIVI grouping, zstd as the entropy coder.

Fixed-bit codecs (``quantized``) spend the same 2^b levels on every group, stretched from its minimum
to its maximum, so one outlier coarsens the whole group and the bits never adapt to how values are
spread. Here each group gets a uniform step proportional to its own spread,

    step = max(rel_step · rms(x − mean), max|x − mean| / 126)        (stored in bf16)
    code = round((x − mean) / step) ∈ [−127, 127]                     (int8, never clipped)

and the int8 codes go through zstd, whose Huffman stage stores each code in about as many bits as its
entropy (level 1: within ~0.1 bit of it on Gaussian codes; higher levels find useless matches and
do worse). Most codes sit near zero, so a group costs what its values actually need; on heavy-tailed values
(Student-t, 3 degrees of freedom) it errs 12 % less than fixed 3-bit codes in slightly fewer bytes,
and the gap grows with the rate (a third less error than 4-bit codes at about the same size). The error of every element is at most
step / 2. Grouping is KIVI's: keys per channel over ``group`` tokens, values per token over ``group``
channels; each group stores its mean and step in bf16 (the range of any cache dtype), counted in the
payload. Every chunk quantizes only its own tokens, so chunks stay independent.
"""

from __future__ import annotations

import torch

from densecomm_core.codec.base import CodecError, integer_in, number_in
from densecomm_core.codec.bytes import tensor_bytes, tensor_from_bytes
from densecomm_core.codec.quantized import KiviGroupedCodec, group_lastdim
from densecomm_core.codec.zstd import pack_section, unpack_section

MAX_CODE = 127
PEAK_CODE = 126  # peak / step <= 126 leaves room for the bf16 rounding of step (< 2^-8 relative)


def quantize(x: torch.Tensor, rel_step: float, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., L) -> int8 codes (..., n, group), bf16 mean and step (..., n)."""
    grouped = group_lastdim(x, group)
    if not torch.isfinite(grouped).all():
        raise CodecError("ecsq cannot quantize non-finite values; use a lossless codec for such caches")
    mean = grouped.mean(dim=-1).to(torch.bfloat16)
    residual = grouped - mean.float()[..., None]
    spread = residual.square().mean(dim=-1).sqrt()
    peak = residual.abs().amax(dim=-1)
    step = torch.maximum(rel_step * spread, peak / PEAK_CODE).to(torch.bfloat16)
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant groups
    codes = torch.round(residual / step.float()[..., None]).clamp(-MAX_CODE, MAX_CODE).to(torch.int8)
    return codes, mean, step


def dequantize(codes: torch.Tensor, mean: torch.Tensor, step: torch.Tensor, length: int) -> torch.Tensor:
    x = codes.float() * step.float()[..., None] + mean.float()[..., None]
    return x.reshape(*x.shape[:-2], -1)[..., :length]


class EntropyQuantizedCodec(KiviGroupedCodec):
    name = "ecsq"

    def __init__(self, key_step: float = 0.4, value_step: float = 0.4, group: int = 64, level: int = 1) -> None:
        for field, value in (("key_step", key_step), ("value_step", value_step)):
            if not number_in(value, 0.01, 4.0):
                raise CodecError(f"{field} must be a number in [0.01, 4] (step / rms of the group), got {value!r}")
        if not integer_in(group, 4, 1024):
            raise CodecError(f"group must be an integer in [4, 1024], got {group!r}")
        if not integer_in(level, -7, 19):
            raise CodecError(f"level must be an integer in [-7, 19], got {level!r}")
        self.key_step, self.value_step, self.group, self.level = float(key_step), float(value_step), group, level

    @property
    def params(self) -> dict:
        return {"key_step": self.key_step, "value_step": self.value_step, "group": self.group, "level": self.level}

    def encode_grouped(self, x: torch.Tensor, key: bool) -> bytes:
        codes, mean, step = quantize(x, self.key_step if key else self.value_step, self.group_for(x.shape[-1]))
        return b"".join([pack_section(tensor_bytes(t), self.level) for t in (codes, mean, step)])

    def decode_grouped(self, view: memoryview, offset: int, shape: tuple[int, ...], key: bool) -> tuple[torch.Tensor, int]:
        *lead, length = shape
        group, groups, n_groups = self.grouping(shape)
        codes_bytes, offset = unpack_section(view, offset, n_groups * group)
        mean_bytes, offset = unpack_section(view, offset, 2 * n_groups)
        step_bytes, offset = unpack_section(view, offset, 2 * n_groups)
        codes = tensor_from_bytes(codes_bytes, (*lead, groups, group), torch.int8)
        mean = tensor_from_bytes(mean_bytes, (*lead, groups), torch.bfloat16)
        step = tensor_from_bytes(step_bytes, (*lead, groups), torch.bfloat16)
        return dequantize(codes, mean, step, length), offset
