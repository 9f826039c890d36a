"""`raw`: K then V bytes exactly as they sit in memory (little-endian); the baseline every codec is compared to."""

from __future__ import annotations

import numpy as np
import torch

from densecomm_core.codec.base import Codec, TruncatedError
from densecomm_core.codec.bytes import (
    numpy_words,
    tensor_buffer,
    tensor_bytes,
    tensor_from_bytes,
)


class RawCodec(Codec):
    name = "raw"
    token_wise = True
    packs_layers = True
    copy_only = True

    def reconstruct(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return keys, values  # bit-exact

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        return tensor_bytes(keys) + tensor_bytes(values)

    def encode_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        return [tensor_buffer(keys), tensor_buffer(values)]  # the frame is the only copy

    writes_in_place = True

    def decode_into(self, payload, keys: torch.Tensor, values: torch.Tensor) -> None:
        k_bytes = keys.numel() * keys.element_size()
        expected = k_bytes + values.numel() * values.element_size()
        if len(payload) != expected:
            raise TruncatedError(f"raw payload is {len(payload)} bytes, expected {expected}")
        for out, part in ((keys, payload[:k_bytes]), (values, payload[k_bytes:])):
            words = numpy_words(out)
            words[...] = np.frombuffer(part, dtype=words.dtype).reshape(words.shape)

    def encode_packed_parts(self, tensors: list[torch.Tensor]) -> list:
        return [tensor_buffer(t) for t in tensors]

    def decode_packed_into(self, payload, out: torch.Tensor) -> None:
        expected = out.numel() * out.element_size()
        if len(payload) != expected:
            raise TruncatedError(f"raw payload is {len(payload)} bytes, expected {expected}")
        words = numpy_words(out)
        words[...] = np.frombuffer(payload, dtype=words.dtype)

    def decode(self, payload, key_shape, value_shape, dtype):
        size = dtype.itemsize
        k_bytes = size * _numel(key_shape)
        if len(payload) != k_bytes + size * _numel(value_shape):
            raise TruncatedError(f"raw payload is {len(payload)} bytes, expected {k_bytes + size * _numel(value_shape)}")
        return tensor_from_bytes(payload[:k_bytes], key_shape, dtype), tensor_from_bytes(payload[k_bytes:], value_shape, dtype)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
