"""Layer-by-layer cache transformation on a frame stream: what the adapter hop does as chunks arrive.

    StreamingAdapter.feed(frame) -> frames   decode sender chunks; once sender layer a(l) is complete,
                                             strip its RoPE, run T_θ for receiver layer l, restore the
                                             receiver's RoPE and encode it; emits frames in wire order
    StreamingAdapter.finish()                check the input stream was complete

Receiver layers go out in order l = 0, 1, ... as soon as their source layer is in, so the receiver can
hold layer 0 while the sender is still sending later layers. Both sides of the adapter are hops
(``densecomm_core.hop``): ``input_report`` and ``output_report`` say what each carried.
"""

from __future__ import annotations

import time

import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.codec.base import Codec, CodecError, DecodeLimits
from densecomm_core.codec.wire import WireHeader
from densecomm_core.errors import CacheLayoutError, GeometryMismatchError
from densecomm_core.hop import HopDecoder, HopEncoder, HopReport
from densecomm_core.models import RopeModel
from densecomm_core.rope import rope_tables, rotate_keys, unrotate_keys


class StreamingAdapter:
    def __init__(
        self,
        adapter: DenseAdapter,
        sender: RopeModel,
        receiver: RopeModel,
        codec: Codec,
        chunk_tokens: int | None = None,
        limits: DecodeLimits = DecodeLimits(),
        bases=None,
        frame_bytes: int | None = None,
    ) -> None:
        """``bases``: the route's ``KVBases`` (the incoming stream's and the outgoing one's pca bases);
        ``frame_bytes``: split outgoing layers into chunks of at most this many raw bytes (``HopEncoder``)."""
        self.adapter, self.sender, self.receiver = adapter, sender, receiver
        self.incoming = HopDecoder(sender, bases, limits)
        self.outgoing = HopEncoder(codec, bases, receiver, chunk_tokens, frame_bytes=frame_bytes)
        self.decoder = self.incoming.stream
        self.next_layer = 0  # next receiver layer to emit
        self.transform_seconds = 0.0
        self._tables = None

    @property
    def input_report(self) -> HopReport:
        return self.incoming.report

    @property
    def output_report(self) -> HopReport:
        return self.outgoing.report

    @property
    def raw_bytes_out(self) -> int:
        return self.outgoing.report.raw_bytes

    def _start(self, header: WireHeader) -> list[bytes]:
        s, r = self.sender.geometry, self.receiver.geometry
        if header.fingerprint != s.fingerprint():  # "" (a cache of unknown origin) is refused too, as the receiver does
            raise GeometryMismatchError(f"incoming cache is from {header.fingerprint or 'an unnamed model'}, this adapter expects sender {s.fingerprint()}")
        expected = [[s.num_kv_heads, s.head_dim, s.num_kv_heads, s.head_dim]] * s.num_layers
        if header.layers != expected:
            raise CacheLayoutError(f"incoming cache layers {header.layers[:2]}... do not match sender geometry {expected[0]} x {s.num_layers}")
        device = self.adapter.gate_logit.device  # RoPE and T_θ run where the adapter lives (a GPU, say)
        positions = torch.tensor(header.positions, dtype=torch.long, device=device).reshape(header.batch, header.tokens)
        self._tables = (rope_tables(self.sender, positions), rope_tables(self.receiver, positions))  # per layer (None: no RoPE)
        # Either side may travel RoPE-stripped (codecs that code stripped keys): the incoming header says
        # whether there is a rotation to remove; the outgoing codec says whether to apply the receiver's.
        self.in_rotated, self.out_rotated = header.rope_applied, not self.outgoing.codec.strips_rope
        return [self.outgoing.begin(self.receiver.dtype, [[r.num_kv_heads, r.head_dim, r.num_kv_heads, r.head_dim]] * r.num_layers,
                                    header.lengths, header.positions, self.out_rotated, r.fingerprint())]

    @torch.no_grad()
    def feed(self, frame: bytes) -> list[bytes]:
        """Consume one incoming frame; return the outgoing frames it made ready (possibly none)."""
        if self.decoder.header is None:
            self.incoming.feed(frame)
            return self._start(self.decoder.header)
        event = self.incoming.feed(frame)
        if not event.layer_complete:
            return []
        out: list[bytes] = []
        layer_map = self.adapter.config.layer_map
        sender_tables, receiver_tables = self._tables
        while self.next_layer < len(layer_map) and self.decoder.keys[layer_map[self.next_layer]] is not None \
                and self.decoder.pending_per_layer[layer_map[self.next_layer]] == 0:
            layer, source = self.next_layer, layer_map[self.next_layer]
            started = time.perf_counter()
            device = self.adapter.gate_logit.device
            keys = self.decoder.keys[source].to(device).float()
            if self.in_rotated and sender_tables[source] is not None:
                keys = unrotate_keys(keys, *sender_tables[source], self.sender)
            k, v = self.adapter.transform_layer(layer, keys, self.decoder.values[source])  # to its device and dtype
            if self.out_rotated and receiver_tables[layer] is not None:
                k = rotate_keys(k.float(), *receiver_tables[layer], self.receiver)
            k = k.to(self.receiver.dtype)
            v = v.to(self.receiver.dtype)
            self.transform_seconds += time.perf_counter() - started
            out.extend(self.outgoing.layer(layer, k, v))
            self.next_layer += 1
        return out

    def finish(self) -> None:
        """Raise the codec's MissingChunkError (etc.) unless every input chunk arrived and every layer went out."""
        self.decoder.finish()  # the input's completeness (the adapter reads its layers as they come)
        if self.next_layer != len(self.adapter.config.layer_map):
            raise CodecError(f"only {self.next_layer} of {len(self.adapter.config.layer_map)} receiver layers were produced")
