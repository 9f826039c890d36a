"""One cache crossing one hop: a cache in one model's space -> wire frames -> the cache in the consuming model's space.

    HopEncoder(codec, bases, model).start(cache) -> header frame   strip RoPE when the codec codes stripped
                                                                  keys, bind the codec to its basis among
                                                                  ``bases``, build the header (eagerly: a bad
                                                                  codec fails before any frame leaves)
    HopEncoder.chunks() -> chunk frames                           encode, in sequence order
    HopEncoder.frames(cache) -> frames                            both of the above
    HopEncoder.begin(...) / .layer(l, keys, values)               the same for a producer that emits layer by
                                                                  layer (the adapter)
    HopDecoder(model, bases, dtype, device).feed(frame)           verify and decode each frame as it arrives
    HopDecoder.finish() -> KVCache                                the cache in the model's space: RoPE restored
                                                                  when the stream travelled stripped, cast to the
                                                                  model's dtype, on its device
    round_trip(cache, codec, model=, bases=)                      the two in process, one payload per batch row
    reconstruct(cache, codec, model=, bases=)                     what round_trip gives on every real token, on
                                                                  tensors (token-wise codecs; training's path)

Both ends fill a ``HopReport`` (codec, raw and wire bytes, chunks, seconds) that the services turn into
stats and metrics. Bases are passed in (a ``transform.KVBases``; None = the process-wide default).

Frames sized for the transport: given ``frame_bytes`` (and no explicit ``chunk_tokens``), the encoder
splits a layer into token ranges of at most ``frame_bytes`` raw bytes, or, when whole layers are smaller
and the codec ``packs_layers``, packs as many whole layers as fit into one chunk (wire version 2: a small
cache is one chunk); ``pack_frames`` / ``join_messages``
join consecutive frames into one message while it stays within ``frame_bytes`` (``wire.split_frames``
cuts them apart again); ``group_messages`` gives the same messages as lists of buffers, unjoined.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec.base import Codec, CodecError, DecodeLimits
from densecomm_core.codec.wire import (
    ChunkEvent,
    StreamDecoder,
    WireHeader,
    chunk_workers,
    encode_packed_chunk,
    header_frame,
    is_chunk,
    iter_chunk_frames,
    iter_chunk_parts,
    layer_frames,
    start_stream,
    stream_header,
    worker_pool,
)
from densecomm_core.errors import GeometryMismatchError


@dataclass
class HopReport:
    """What one end of a hop measured: filled by ``HopEncoder`` (encode_s) and ``HopDecoder`` (decode_s)."""

    codec: str = ""
    raw_bytes: int = 0  # K and V as they entered the encoder (or left the decoder), uncompressed
    wire_bytes: int = 0  # every frame, header included
    chunks: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    transport: str = "bytes"  # how the frames crossed: "bytes" (in the gRPC messages) or a shortcut's name

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 0.0

    def count(self, frame) -> None:
        self.wire_bytes += len(frame)
        self.chunks += is_chunk(frame)


class HopEncoder:
    """A cache in ``model``'s space -> the frames of one hop through ``codec``."""

    def __init__(self, codec: Codec, bases=None, model=None, chunk_tokens: int | None = None, workers: int = 1,
                 dtype: torch.dtype | None = None, frame_bytes: int | None = None) -> None:
        """``model`` (a RopeModel) strips its rotation when the codec codes stripped keys; ``dtype`` is
        the dtype on the wire (default: the cache's); ``frame_bytes`` sizes chunks and messages for the
        transport (None: one chunk per layer unless ``chunk_tokens``, one frame per message)."""
        if frame_bytes is not None and frame_bytes < 1:
            raise ValueError(f"frame_bytes must be >= 1 (or None), got {frame_bytes}")
        self.codec, self.bases, self.model = codec, bases, model
        self.chunk_tokens, self.workers, self.dtype, self.frame_bytes = chunk_tokens, workers, dtype, frame_bytes
        self.report = HopReport(codec=codec.name)
        self.header: WireHeader | None = None
        self._stream: tuple[KVCache, Codec, WireHeader] | None = None
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layers of a packed chunk not yet complete

    def ship(self, cache: KVCache) -> KVCache:
        """The cache as it travels: RoPE-stripped (in float32, then cast) when the codec codes stripped keys."""
        dtype = self.dtype or cache.dtype
        if self.codec.strips_rope and cache.rope_applied:
            if self.model is None:
                raise CodecError(f"{self.codec.name} codes RoPE-stripped keys: the hop needs the cache's model to strip RoPE")
            from densecomm_core.rope import strip_rope

            return strip_rope(cache, self.model).to(dtype=dtype)
        return cache if cache.dtype == dtype else cache.to(dtype=dtype)

    def check(self, cache_fingerprint: str, rope_applied: bool = True) -> None:
        """Raise now what ``start`` would raise on binding the codec to a cache of that space and RoPE state
        (a ``pca`` codec with no basis for the space it will ship), before any model work makes the cache."""
        self.codec.bind(cache_fingerprint, rope_applied and not self.codec.strips_rope, self.bases)

    def start(self, cache: KVCache) -> bytes:
        """The header frame of ``cache``'s stream (RoPE stripped, codec bound, header built)."""
        started = time.perf_counter()
        shipped = self.ship(cache)
        self.report.raw_bytes = shipped.nbytes
        layers = [[k.shape[1], k.shape[3], v.shape[1], v.shape[3]] for k, v in zip(shipped.keys, shipped.values)]
        chunk_tokens = self._chunk_tokens(layers, shipped.batch_size, shipped.dtype)
        packing = self._layers_per_chunk(layers, shipped.batch_size, shipped.keys[0].shape[2], shipped.dtype)
        self._stream = start_stream(shipped, self.codec, chunk_tokens, self.bases, packing)
        self.codec, self.header = self._stream[1], self._stream[2]
        frame = header_frame(self.header)
        self.report.count(frame)
        self.report.encode_s += time.perf_counter() - started
        return frame

    @property
    def copy_only(self) -> bool:
        """Whether the started stream's frames are only copies of host memory (a ``Codec.copy_only`` codec
        and the cache on the CPU): cheaper to encode on the caller's thread than to hand to a worker. A
        cache on an accelerator is not: each chunk waits on a device-to-host copy, which a worker overlaps."""
        return self._stream is not None and self.codec.copy_only and self._stream[0].keys[0].device.type == "cpu"

    def chunk_parts(self) -> Iterator[list]:
        """The chunk frames of the started stream, each as a list of buffers."""
        return self._timed(iter_chunk_parts, lambda parts: sum(len(memoryview(p).cast("B")) for p in parts))

    def chunks(self) -> Iterator[bytes]:
        """The chunk frames of the started stream, each joined by the thread that encoded it."""
        return self._timed(iter_chunk_frames, len)

    def _timed(self, encode, size) -> Iterator:
        if self._stream is None:
            raise CodecError("HopEncoder.start(cache) must come before its chunks")
        # a copy_only stream is encoded on the caller's thread (``copy_only``): no worker pool to wait on
        frames = encode(*self._stream, workers=1 if self.copy_only else self.workers)
        while True:
            started = time.perf_counter()
            frame = next(frames, None)
            if frame is not None:
                self.report.wire_bytes += size(frame)
                self.report.chunks += 1
            self.report.encode_s += time.perf_counter() - started
            if frame is None:
                return
            yield frame

    def _chunk_tokens(self, layers: list, batch: int, dtype: torch.dtype) -> int | None:
        """Tokens per chunk: the explicit ``chunk_tokens``, else as many as keep the biggest layer's chunk
        within ``frame_bytes`` of raw K and V (None: one chunk per layer)."""
        if self.chunk_tokens or not self.frame_bytes:
            return self.chunk_tokens
        per_token = max(batch * (hk * dk + hv * dv) * dtype.itemsize for hk, dk, hv, dv in layers)  # bytes of one token, one layer
        return max(1, self.frame_bytes // max(per_token, 1))

    def _layers_per_chunk(self, layers: list, batch: int, tokens: int, dtype: torch.dtype) -> int:
        """Whole layers per chunk: as many as fit in ``frame_bytes`` of raw K and V when the codec packs
        layers and the sizing is left to ``frame_bytes`` (1: a chunk per layer, or per token range)."""
        if not self.codec.packs_layers or self.chunk_tokens or not self.frame_bytes:
            return 1
        per_layer = max(batch * tokens * (hk * dk + hv * dv) * dtype.itemsize for hk, dk, hv, dv in layers)
        return max(1, min(len(layers), self.frame_bytes // max(per_layer, 1)))


    def frames(self, cache: KVCache) -> Iterator[bytes]:
        yield self.start(cache)
        yield from self.chunks()

    # ---- producers that emit layer by layer --------------------------------------------------------
    def begin(self, dtype: torch.dtype, layers: list, lengths: list, positions: list, rope_applied: bool, fingerprint: str) -> bytes:
        """The header frame of a stream whose layers arrive one by one (``layer``)."""
        started = time.perf_counter()
        self.codec = self.codec.bind(fingerprint, rope_applied, self.bases)
        chunk_tokens = self._chunk_tokens(layers, len(lengths), dtype)
        packing = self._layers_per_chunk(layers, len(lengths), len(positions[0]) if positions else 0, dtype)
        self.header = stream_header(self.codec, dtype, layers, lengths, positions, rope_applied, fingerprint, chunk_tokens, packing)
        frame = header_frame(self.header)
        self.report.count(frame)
        self.report.encode_s += time.perf_counter() - started
        return frame

    def layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list[bytes]:
        """The chunk frames of one layer (full-width K, V in the stream's dtype); in a packed stream, the
        chunk of its group once the group's last layer is in (layers arrive in order), else nothing."""
        started = time.perf_counter()
        if self.header.layers_per_chunk > 1:
            frames = self._packed_layer(layer, keys, values)
        else:
            frames = layer_frames(self.header, self.codec, layer, keys, values)
        self.report.raw_bytes += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        for frame in frames:
            self.report.count(frame)
        self.report.encode_s += time.perf_counter() - started
        return frames

    def _packed_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list[bytes]:
        header = self.header
        first = layer - layer % header.layers_per_chunk
        if layer != first + len(self._held):
            raise CodecError(f"layer {layer} arrived out of order: a packed stream takes its layers in order")
        self._held[layer] = (keys, values)
        if layer != header.span(first)[-1]:
            return []
        held, self._held = self._held, {}
        keys_by_layer = {l: kv[0] for l, kv in held.items()}
        values_by_layer = {l: kv[1] for l, kv in held.items()}
        return [b"".join(encode_packed_chunk(self.codec, first // header.layers_per_chunk, header, keys_by_layer, values_by_layer))]


def join_messages(frames: Iterable[list], frame_bytes: int | None) -> Iterator[bytes]:
    """Frames, each a list of buffers, -> transport messages: consecutive frames joined while a message
    stays within ``frame_bytes`` (each frame alone when None); ``wire.split_frames`` cuts them apart again."""
    for parts in group_messages(frames, frame_bytes):
        yield _joined(parts)


def group_messages(frames: Iterable[list], frame_bytes: int | None) -> Iterator[list]:
    """``join_messages`` before the join: each message as the list of its buffers (a transport that copies
    them elsewhere anyway, a shared-memory slot, skips the join)."""
    limit = frame_bytes or 0
    pending: list = []
    size = 0
    for parts in frames:
        nbytes = sum(memoryview(p).nbytes for p in parts)
        if pending and size + nbytes > limit:
            yield pending
            pending, size = [], 0
        pending += parts
        size += nbytes
    if pending:
        yield pending


def _joined(parts: list) -> bytes:
    return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)


def pack_frames(frames: list[bytes], frame_bytes: int | None) -> list[bytes]:
    """Whole frames (bytes) as transport messages (``join_messages``)."""
    return list(join_messages(([f] for f in frames), frame_bytes))


class HopDecoder:
    """Frames of one hop -> the cache in ``model``'s space (RoPE restored, its dtype, on ``device``)."""

    def __init__(self, model=None, bases=None, limits: DecodeLimits = DecodeLimits(), dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, strict_order: bool = True) -> None:
        """``model`` (a RopeModel) is the consumer: the stream must be in its space (GeometryMismatchError
        otherwise) and a stripped stream gets its rotation back. ``dtype`` defaults to the model's
        (else the wire's), ``device`` to the CPU."""
        self.model, self.dtype, self.device = model, dtype, device
        self.stream = StreamDecoder(limits, strict_order, bases)
        self.report = HopReport()

    @property
    def header(self) -> WireHeader | None:
        return self.stream.header

    @property
    def copy_only(self) -> bool:
        """Whether the stream's codec is known and its decode is a copy (``Codec.copy_only``)."""
        return self.stream.codec is not None and self.stream.codec.copy_only

    def feed(self, frame) -> ChunkEvent | None:
        """Verify and decode one frame (header first); the chunk's event, or None for the header."""
        started = time.perf_counter()
        try:
            event = self.stream.feed(frame)
        finally:
            self.report.decode_s += time.perf_counter() - started
        self.report.wire_bytes += len(frame)
        if event is None:
            self.report.codec = self.stream.header.codec
            self.report.raw_bytes = self.stream.header.raw_nbytes()
        else:
            self.report.chunks += 1
        return event

    def feed_all(self, frames: Iterable, workers: int = 1) -> None:
        """Feed a whole stream; ``workers`` > 1 verify and decode chunks in parallel threads (in order)."""
        frames = iter(frames)
        for frame in frames:
            self.feed(frame)
            break
        if self.stream.header is None or chunk_workers(self.stream.header, workers) == 1:
            for frame in frames:
                self.feed(frame)
            return

        def decode(frame) -> tuple[int, ChunkEvent]:
            return len(frame), self.stream.decode_chunk(frame)

        started = time.perf_counter()
        for size, event in worker_pool(workers).map(decode, frames):
            self.stream.place(event)
            self.report.wire_bytes += size
            self.report.chunks += 1
        self.report.decode_s += time.perf_counter() - started

    def finish(self) -> KVCache:
        """The whole cache, once every chunk arrived (MissingChunkError otherwise), in the model's space."""
        started = time.perf_counter()
        cache = self.stream.finish()
        model = self.model
        if model is not None and cache.fingerprint != model.geometry.fingerprint():
            raise GeometryMismatchError(f"received a cache for {cache.fingerprint}, this model is {model.geometry.fingerprint()}")
        dtype = self.dtype or (model.dtype if model is not None else cache.dtype)
        if not cache.rope_applied and model is not None:  # shipped RoPE-stripped: the consumer re-applies its rotation
            from densecomm_core.rope import restore_rope

            cache = restore_rope(cache.to(device=self.device), model, dtype=dtype)
        if cache.dtype != dtype or (self.device is not None and cache.keys[0].device != torch.device(self.device)):
            cache = cache.to(dtype=dtype, device=self.device)
        self.report.decode_s += time.perf_counter() - started
        return cache


def round_trip(cache: KVCache, codec: Codec, dtype: torch.dtype = torch.bfloat16, on_payload=None, model=None,
               bases=None, frame_bytes: int | None = None) -> KVCache:
    """``cache`` as a consumer gets it through ``codec``: one wire payload per request (no batch padding),
    shipped in ``dtype``, decoded and re-batched in the cache's own dtype on its device. ``on_payload(raw,
    wire)`` sees each request's byte counts. A codec that codes RoPE-stripped keys needs the cache's
    ``model`` (a RopeModel): its rotation is stripped before encoding and re-applied after, as the
    services do. ``bases``: the pca codec's ``KVBases`` (None: the process-wide default); ``frame_bytes``:
    frames sized as a service's (``HopEncoder``: small caches packed in one chunk)."""
    if codec.strips_rope and cache.rope_applied and model is None:
        raise CodecError(f"{codec.name} codes RoPE-stripped keys: round_trip needs the cache's model to strip and restore RoPE")
    device = cache.keys[0].device
    consumer = model if codec.strips_rope and cache.rope_applied else None
    rows = []
    for b in range(cache.batch_size):
        encoder = HopEncoder(codec, bases, model, dtype=dtype, frame_bytes=frame_bytes)
        decoder = HopDecoder(consumer, bases, dtype=cache.dtype, device=device)
        for frame in encoder.frames(cache.rows([b]).trimmed()):
            decoder.feed(frame)
        rows.append(decoder.finish())
        if on_payload is not None:
            on_payload(encoder.report.raw_bytes, encoder.report.wire_bytes)
    return KVCache.stack_rows(rows)


def reconstruct(cache: KVCache, codec: Codec, dtype: torch.dtype = torch.bfloat16, model=None, bases=None) -> KVCache:
    """``cache`` as ``round_trip`` delivers it, on every real token, computed on tensors where it lives.

    For a ``token_wise`` codec the padded batch is coded as a whole (each token's reconstruction depends
    on that token alone, so padding changes nothing), without bytes, on the cache's device: the path for
    training through a codec. A codec that codes RoPE-stripped keys returns the cache stripped (in the
    cache's dtype): the consumer re-applies its rotation (``relay.transform_cache`` reads it as it is).
    Other codecs (per-chunk scales, token selection) make the byte round trip."""
    if not codec.token_wise:
        return round_trip(cache, codec, dtype=dtype, model=model, bases=bases)
    shipped = HopEncoder(codec, bases, model, dtype=dtype).ship(cache)
    bound = codec.bind(shipped.fingerprint, shipped.rope_applied, bases)
    keys, values = [], []
    for layer, (k, v) in enumerate(zip(shipped.keys, shipped.values)):
        k, v = bound.for_layer(layer).reconstruct(k, v)
        keys.append(k.to(cache.dtype))
        values.append(v.to(cache.dtype))
    return shipped.with_tensors(keys, values)
