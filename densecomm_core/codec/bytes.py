"""Tensor <-> bytes without pickling: contiguous little-endian element bytes, viewed through numpy."""

from __future__ import annotations

import math

import numpy as np
import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as bytes (bfloat16 included, via an integer view)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The tensor's element bytes as a flat memoryview, sharing memory when already contiguous on CPU
    (the view keeps the tensor alive)."""
    return memoryview(tensor_uint8(tensor).reshape(-1))


def tensor_uint8(tensor: torch.Tensor) -> np.ndarray:
    """A (numel, itemsize) uint8 view of the tensor's bytes (no copy when already contiguous on CPU)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().reshape(-1, tensor.element_size())


def tensor_from_bytes(data: bytes | memoryview | np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
    """Rebuild a tensor of ``shape``/``dtype`` from exactly ``numel · itemsize`` bytes.

    Copies (a writable tensor) unless ``copy=False`` is passed with a writable array the tensor may share.
    """
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    expected = math.prod(shape) * dtype.itemsize
    if array.size != expected:
        from densecomm_core.codec.base import TruncatedError

        raise TruncatedError(f"{array.size} bytes cannot hold a {tuple(shape)} {dtype} tensor ({expected} bytes)")
    return torch.from_numpy(array.copy() if copy else array).view(dtype).reshape(shape)


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def numpy_words(tensor: torch.Tensor) -> np.ndarray:
    """A writable numpy view of a CPU tensor's elements as unsigned integers of the same size (bf16 included;
    strides kept, so a slice of a bigger tensor stays a view)."""
    size = tensor.element_size()
    return tensor.detach().view(_SIGNED[size]).numpy().view(_UNSIGNED[size])


def flat_words(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as a flat array of unsigned integers of the same size: a view when the tensor
    is contiguous on the CPU (two torch calls: small caches feel every call), else a contiguous copy."""
    size = tensor.element_size()
    if tensor.is_contiguous() and tensor.device.type == "cpu" and not tensor.requires_grad:
        return tensor.view(_SIGNED[size]).numpy().view(_UNSIGNED[size]).reshape(-1)
    return tensor_uint8(tensor).view(_UNSIGNED[size]).reshape(-1)
