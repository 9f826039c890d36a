"""The KV wire format: one header frame, then independently decodable, checksummed chunk frames.

Header frame (little-endian)::

    b"DCKV" | u16 version | u16 reserved | u32 n | n bytes of JSON header | u64 xxh3_64(JSON)

The JSON header names the codec and its parameters, the dtype, batch size and slot count, per-layer
K/V shapes ``[kv_heads_k, head_dim_k, kv_heads_v, head_dim_v]``, per-row valid lengths and logical
positions (RoPE stays right after eviction), the RoPE state, the fingerprint of the model or adapter
whose cache space this is, and the chunking (``chunk_tokens``, ``num_chunks``, and in version 2
``layers_per_chunk``).

Version 2 (a header with ``layers_per_chunk`` > 1; everything else is version 1, unchanged): each chunk
carries whole layers [layer, layer + layers_per_chunk), all tokens, their K0, V0, K1, V1, ... elements as
one run coded by a ``packs_layers`` codec (raw, lossless). A small cache (the zoo's: 4 layers of ~4 KB)
then costs one chunk, one checksum and two zstd calls instead of four chunks and sixteen calls.

Chunk frame::

    b"DCCH" | u32 seq | u16 layer | u16 reserved | u32 token_start | u32 token_count | u32 n
           | u64 xxh3_64(the 20 bytes from seq to n, then the payload) | n bytes of codec payload

Chunks run layer-major (layer 0's token ranges first), so a receiver can rebuild layer 0 while later
layers are in flight. The sequence number fixes each chunk's (layer, token range); missing, duplicated
and (with ``strict_order``) out-of-order chunks are detected. Nothing is pickled; every limit in
``DecodeLimits`` is checked before allocating.
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch
import xxhash

from densecomm_core.cache import KVCache
from densecomm_core.codec.base import (
    DTYPES,
    BadMagicError,
    ChecksumError,
    Codec,
    CodecError,
    DecodeLimits,
    DuplicateChunkError,
    LimitExceededError,
    MissingChunkError,
    OutOfOrderChunkError,
    ShapeMismatchError,
    TruncatedError,
    UnsupportedVersionError,
    dtype_name,
    get_codec,
    integer_in,
)

VERSION = 1  # one layer (or a token range of it) per chunk
PACKED_VERSION = 2  # whole layers packed into one chunk (``layers_per_chunk`` > 1)
HEADER_MAGIC = b"DCKV"
CHUNK_MAGIC = b"DCCH"
HEADER_PREFIX = struct.Struct("<4sHHI")  # magic, version, reserved, json length
CHUNK_FIELDS = struct.Struct("<IHHIII")  # seq, layer, reserved, token_start, token_count, payload length
DIGEST = struct.Struct("<Q")  # xxh3-64 of a frame's fields and payload (a header's: of its json)
CHUNK_PREFIX_SIZE = 4 + CHUNK_FIELDS.size + DIGEST.size
DEFAULT_CHUNK_TOKENS = 1 << 30  # one chunk per layer unless asked otherwise


@dataclass(frozen=True)
class WireHeader:
    codec: str
    params: dict
    dtype: str
    batch: int
    tokens: int
    layers: list  # [[kv_heads_k, head_dim_k, kv_heads_v, head_dim_v], ...]
    lengths: list  # [B] valid slots per row (right-padded)
    positions: list  # [B][tokens] logical positions
    rope_applied: bool
    fingerprint: str
    chunk_tokens: int
    num_chunks: int
    layers_per_chunk: int = 1  # > 1: each chunk is that many whole layers packed (version 2)

    @property
    def version(self) -> int:
        return PACKED_VERSION if self.layers_per_chunk > 1 else VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def chunk_ranges(self) -> list[tuple[int, int, int]]:
        """(layer, token_start, token_count) of every chunk, in sequence order."""
        return list(self.ranges)

    @cached_property
    def ranges(self) -> tuple[tuple[int, int, int], ...]:
        """``chunk_ranges``, computed once per header (decoders look every chunk up in it)."""
        if self.layers_per_chunk > 1:  # a chunk = whole layers from its first one
            return tuple((layer, 0, self.tokens) for layer in range(0, len(self.layers), self.layers_per_chunk))
        starts = range(0, self.tokens, self.chunk_tokens) if self.tokens else [0]
        return tuple((layer, s, min(self.chunk_tokens, self.tokens - s)) for layer in range(len(self.layers)) for s in starts)

    def raw_nbytes(self) -> int:
        size = DTYPES[self.dtype].itemsize
        return sum(self.batch * self.tokens * (hk * dk + hv * dv) * size for hk, dk, hv, dv in self.layers)

    def span(self, layer: int) -> range:
        """The layers of the chunk that starts at ``layer`` (only ``layer`` itself unless packed)."""
        return range(layer, min(layer + self.layers_per_chunk, len(self.layers)))

    def chunk_shapes(self, layer: int, count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        hk, dk, hv, dv = self.layers[layer]
        return (self.batch, hk, count, dk), (self.batch, hv, count, dv)


# ---- encoding -------------------------------------------------------------------------------------

_POOLS: dict[int, ThreadPoolExecutor] = {}

# A chunk smaller than this is coded on the calling thread: handing it to a pool thread (a future, a
# wake-up, the GIL passed back and forth) costs more than coding it (the zoo's caches, 4 chunks of ~4 KB,
# took more CPU per request through the pool than inline). The figure is a round number between those
# chunks and Qwen3-4B's 737 KB ones, not a measured crossover.
PARALLEL_MIN_CHUNK_BYTES = 128 << 10


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool per size: starting threads per cache would cost more than small caches take."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="densecomm-codec")
    return _POOLS[workers]


def chunk_workers(header: WireHeader, workers: int) -> int:
    """The threads worth using for a stream's chunks: ``workers``, or 1 when its chunks are too small
    (on average under ``PARALLEL_MIN_CHUNK_BYTES`` of raw KV) to pay for the handoff."""
    if workers <= 1 or header.num_chunks <= 1 or header.raw_nbytes() < PARALLEL_MIN_CHUNK_BYTES * header.num_chunks:
        return 1
    return workers



def make_header(cache: KVCache, codec: Codec, chunk_tokens: int | None, layers_per_chunk: int = 1) -> WireHeader:
    """The header for ``cache`` (already through ``codec.prepare``)."""
    mask = cache.mask.cpu().numpy()  # (B, T) bool; numpy: a few µs where torch's small ops cost tens
    lengths = mask.sum(axis=1)
    if not np.array_equal(np.arange(mask.shape[1])[None, :] < lengths[:, None], mask):
        raise CodecError("the wire format carries right-padded caches: every row's valid slots must come first")
    layers = [[k.shape[1], k.shape[3], v.shape[1], v.shape[3]] for k, v in zip(cache.keys, cache.values)]
    return stream_header(codec, cache.dtype, layers, lengths.tolist(), cache.positions.tolist(),
                         cache.rope_applied, cache.fingerprint, chunk_tokens, layers_per_chunk)


def stream_header(
    codec: Codec, dtype: torch.dtype, layers: list, lengths: list, positions: list,
    rope_applied: bool, fingerprint: str, chunk_tokens: int | None, layers_per_chunk: int = 1,
) -> WireHeader:
    """A header from its parts, for producers that emit layers one by one (the adapter service).
    ``layers_per_chunk`` > 1 packs whole layers (a ``packs_layers`` codec; chunk_tokens is then ignored)."""
    tokens = len(positions[0]) if positions else 0
    layers_per_chunk = min(layers_per_chunk, len(layers))
    if layers_per_chunk > 1:  # whole layers: every token in each chunk
        if not codec.packs_layers:
            raise CodecError(f"codec {codec.name!r} does not pack layers into one chunk")
        chunk_tokens, num_chunks = max(tokens, 1), math.ceil(len(layers) / layers_per_chunk)
    else:
        chunk_tokens = min(chunk_tokens or DEFAULT_CHUNK_TOKENS, max(tokens, 1))
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        num_chunks = len(layers) * max(1, math.ceil(tokens / chunk_tokens))  # as chunk_ranges counts them
    return WireHeader(
        codec=codec.name, params=codec.params, dtype=dtype_name(dtype), batch=len(lengths), tokens=tokens,
        layers=[list(map(int, layer)) for layer in layers], lengths=list(lengths), positions=positions,
        rope_applied=rope_applied, fingerprint=fingerprint, chunk_tokens=chunk_tokens, num_chunks=num_chunks,
        layers_per_chunk=max(layers_per_chunk, 1),
    )


def header_frame(header: WireHeader) -> bytes:
    # Shallow: dataclasses.asdict would deep-copy the positions (a millisecond per stream before any chunk).
    # Version 1 headers stay byte for byte what they were: no layers_per_chunk field.
    body = json.dumps({f.name: getattr(header, f.name) for f in fields(header)
                       if f.name != "layers_per_chunk" or header.layers_per_chunk > 1}, separators=(",", ":")).encode()
    return HEADER_PREFIX.pack(HEADER_MAGIC, header.version, 0, len(body)) + body + DIGEST.pack(xxhash.xxh3_64_intdigest(body))


def chunk_parts(seq: int, layer: int, token_start: int, token_count: int, payload: list) -> list:
    """A chunk frame as buffers: its prefix, then the payload's buffers (checksummed without joining)."""
    fields = CHUNK_FIELDS.pack(seq, layer, 0, token_start, token_count, sum(len(memoryview(p).cast("B")) for p in payload))
    digest = xxhash.xxh3_64(fields)
    for part in payload:
        digest.update(part)
    return [CHUNK_MAGIC + fields + DIGEST.pack(digest.intdigest()), *payload]


