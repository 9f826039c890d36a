"""Codec interface, decoding limits, errors and the lazy codec registry.

    Codec.encode(keys, values) -> bytes       one chunk: K and V of one layer, a token range
    Codec.encode_parts(keys, values) -> list  the same payload as buffers (fewer copies of big planes)
    Codec.decode(payload, k_shape, v_shape, dtype) -> (keys, values)
    Codec.decode_into(payload, keys, values)  the same into given tensors (``writes_in_place``: without a copy)
    Codec.encode_frame_parts(keys, values)    ``encode_parts`` whose buffers may be this thread's scratch
    Codec.encode_packed_parts(tensors) -> list  ``packs_layers`` codecs: several whole layers' K and V as one
                                              run of elements (a small cache in one chunk)
    Codec.decode_packed_into(payload, out)    the inverse, into a flat tensor (the receiver's storage)
    Codec.prepare(cache) -> KVCache           optional cache-level step before chunking (eviction)
    Codec.for_forwarding() -> Codec           codec for later hops of the same request
    Codec.params -> dict                      what the wire header records to rebuild the codec
    Codec.bind(cache_fp, rope_applied, bases) the codec for one stream (pca: its basis, from explicit bases)
    get_codec(name, **params)                 registry lookup; CodecError on an unknown name

A chunk is independent: decoding it needs only the header and its own bytes. Decoders treat every
byte as hostile: any failure is a ``CodecError`` subclass, never another exception.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from densecomm_core.cache import KVCache
from densecomm_core.errors import DenseCommError


class CodecError(DenseCommError, ValueError):
    """Base of every wire-format or codec failure (a request's codec or its parameters are wrong)."""

    status = "INVALID_ARGUMENT"


class BadMagicError(CodecError):
    status = "DATA_LOSS"


class UnsupportedVersionError(CodecError):
    pass


class UnknownCodecError(CodecError):
    pass


class DataLossError(CodecError):
    """The bytes of a stream were damaged or lost on the way (checksum, truncation, missing chunks)."""

    status = "DATA_LOSS"


class ChecksumError(DataLossError):
    pass


class TruncatedError(DataLossError):
    pass


class MissingChunkError(DataLossError):
    pass


class DuplicateChunkError(DataLossError):
    pass


class OutOfOrderChunkError(DataLossError):
    pass


class ShapeMismatchError(CodecError):
    pass


class LimitExceededError(CodecError):
    status = "RESOURCE_EXHAUSTED"


def integer_in(value, low: int, high: int | None = None) -> bool:
    """Whether a codec parameter is an integer in [low, high] (a JSON ``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def number_in(value, low: float, high: float) -> bool:
    """Whether a codec parameter is a number in [low, high] (not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds checked before any allocation, so hostile headers cannot balloon memory."""

    max_header_bytes: int = 1 << 20
    max_raw_bytes: int = 4 << 30  # decoded K+V of one cache
    max_chunks: int = 1 << 16
    max_layers: int = 1024
    max_batch: int = 256
    max_tokens: int = 1 << 20
    min_tokens: int = 0  # a service that answers from the cache needs at least one token in it


DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise CodecError(f"unsupported cache dtype {dtype}; expected one of {tuple(DTYPES)}")


class Codec(ABC):
    """Turns one chunk (K, V of one layer and a token range) into bytes and back."""

    name: str = ""
    lossless: bool = True
    writes_in_place: bool = False  # decode_into writes straight into its outputs (no decoded copy first)
    # Each token's decoded K/V depends on that token alone (no per-chunk scales, no token selection), so a
    # padded batch can be reconstructed on tensors (``reconstruct``) with the bytes' result on every real token.
    token_wise: bool = False
    # Elementwise, with no per-layer or per-chunk state: the elements of several whole layers may be coded
    # as one run (``encode_packed_parts``), so a small cache costs one chunk instead of one per layer.
    packs_layers: bool = False
    # Encode and decode are memory copies (a frame's cost is its checksum and one copy, ~0.1 ms per MiB):
    # a transport runs them on its own thread, as handing each frame to a worker thread costs more (thread
    # wake-ups, GIL hand-offs) than it hides on a machine whose cores the byte stream already keeps busy.
    copy_only: bool = False

    @property
    def params(self) -> dict:
        return {}

    def prepare(self, cache: KVCache) -> KVCache:
        """Cache-level step before chunking; identity unless the codec drops or merges tokens."""
        return cache

    @property
    def strips_rope(self) -> bool:
        """Whether the codec codes RoPE-stripped keys: callers strip their model's rotation before encoding
        and the receiving side re-applies its own (the header records ``rope_applied``)."""
        return False

    def bind(self, cache_fingerprint: str, rope_applied: bool, bases=None) -> Codec:
        """The codec as it codes a stream of that cache space (``KVCache.fingerprint``) and RoPE state;
        identity unless the codec depends on them (``pca`` resolves its basis among ``bases``, a
        ``transform.KVBases``, and names it in the header). Encoders bind before the header, decoders
        after reading it."""
        return self

    def for_layer(self, layer: int) -> Codec:
        """The codec for one layer's chunks; identity unless it holds per-layer state (``pca``'s bases)."""
        return self

    def for_forwarding(self) -> Codec:
        """The codec for later hops of the same request (eviction selects tokens once, at the first hop)."""
        return self

    @abstractmethod
    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        """keys (B, Hk, t, Dk), values (B, Hv, t, Dv) -> payload."""

    def encode_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        """The payload as buffers whose concatenation is ``encode``'s result; codecs that pass big
        buffers through (stored byte planes) override it so the frame is assembled with one copy."""
        return [self.encode(keys, values)]

    def encode_frame_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        """``encode_parts`` for a caller that joins the buffers before this thread encodes again (the
        frame builder): codecs may hand out thread-local scratch here instead of fresh memory."""
        return self.encode_parts(keys, values)

    def encode_packed_parts(self, tensors: list[torch.Tensor]) -> list:
        """``packs_layers`` codecs: the elements of ``tensors`` (K0, V0, K1, V1, ... of whole layers), back to
        back, as one payload's buffers."""
        raise CodecError(f"codec {self.name!r} does not pack layers into one chunk")

    def decode_packed_into(self, payload, out: torch.Tensor) -> None:
        """Inverse of ``encode_packed_parts`` into ``out``, a flat contiguous CPU tensor of every element."""
        raise CodecError(f"codec {self.name!r} does not pack layers into one chunk")

    @abstractmethod
    def decode(self, payload: bytes, key_shape: tuple[int, ...], value_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """payload -> keys, values of exactly the given shapes and dtype; CodecError on any inconsistency."""

    def reconstruct(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(keys, values))`` in the inputs' dtype and device; token-wise codecs compute it on
        tensors, without bytes (the training path through a codec). This default makes the byte round trip."""
        return self.decode(self.encode(keys, values), tuple(keys.shape), tuple(values.shape), keys.dtype)

    def decode_into(self, payload: bytes, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Decode into ``keys``/``values`` (views of the receiver's storage, possibly strided: their shapes
        and dtype are the chunk's). Codecs that set ``writes_in_place`` write there directly; this default
        decodes, then copies."""
        k, v = self.decode(payload, tuple(keys.shape), tuple(values.shape), keys.dtype)
        if tuple(k.shape) != tuple(keys.shape) or tuple(v.shape) != tuple(values.shape) or k.dtype != keys.dtype or v.dtype != values.dtype:
            raise ShapeMismatchError(f"{self.name} decoded {tuple(k.shape)}/{tuple(v.shape)} {k.dtype}, "
                                     f"expected {tuple(keys.shape)}/{tuple(values.shape)} {keys.dtype}")
        keys.copy_(k)
        values.copy_(v)


# name -> "module:Class"; imported on first use so an unused codec costs nothing.
REGISTRY: dict[str, str] = {
    "raw": "densecomm_core.codec.raw:RawCodec",
    "lossless": "densecomm_core.codec.lossless:LosslessCodec",
    "quantized": "densecomm_core.codec.quantized:QuantizedCodec",
    "ecsq": "densecomm_core.codec.ecsq:EntropyQuantizedCodec",
    "eviction": "densecomm_core.codec.eviction:EvictionCodec",
    "pca": "densecomm_core.codec.transform:TransformCodec",
}


def get_codec(name: str, **params) -> Codec:
    """Build a registered codec; UnknownCodecError names the known ones, CodecError flags bad params."""
    if name not in REGISTRY:
        raise UnknownCodecError(f"unknown codec {name!r}; expected one of {sorted(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise CodecError(f"bad parameters {params!r} for codec {name!r}: {exc}") from exc