def encode_chunk(codec: Codec, seq: int, layer: int, start: int, count: int, keys: torch.Tensor, values: torch.Tensor,
                 scratch: bool = False) -> list:
    """Chunk ``seq`` as buffers: tokens [start, start + count) of one layer's full-width K, V (``scratch``:
    the buffers may be this thread's scratch, for a caller that joins them at once)."""
    if start or count != keys.shape[2]:  # a token range of the layer (a view; the whole layer needs no slicing)
        keys, values = keys[:, :, start : start + count], values[:, :, start : start + count]
    coder = codec.for_layer(layer)
    payload = coder.encode_frame_parts(keys, values) if scratch else coder.encode_parts(keys, values)
    return chunk_parts(seq, layer, start, count, payload)


def encode_packed_chunk(codec: Codec, seq: int, header: WireHeader, keys: list, values: list) -> list:
    """Packed chunk ``seq`` (version 2) as buffers: the whole layers it spans, from ``keys``/``values``
    indexed by layer."""
    layer = header.ranges[seq][0]
    tensors = [t for l in header.span(layer) for t in (keys[l], values[l])]
    return chunk_parts(seq, layer, 0, header.tokens, codec.encode_packed_parts(tensors))


def encode_chunk_frame(codec: Codec, seq: int, layer: int, start: int, count: int, keys: torch.Tensor, values: torch.Tensor) -> bytes:
    """Chunk ``seq`` as one byte string, joined where it was encoded (a pool joins in parallel; the
    codec's buffers may be scratch)."""
    return b"".join(encode_chunk(codec, seq, layer, start, count, keys, values, scratch=True))


def layer_frames(header: WireHeader, codec: Codec, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list[bytes]:
    """The chunk frames of one layer (full-width K, V), with the sequence numbers the header assigns."""
    return [encode_chunk_frame(codec, seq, layer, start, count, keys, values)
            for seq, (chunk_layer, start, count) in enumerate(header.ranges) if chunk_layer == layer]


def start_stream(cache: KVCache, codec: Codec, chunk_tokens: int | None = None, bases=None,
                 layers_per_chunk: int = 1) -> tuple[KVCache, Codec, WireHeader]:
    """(the cache as coded, the codec bound to its space among ``bases``, the header): what the first
    frame needs, computed eagerly so a bad codec or a missing basis fails before any frame is sent."""
    cache = codec.prepare(cache)
    codec = codec.bind(cache.fingerprint, cache.rope_applied, bases)
    return cache, codec, make_header(cache, codec, chunk_tokens, layers_per_chunk)


def iter_chunk_parts(cache: KVCache, codec: Codec, header: WireHeader, workers: int = 1) -> Iterator[list]:
    """The chunk frames of a started stream in sequence order, each as a list of buffers
    (``workers`` encode chunks in parallel when they are big enough to pay for it)."""
    yield from _map_chunks(cache, codec, header, workers, join=False)


def iter_chunk_frames(cache: KVCache, codec: Codec, header: WireHeader, workers: int = 1) -> Iterator[bytes]:
    """``iter_chunk_parts`` with each frame joined into one byte string by the thread that encoded it."""
    yield from _map_chunks(cache, codec, header, workers, join=True)


def _map_chunks(cache: KVCache, codec: Codec, header: WireHeader, workers: int, join: bool) -> Iterator:
    """Every chunk of the stream in order, as buffers or (``join``) one byte string joined by the thread
    that encoded it (whose codec buffers may then be its scratch)."""
    def encode_one(item: tuple[int, tuple[int, int, int]]):
        seq, (layer, start, count) = item
        if header.layers_per_chunk > 1:
            parts = encode_packed_chunk(codec, seq, header, cache.keys, cache.values)
        else:
            parts = encode_chunk(codec, seq, layer, start, count, cache.keys[layer], cache.values[layer], scratch=join)
        return b"".join(parts) if join else parts

    items = enumerate(header.ranges)
    if chunk_workers(header, workers) == 1:
        yield from map(encode_one, items)
    else:
        yield from bounded_map(worker_pool(workers), encode_one, items, 2 * workers)  # zstd, xxhash, numpy release the GIL


def bounded_map(pool: ThreadPoolExecutor, fn, items: Iterable, window: int) -> Iterator:
    """``pool.map(fn, items)`` in order with at most ``window`` items in flight: a consumer that stops early
    (a cancelled hop) or lags (a slow link) leaves at most that many encoded frames behind, where ``map``
    submits every item at once."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def iter_encode_parts(cache: KVCache, codec: Codec, chunk_tokens: int | None = None, workers: int = 1, bases=None,
                      layers_per_chunk: int = 1) -> Iterator[list]:
    """Yield the header frame, then chunk frames in sequence order, each frame as a list of buffers
    (``workers`` encode chunks in parallel; ``layers_per_chunk`` > 1 packs whole layers, version 2)."""
    cache, codec, header = start_stream(cache, codec, chunk_tokens, bases, layers_per_chunk)
    yield [header_frame(header)]
    yield from iter_chunk_parts(cache, codec, header, workers)


def iter_encode(cache: KVCache, codec: Codec, chunk_tokens: int | None = None, workers: int = 1, bases=None,
                layers_per_chunk: int = 1) -> Iterator[bytes]:
    """Yield the header frame, then chunk frames in sequence order, each as one byte string."""
    cache, codec, header = start_stream(cache, codec, chunk_tokens, bases, layers_per_chunk)
    yield header_frame(header)
    yield from iter_chunk_frames(cache, codec, header, workers)


def encode_cache(cache: KVCache, codec: Codec, chunk_tokens: int | None = None, workers: int = 1, bases=None,
                 layers_per_chunk: int = 1) -> bytes:
    """The whole stream as one byte string (frames concatenated; big buffers are copied once)."""
    return b"".join(part for parts in iter_encode_parts(cache, codec, chunk_tokens, workers, bases, layers_per_chunk)
                    for part in parts)


def is_chunk(frame: bytes | memoryview) -> bool:
    """Whether ``frame`` is a chunk frame (by its magic; its checksum is checked when it is decoded)."""
    return bytes(frame[:4]) == CHUNK_MAGIC


def is_header(frame: bytes | memoryview) -> bool:
    """Whether ``frame`` is a header frame (by its magic)."""
    return bytes(frame[:4]) == HEADER_MAGIC


# ---- decoding -------------------------------------------------------------------------------------


def _require(condition: bool, message: str, error: type[CodecError] = CodecError) -> None:
    if not condition:
        raise error(message)


def parse_header(frame: bytes, limits: DecodeLimits) -> WireHeader:
    """Validate and parse a header frame; every failure is a CodecError subclass."""
    _require(len(frame) >= HEADER_PREFIX.size, f"header frame of {len(frame)} bytes is truncated", TruncatedError)
    magic, version, _, size = HEADER_PREFIX.unpack_from(frame)
    _require(magic == HEADER_MAGIC, f"bad magic {magic!r}, expected {HEADER_MAGIC!r}", BadMagicError)
    _require(version in (VERSION, PACKED_VERSION),
             f"wire format version {version} is not supported (this build reads {VERSION} and {PACKED_VERSION})", UnsupportedVersionError)
    _require(size <= limits.max_header_bytes, f"header of {size} bytes exceeds the limit of {limits.max_header_bytes}", LimitExceededError)
    _require(len(frame) == HEADER_PREFIX.size + size + DIGEST.size,
             f"header frame is {len(frame)} bytes, expected {HEADER_PREFIX.size + size + DIGEST.size}", TruncatedError)
    body = frame[HEADER_PREFIX.size : HEADER_PREFIX.size + size]
    (digest,) = DIGEST.unpack_from(frame, HEADER_PREFIX.size + size)
    _require(xxhash.xxh3_64_intdigest(body) == digest, "header checksum mismatch", ChecksumError)
    try:
        data = json.loads(body)
        header = WireHeader(**data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CodecError(f"malformed header: {exc}") from exc
    validate_header(header, limits)
    _require(header.version == version, f"a version {version} header with layers_per_chunk {header.layers_per_chunk} "
             f"(packed layers are version {PACKED_VERSION}, one layer per chunk version {VERSION})", UnsupportedVersionError)
    return header


def validate_header(h: WireHeader, limits: DecodeLimits) -> None:
    _require(isinstance(h.codec, str) and isinstance(h.params, dict), "header codec must be a name and params a mapping")
    _require(h.dtype in DTYPES, f"header dtype {h.dtype!r} is not one of {tuple(DTYPES)}")
    _require(integer_in(h.batch, 1), f"header batch {h.batch!r} must be an integer >= 1")
    _require(h.batch <= limits.max_batch, f"batch {h.batch} exceeds the limit of {limits.max_batch}", LimitExceededError)
    _require(integer_in(h.tokens, 0), f"header tokens {h.tokens!r} must be an integer >= 0")
    _require(h.tokens <= limits.max_tokens, f"{h.tokens} tokens exceed the limit of {limits.max_tokens}", LimitExceededError)
    _require(h.tokens >= limits.min_tokens, f"a cache of {h.tokens} tokens; at least {limits.min_tokens} expected", ShapeMismatchError)
    _require(isinstance(h.layers, list) and len(h.layers) >= 1, "header layers must be a non-empty list")
    _require(len(h.layers) <= limits.max_layers, f"{len(h.layers)} layers exceed the limit of {limits.max_layers}", LimitExceededError)
    for i, layer in enumerate(h.layers):
        _require(isinstance(layer, list) and len(layer) == 4 and all(integer_in(x, 1, 1 << 16) for x in layer),
                 f"layer {i} shape {layer!r} must be [kv_heads_k, head_dim_k, kv_heads_v, head_dim_v] of positive integers")
    _require(h.raw_nbytes() <= limits.max_raw_bytes, f"decoded cache of {h.raw_nbytes()} bytes exceeds the limit of {limits.max_raw_bytes}", LimitExceededError)
    _require(isinstance(h.lengths, list) and len(h.lengths) == h.batch and all(integer_in(n, 0, h.tokens) for n in h.lengths),
             f"header lengths must be {h.batch} integers in [0, {h.tokens}]")
    _require(isinstance(h.positions, list) and len(h.positions) == h.batch
             and all(isinstance(row, list) and len(row) == h.tokens and all(type(p) is int and 0 <= p <= 1 << 31 for p in row)
                     for row in h.positions),
             f"header positions must be {h.batch} rows of {h.tokens} non-negative integers")
    _require(isinstance(h.rope_applied, bool) and isinstance(h.fingerprint, str), "header rope_applied must be a bool and fingerprint a string")
    _require(integer_in(h.chunk_tokens, 1), f"header chunk_tokens {h.chunk_tokens!r} must be an integer >= 1")
    _require(integer_in(h.layers_per_chunk, 1, len(h.layers)),
             f"header layers_per_chunk {h.layers_per_chunk!r} must be an integer in [1, {len(h.layers)}]")
    if h.layers_per_chunk > 1:
        _require(h.chunk_tokens >= h.tokens, f"a packed header's chunk_tokens {h.chunk_tokens} must cover its {h.tokens} tokens",
                 ShapeMismatchError)
        expected = math.ceil(len(h.layers) / h.layers_per_chunk)
    else:
        expected = len(h.layers) * max(1, math.ceil(h.tokens / h.chunk_tokens))
    _require(expected <= limits.max_chunks, f"{expected} chunks exceed the limit of {limits.max_chunks}", LimitExceededError)
    _require(h.num_chunks == expected, f"header num_chunks {h.num_chunks!r} disagrees with its shapes ({expected})", ShapeMismatchError)


@dataclass
class ChunkEvent:
    """One decoded chunk; ``layer_complete`` once every chunk of that layer has arrived."""

    seq: int
    layer: int
    token_start: int
    token_count: int
    keys: torch.Tensor
    values: torch.Tensor
    layer_complete: bool


class StreamDecoder:
    """Feed frames one at a time (header first); get chunk events; ``finish()`` returns the KVCache."""

    def __init__(self, limits: DecodeLimits = DecodeLimits(), strict_order: bool = True, bases=None) -> None:
        """``bases``: the ``transform.KVBases`` a pca stream's basis is looked up in (the process-wide
        default when None)."""
        self.limits, self.strict_order, self.bases = limits, strict_order, bases
        self.header: WireHeader | None = None
        self.codec: Codec | None = None
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.received: set[int] = set()
        self.pending_per_layer: list[int] = []
        self.wire_bytes = 0
        self._flat: torch.Tensor | None = None  # packed streams: every layer's K, V as one run of elements
        self._offsets: list[int] = []  # element offset of each layer's K in ``_flat`` (and the total, last)

    def feed(self, frame: bytes) -> ChunkEvent | None:
        self.wire_bytes += len(frame)
        if self.header is None:
            self.header = parse_header(bytes(frame), self.limits)
            self.codec = get_codec(self.header.codec, **self.header.params).bind(self.header.fingerprint, self.header.rope_applied, self.bases)
            self.keys = [None] * len(self.header.layers)
            self.values = [None] * len(self.header.layers)
            packed = self.header.layers_per_chunk > 1
            _require(not packed or self.codec.packs_layers,
                     f"codec {self.header.codec!r} cannot decode packed layers (layers_per_chunk {self.header.layers_per_chunk})")
            if self.codec.writes_in_place or packed:
                self.keys, self.values, self._flat = cache_storage(self.header)
                self._offsets = [0]
                for k, v in zip(self.keys, self.values):
                    self._offsets.append(self._offsets[-1] + k.numel() + v.numel())
            self.pending_per_layer = [0] * len(self.header.layers)
            for layer, _, _ in self.header.ranges:
                for covered in self.header.span(layer):
                    self.pending_per_layer[covered] += 1
            return None
        return self._chunk(memoryview(frame))

    def _chunk(self, frame: memoryview) -> ChunkEvent:
        return self.place(self.decode_chunk(frame))

    def decode_chunk(self, frame: bytes | memoryview) -> ChunkEvent:
        """Verify and decode one chunk frame without touching decoder state (safe to run in threads).

        Every check on this path is an ``if`` whose message is formatted only when it fails: a stream of
        raw chunks is a memcpy per frame, and eager f-strings cost a third as much again."""
        h = self.header
        frame = memoryview(frame)
        if len(frame) < CHUNK_PREFIX_SIZE:
            raise TruncatedError(f"chunk frame of {len(frame)} bytes is truncated")
        if frame[:4] != CHUNK_MAGIC:
            raise BadMagicError(f"bad chunk magic {bytes(frame[:4])!r}, expected {CHUNK_MAGIC!r}")
        seq, layer, _, start, count, size = CHUNK_FIELDS.unpack_from(frame, 4)
        if len(frame) != CHUNK_PREFIX_SIZE + size:
            raise TruncatedError(f"chunk {seq} is {len(frame)} bytes, its prefix says {CHUNK_PREFIX_SIZE + size}")
        (digest,) = DIGEST.unpack_from(frame, 4 + CHUNK_FIELDS.size)
        check = xxhash.xxh3_64(frame[4 : 4 + CHUNK_FIELDS.size])
        check.update(frame[CHUNK_PREFIX_SIZE:])
        if check.intdigest() != digest:
            raise ChecksumError(f"chunk {seq} checksum mismatch")
        if seq >= h.num_chunks:
            raise ShapeMismatchError(f"chunk sequence number {seq} is beyond the header's {h.num_chunks} chunks")
        want = h.ranges[seq]
        if want[0] != layer or want[1] != start or want[2] != count:
            raise ShapeMismatchError(f"chunk {seq} covers (layer, start, count) = {(layer, start, count)}, header says {want}")
        packed = h.layers_per_chunk > 1
        in_place = self.codec.writes_in_place
        try:
            if (in_place or packed) and seq in self.received:  # an arrived chunk must not overwrite slots a consumer may be reading
                raise DuplicateChunkError(f"chunk {seq} arrived twice")
            if packed:  # whole layers, straight into their run of the cache's storage (views of it: no shape to check)
                span = h.span(layer)
                self.codec.decode_packed_into(frame[CHUNK_PREFIX_SIZE:], self._flat[self._offsets[span.start] : self._offsets[span.stop]])
                return ChunkEvent(seq, layer, start, count, self.keys[layer], self.values[layer], False)  # its first layer
            if in_place:  # straight into the cache's storage (chunks cover disjoint slots; shapes fixed by the header)
                keys, values = self.keys[layer], self.values[layer]
                if count != h.tokens:
                    keys, values = keys[:, :, start : start + count], values[:, :, start : start + count]
                self.codec.for_layer(layer).decode_into(frame[CHUNK_PREFIX_SIZE:], keys, values)
                return ChunkEvent(seq, layer, start, count, keys, values, False)
            key_shape, value_shape = h.chunk_shapes(layer, count)
            keys, values = self.codec.for_layer(layer).decode(frame[CHUNK_PREFIX_SIZE:], key_shape, value_shape, h.torch_dtype)
        except CodecError:
            raise
        except Exception as exc:  # a codec bug must still surface as a codec error, never crash a service
            raise CodecError(f"chunk {seq} could not be decoded: {type(exc).__name__}: {exc}") from exc
        if tuple(keys.shape) != key_shape or tuple(values.shape) != value_shape or not keys.dtype == values.dtype == h.torch_dtype:
            raise ShapeMismatchError(f"chunk {seq} decoded to {tuple(keys.shape)}/{tuple(values.shape)} {keys.dtype}, "
                                     f"expected {key_shape}/{value_shape} {h.torch_dtype}")
        return ChunkEvent(seq, layer, start, count, keys, values, False)

    def place(self, event: ChunkEvent) -> ChunkEvent:
        """Check the chunk's sequence number against what arrived, then write it into the cache."""
        h, seq, layer, start, count = self.header, event.seq, event.layer, event.token_start, event.token_count
        if seq in self.received:
            raise DuplicateChunkError(f"chunk {seq} arrived twice")
        if self.strict_order and seq != len(self.received):
            raise OutOfOrderChunkError(f"chunk {seq} arrived out of order (expected {len(self.received)})")
        if self.codec.writes_in_place or h.layers_per_chunk > 1:
            pass  # decoded in place
        elif count == h.tokens:  # the chunk is the whole layer: keep the decoded tensors, no copy
            self.keys[layer], self.values[layer] = event.keys, event.values
        else:
            self._write(layer, start, count, event)
        self.received.add(seq)
        pending = self.pending_per_layer
        for covered in h.span(layer):
            pending[covered] -= 1
        event.layer_complete = pending[layer] == 0
        return event

    def _write(self, layer: int, start: int, count: int, event: ChunkEvent) -> None:
        h = self.header
        if self.keys[layer] is None:
            full_k, full_v = h.chunk_shapes(layer, h.tokens)
            self.keys[layer] = torch.empty(full_k, dtype=h.torch_dtype)
            self.values[layer] = torch.empty(full_v, dtype=h.torch_dtype)
        # Byte-level numpy copies: single-threaded memcpy, no intra-op thread pool wake-ups per chunk.
        _byte_view(self.keys[layer])[:, :, start : start + count] = _byte_view(event.keys)
        _byte_view(self.values[layer])[:, :, start : start + count] = _byte_view(event.values)

    @property
    def complete(self) -> bool:
        return self.header is not None and len(self.received) == self.header.num_chunks

    def finish(self) -> KVCache:
        if self.header is None:
            raise TruncatedError("stream ended before its header")
        missing = sorted(set(range(self.header.num_chunks)) - self.received)
        _require(not missing, f"stream ended with {len(missing)} of {self.header.num_chunks} chunks missing (first: {missing[:5]})", MissingChunkError)
        h = self.header
        positions = torch.from_numpy(np.array(h.positions, dtype=np.int64).reshape(h.batch, h.tokens))
        mask = torch.from_numpy(np.arange(h.tokens)[None, :] < np.array(h.lengths, dtype=np.int64)[:, None])  # (B, T)
        return KVCache(list(self.keys), list(self.values), mask, positions, h.rope_applied, h.fingerprint)


HUGE_PAGE_STORAGE_BYTES = 4 << 20  # numpy's threshold for madvise(MADV_HUGEPAGE)


def cache_storage(header: WireHeader) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Every layer's K and V of a stream as views of one buffer, allocated once when the header arrives
    (K0, V0, K1, V1, ... back to back: a packed chunk's run of elements), and that buffer, flat.

    One numpy allocation (transparent huge pages above 4 MB) instead of two per chunk: a 26.5 MB cache in
    fresh per-chunk tensors faulted in ~6,500 pages, about as long as decoding it. Untouched pages cost
    nothing, so a header whose chunks never come holds no memory (its size is within ``DecodeLimits``).
    """
    dtype = header.torch_dtype
    shapes = [shape for layer in range(len(header.layers)) for shape in header.chunk_shapes(layer, header.tokens)]
    sizes = [math.prod(shape) for shape in shapes]
    if header.raw_nbytes() >= HUGE_PAGE_STORAGE_BYTES:  # numpy asks for transparent huge pages (madvise)
        storage = torch.from_numpy(np.empty(header.raw_nbytes(), dtype=np.uint8)).view(dtype)
    else:  # small caches: one torch allocation, cheaper than numpy's round trip
        storage = torch.empty(sum(sizes), dtype=dtype)
    if len(set(shapes)) == 1:  # every K and V alike (the usual geometry): one view, unbound (µs count on small caches)
        tensors = list(storage.view(len(shapes), *shapes[0]).unbind(0))
    else:
        tensors = [piece.view(shape) for piece, shape in zip(storage.split(sizes), shapes)]
    return tensors[0::2], tensors[1::2], storage


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    """(B, H, T, D) tensor -> (B, H, T, D·itemsize) uint8 numpy view of the same memory."""
    return tensor.contiguous().view(torch.uint8).numpy()


def split_frames(blob: bytes | memoryview) -> Iterator[memoryview]:
    """Cut a concatenated stream into frames using their length fields (TruncatedError on a short tail)."""
    view = memoryview(blob)
    offset = 0
    while offset < len(view):
        magic = bytes(view[offset : offset + 4])
        if magic == HEADER_MAGIC:
            _require(len(view) - offset >= HEADER_PREFIX.size, "stream ends inside a header prefix", TruncatedError)
            size = HEADER_PREFIX.size + HEADER_PREFIX.unpack_from(view, offset)[3] + DIGEST.size
        elif magic == CHUNK_MAGIC:
            _require(len(view) - offset >= CHUNK_PREFIX_SIZE, "stream ends inside a chunk prefix", TruncatedError)
            size = CHUNK_PREFIX_SIZE + CHUNK_FIELDS.unpack_from(view, offset + 4)[5]
        else:
            raise BadMagicError(f"bad frame magic {magic!r} at byte {offset}")
        _require(offset + size <= len(view), f"frame at byte {offset} needs {size} bytes, {len(view) - offset} remain", TruncatedError)
        yield view[offset : offset + size]
        offset += size


def decode_frames(
    frames: Iterable[bytes | memoryview], limits: DecodeLimits = DecodeLimits(), strict_order: bool = True, workers: int = 1,
    bases=None,
) -> KVCache:
    """Decode a header frame and its chunk frames; ``workers`` > 1 decodes chunks in parallel threads."""
    decoder = StreamDecoder(limits, strict_order, bases)
    frames = iter(frames)
    for frame in frames:
        decoder.feed(frame)
        break
    if decoder.header is None or chunk_workers(decoder.header, workers) == 1:
        for frame in frames:
            decoder.feed(frame)
    else:
        for event in worker_pool(workers).map(decoder.decode_chunk, frames):
            decoder.place(event)
    return decoder.finish()


def decode_cache(blob: bytes, limits: DecodeLimits = DecodeLimits(), workers: int = 1, bases=None) -> KVCache:
    """Inverse of ``encode_cache``."""
    return decode_frames(split_frames(blob), limits, workers=workers, bases=bases)


def round_trip(cache: KVCache, codec: Codec, dtype: torch.dtype = torch.bfloat16, on_payload=None, model=None, bases=None) -> KVCache:
    """``densecomm_core.hop.round_trip`` (kept here for callers of the codec package)."""
    from densecomm_core.hop import round_trip as hop_round_trip

    return hop_round_trip(cache, codec, dtype=dtype, on_payload=on_payload, model=model, bases=bases)
