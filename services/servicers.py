"""The four gRPC servicers (grpc.aio). Thin: translate messages, call the core, map errors in one place.

    RelayServicer.Relay        public ingress: validate, call Sender.Prefill, stream events back
    SenderServicer.Prefill     prefill X, encode layer by layer, stream frames into Adapter.Transform
    AdapterServicer.Transform  decode sender chunks, map each receiver layer as soon as its source
                               layer is in (core.streaming), stream frames into Receiver.Generate
    ReceiverServicer.Generate  assemble the cache as chunks arrive, generate, stream tokens + stats

KV flows forward in client streams; token events and the final stats flow back along the same calls.
Moving a cache across a hop is ``densecomm_core.hop`` (HopEncoder / HopDecoder); each hop's sending end
reports it in the stream's ``StreamDone``, and the receiver assembles the final stats once from those
reports (``final_stats``). Every downstream call carries a deadline; model work runs in worker threads
so the event loop stays free. ``Servicer.build(config, metrics, downstream)`` loads what a service
holds; ``close()`` releases its downstream channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid

import grpc
import torch

from densecomm_core.codec.base import CodecError, DataLossError
from densecomm_core.codec.wire import split_frames
from densecomm_core.generation import GenerationConfig
from densecomm_core.hop import HopDecoder, HopEncoder, HopReport, group_messages, join_messages
from densecomm_core.relay import (
    ContextMode,
    PromptFormat,
    receiver_generate,
    sender_prefill,
)
from densecomm_core.streaming import StreamingAdapter
from services import kvstream, limits, protos, runtime, security, shm, transport
from services.config import ServeConfig
from services.errors import DownstreamError, RequestError, RouteNotFound, status_for
from services.metrics import ServiceMetrics
from services.runtime import (
    codec_for,
    context_text,
    input_ids,
    pick,
    receiver_codec_for,
    route_name,
    validate_request,
)

relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()
log = logging.getLogger(__name__)
FORMAT = PromptFormat()


def channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", config.max_message_bytes), ("grpc.max_receive_message_length", config.max_message_bytes),
            # a restarted downstream is found again within a second or two, not after minutes of back-off
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class Downstream:
    """Round-robin over the replicas of the next service; one channel per address."""

    def __init__(self, addresses: list[str], stub_class, config: ServeConfig) -> None:
        if not addresses:
            raise ValueError("a downstream service needs at least one address")
        self.addresses = list(addresses)
        self.channels = [security.internal_channel(a, channel_options(config), config) for a in addresses]
        self.stubs = [stub_class(c) for c in self.channels]
        self.next = 0

    async def stub(self, timeout: float = 2.0):
        """The next replica's stub, once its channel is connected; UNAVAILABLE if it cannot connect in time.

        Checking first means a dead downstream is reported as UNAVAILABLE, not as a failed stream write.
        """
        index = self.next % len(self.stubs)
        self.next += 1
        channel = self.channels[index]
        if channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except asyncio.TimeoutError:
                raise DownstreamError(grpc.StatusCode.UNAVAILABLE, f"downstream {self.addresses[index]} is unavailable") from None
        return self.stubs[index]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


def hop_timeout(context, config: ServeConfig) -> float:
    """An internal call's deadline: the hop deadline, never later than our own caller's."""
    remaining = context.time_remaining() if context is not None else None
    return min(config.hop_deadline_s, remaining) if remaining is not None else config.hop_deadline_s


async def in_thread(stop: threading.Event, function, *args, **kwargs):
    """``function`` in a worker thread with ``should_stop=stop.is_set``. If this coroutine is cancelled
    (the caller went away), ``stop`` is set, so the thread abandons its work at its next check."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args, should_stop=stop.is_set, **kwargs))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a stopped thread's error is expected
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        raise


# A cache-path failure that on_cache_failure = text answers by letting the receiver read the input.
CACHE_PATH_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION,
                       grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def cache_failure_policy(request, config: ServeConfig) -> str:
    """``error`` or ``text``: the request's own policy, else its route's, else the service default."""
    if request.on_cache_failure == relay_pb2.CACHE_FAILURE_POLICY_TEXT:
        return "text"
    if request.on_cache_failure == relay_pb2.CACHE_FAILURE_POLICY_ERROR:
        return "error"
    try:
        return config.route(route_name(request, config)).on_cache_failure or config.on_cache_failure
    except KeyError:
        return config.on_cache_failure


def receiver_prompt(request, text_only: bool) -> str:
    """The receiver's prompt: after a cache (by mode), or X itself on the text path."""
    if text_only:
        return FORMAT.with_input.format(context=context_text(request))
    mode = mode_of(request)
    return request.receiver_prompt if (mode is ContextMode.AWARE and request.receiver_prompt) else FORMAT.receiver_prompt(mode, context_text(request))


def mode_of(request) -> ContextMode:
    return ContextMode.AWARE if request.mode == relay_pb2.CONTEXT_MODE_AWARE else ContextMode.UNAWARE


def latency(stats, stage: str, seconds: float) -> None:
    stats.latencies.add(stage=stage, seconds=seconds)


def hop_bytes(hop: str, report: HopReport):
    return relay_pb2.HopBytes(hop=hop, raw_bytes=report.raw_bytes, wire_bytes=report.wire_bytes, chunks=report.chunks,
                              codec=report.codec, transport=report.transport)


def check_prompt_tokens(tokens: int, request) -> None:
    """The receiver reads its prompt after the cache: a prompt of no tokens (a blank ``receiver_prompt``, for
    a tokenizer that drops whitespace) leaves it nothing to continue from."""
    if tokens == 0:
        what = "receiver_prompt" if request.receiver_prompt else "the route's receiver prompt for this input"
        raise RequestError(f"{what} has no tokens for the receiver's tokenizer: it reads the prompt after the cache, "
                           "so give it some text")


def final_stats(route: str, done, received: HopReport, out, receiver_params: int, layer0_unix: float, stages: dict):
    """The Relay's stats, assembled once from the hops' reports (``done``: what the adapter forwarded; None
    when a client fed the receiver directly) and the receiver's own counts and stages."""
    hops = list(done.hops) if done is not None else []
    if len(hops) < 2:  # no sending end reported the last hop: the receiving end's view of it
        hops.append(hop_bytes("adapter->receiver", received))
    first = hops[0]
    tokens = done.prefill_tokens if done is not None else 0
    r_tokens = out.counts.receiver_prefill + out.counts.receiver_decode
    stats = relay_pb2.RelayStats(
        route=route, codec=first.codec, hops=hops, raw_bytes=first.raw_bytes, wire_bytes=first.wire_bytes,
        compression_ratio=first.raw_bytes / first.wire_bytes if first.wire_bytes else 0.0,
        sender_prefill_tokens=tokens, sender_decode_tokens=0,
        receiver_prefill_tokens=out.counts.receiver_prefill, receiver_decode_tokens=out.counts.receiver_decode,
        sender_flops=done.sender_flops if done is not None else 0.0, adapter_flops=done.adapter_flops if done is not None else 0.0,
        receiver_flops=2.0 * receiver_params * r_tokens, receiver_layer0_unix=layer0_unix,
        sender_last_chunk_unix=done.last_chunk_unix if done is not None else 0.0, text=out.texts[0],
        latencies=list(done.latencies) if done is not None else [],
    )
    # Text-to-text: the sender decodes a message as long as X (2·N_s per token: its prefill FLOPs again),
    # the receiver re-reads it with its own prompt and decodes the same answer (paper appendix B.1).
    stats.t2t_flops = 2.0 * stats.sender_flops + 2.0 * receiver_params * (tokens + r_tokens)
    for stage, seconds in stages.items():
        latency(stats, stage, seconds)
    return stats


DRAIN_TIMEOUT_S = 5.0  # a failed stream's caller that never half-closes holds its call no longer


async def drain(requests, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Read and drop what is left of a client stream (at most ``timeout`` seconds, and the caller's deadline)."""
    async def read() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(read(), timeout)
    except Exception:  # the stream broke, or it outlasted the timeout: the status goes out either way
        pass


_END = object()
AHEAD_FRAMES = 8  # frames a sender encodes ahead of the one being sent (bounded: at most ~8 x frame_bytes)


async def ahead(iterator, depth: int = 2, frame_bytes: int | None = None):
    """Yield a blocking iterator's items, each computed in a worker thread while the consumer still handles
    the previous ones (up to ``depth`` ahead): encoding chunk i+1 overlaps sending chunk i.

    With ``frame_bytes``, the items are frames (bytes), and the frames already computed when the consumer
    asks for the next are joined into one message while it stays within ``frame_bytes``: a frame is never
    held back to wait for a later one (layer 0 leaves as soon as it is encoded), but while sending is the
    slower side, small frames share messages."""
    queue: asyncio.Queue = asyncio.Queue(depth)

    async def produce() -> None:
        try:
            while (item := await asyncio.to_thread(next, iterator, _END)) is not _END:
                await queue.put((item, None))
            await queue.put((_END, None))
        except Exception as exc:  # handed to the consumer, which raises it in its own context
            await queue.put((_END, exc))

    task = asyncio.create_task(produce())
    carry = None  # an item taken from the queue that did not fit the previous message
    try:
        while True:
            item, error = carry if carry is not None else await queue.get()
            carry = None
            if error is not None:
                raise error
            if item is _END:
                return
            if frame_bytes:
                batch, size = [item], len(item)
                while size < frame_bytes and not queue.empty():  # only what is ready: never wait for more
                    carry = queue.get_nowait()
                    if carry[1] is not None or carry[0] is _END or size + len(carry[0]) > frame_bytes:
                        break
                    batch.append(carry[0])
                    size += len(carry[0])
                    carry = None
                item = batch[0] if len(batch) == 1 else b"".join(batch)
            yield item
    finally:
        task.cancel()


async def _inline(iterator):
    for item in iterator:
        yield item


def encoded_messages(encoder: HopEncoder, header: bytes, link: transport.HopLink, frame_bytes: int | None,
                     max_message_bytes: int | None = None):
    """The KV stream messages of a started encoder (its header frame given): what a sending end yields after
    the setup, once ``link`` negotiated the transport. Frames are encoded ahead in a worker thread while
    earlier ones are sent (``ahead``), except for a ``copy_only`` codec, whose frames cost less to encode on
    this thread than to hand to another (``HopEncoder.copy_only``: a CPU cache); frames ready together share
    a message of up to ``frame_bytes``.
    On the shortcut frames are copied straight from the encoder's buffers into slots: one frame per slot,
    or for a copy_only codec up to ``transport.SLOT_MESSAGE_BYTES`` of frames per slot, never more than
    ``max_message_bytes`` (a group that finds no free slot leaves as one message of bytes)."""
    copy_only = encoder.copy_only
    if link.shortcut:  # each message is a reference to a slot
        frames = itertools.chain([[header]], encoder.chunk_parts())
        if copy_only:  # frames share slots of up to SLOT_MESSAGE_BYTES: fewer references, fewer gRPC messages
            slot_bytes = min(transport.SLOT_MESSAGE_BYTES, max_message_bytes or transport.SLOT_MESSAGE_BYTES)
            return _inline(send_frame(parts, link) for parts in group_messages(frames, slot_bytes))
        return ahead((send_frame(parts, link) for parts in frames), AHEAD_FRAMES)
    frames = itertools.chain([header], encoder.chunks())
    if copy_only:  # a frame is ready as soon as asked for: messages packed greedily, none waits on slow work
        return _inline(join_messages(([f] for f in frames), frame_bytes))
    return ahead(frames, AHEAD_FRAMES, frame_bytes)


class OverlappedDecode:
    """Feed frames to a decoder in a worker thread while the next message is being received: ``submit``
    starts decoding one frame after the previous one finished; ``drain`` waits for the last. While
    ``inline()`` is true (a ``copy_only`` stream: verifying and copying a frame is cheaper than a thread
    hand-off) frames are fed on the calling thread instead, in the same order."""

    def __init__(self, feed, on_event=None, inline=lambda: False) -> None:
        self.feed, self.on_event, self.inline = feed, on_event, inline
        self.pending: asyncio.Future | None = None

    def _feed(self, frame):
        event = self.feed(frame)
        if self.on_event is not None:  # in the worker thread, the moment the frame is decoded
            self.on_event(event)
        return event

    async def submit(self, frame) -> None:
        await self.drain()
        if self.inline():
            self._feed(frame)
        else:
            self.pending = asyncio.ensure_future(asyncio.to_thread(self._feed, frame))

    async def drain(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            await pending

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.cancel()


async def decode_overlapped(frames, decoding: OverlappedDecode | None, reader: shm.ShmReader | None) -> None:
    """Run ``frames`` (wire frames, e.g. ``read_frames``) through ``decoding``, each frame decoded while the
    next arrives (None: only read them), then close ``reader``'s slots however the stream ended."""
    try:
        async for frame in frames:
            if decoding is not None:
                await decoding.submit(frame)
        if decoding is not None:
            await decoding.drain()
    finally:
        if decoding is not None:
            decoding.cancel()
        if reader is not None:
            reader.close()


async def read_setup(messages):
    """The first message of a KV stream, which must carry the hop setup."""
    first = await anext(messages, None)
    if first is None or not isinstance(first, kv_pb2.KVMessage) or not first.HasField("setup"):
        raise RequestError("the first KVMessage must be a setup message")
    return first


# ---- the one place frames meet the gRPC stream (services.kvstream says how they are framed) ----------
# How frames cross a hop: "bytes" = inside the gRPC messages themselves; "shm" = offered the same-node
# shortcut (services.transport): once accepted, a message may be a reference to frames in shared memory.
TRANSPORTS = ("bytes", "shm")


def send_frame(frames, link: transport.HopLink | None = None) -> bytes:
    """The KV stream message that carries ``frames`` (one wire frame, or several back to back; bytes or a
    list of buffers): the frames themselves (no protobuf around them), or on the same-node shortcut the
    reference to the shared-memory slot they were copied into. Safe in a worker thread."""
    return link.carry(frames) if link is not None else shm.join(frames)


async def read_frames(messages, on_done, transport_name: str = "bytes", reader: shm.ShmReader | None = None,
                      arrival: list[float] | None = None):
    """The wire frames of a KV stream after its setup message, in order (bytes or memoryviews into the
    message or its shared-memory slot, never copied); ``on_done(StreamDone)`` gets the upstream's note.
    A frame from a slot is released with ``reader.decoded(frame)`` once decoded. A message that is neither
    frames, an accepted reference nor a KVMessage is DATA_LOSS; a second setup is INVALID_ARGUMENT.
    ``arrival`` gets the ``perf_counter`` time of the first message after the setup: the hop's transfer
    starts there (the sender opens the call before its prefill, so the setup comes well before the cache)."""
    if transport_name not in TRANSPORTS:
        raise RequestError(f"frame transport {transport_name!r} is not available here; expected one of {TRANSPORTS}")
    async for message in messages:
        if arrival is not None and not arrival:
            arrival.append(time.perf_counter())
        if isinstance(message, bytes):  # raw framing: the message is one or more frames, or a reference
            if shm.is_reference(message):
                if reader is None:
                    raise DataLossError("a shared-memory reference arrived on a hop that did not accept the same-node shortcut")
                for frame in reader.open(message):
                    yield frame
                continue
            for frame in split_frames(message):
                yield frame
        elif isinstance(message, kvstream.Unreadable):
            raise DataLossError(f"a KV stream message of {message.size} bytes beginning {message.lead!r} is neither "
                                f"wire frames nor a KVMessage ({message.reason})")
        elif (kind := message.WhichOneof("message")) == "frame":  # a frame wrapped in a KVMessage (generated stubs)
            yield message.frame.frame
        elif kind == "done":
            on_done(message.done)
        else:
            raise RequestError(f"unexpected {kind} message inside a KV stream")


async def token_batches(queue: asyncio.Queue, window_s: float, finished: asyncio.Future):
    """The items put on ``queue`` until None, in lists: the first at once with whatever is queued beside it, then
    at most one list per ``window_s`` with everything that arrived meanwhile; once ``finished`` (the producer)
    is done the rest goes at once. 0: no waiting, only items queued together share a list.

    Waits with ``asyncio.wait`` (a timer), not a cancelling timeout: a cancellation of the caller (its client
    went away) that arrives while it waits always propagates."""
    loop = asyncio.get_running_loop()
    flush_at = loop.time()
    while (item := await queue.get()) is not None:
        batch = [item]
        if (left := flush_at - loop.time()) > 0 and not finished.done():
            await asyncio.wait({finished}, timeout=left)
        while not queue.empty():
            if (item := queue.get_nowait()) is None:
                yield batch
                return
            batch.append(item)
        yield batch
        flush_at = loop.time() + window_s


def client_events(event) -> list:
    """What a Relay client gets for one internal event: each token of a batch as its own event."""
    if event.HasField("tokens"):
        return [relay_pb2.RelayEvent(token=token) for token in event.tokens.tokens]
    return [event]


async def relay_events(call, on_stats=None):
    """Forward a downstream call's events, converting its failure into DownstreamError. Use it in ``async with
    contextlib.aclosing(...)``: when the forwarding ends early (our own caller went away while we were handing
    an event on, not while we were reading), closing it cancels the call, which gRPC does not do by itself."""
    try:
        async for event in call:
            if event.HasField("stats") and on_stats is not None:
                on_stats(event.stats)
            yield event
    except grpc.aio.AioRpcError as exc:
        raise DownstreamError(exc.code(), exc.details() or exc.code().name) from exc
    finally:
        call.cancel()  # a no-op on a call that ended


class ServicerBase:
    service = ""
    pool: shm.ShmPool | None = None  # shared-memory slots of the hop this servicer sends frames on, if any

    def __init__(self, config: ServeConfig, metrics: ServiceMetrics, downstream: Downstream | None = None) -> None:
        self.config, self.metrics, self.downstream = config, metrics, downstream
        self.route_labels = {r.name for r in config.all_routes()} | {"-"}  # metrics never label a client's string

    async def close(self) -> None:
        """Release what the servicer holds (its downstream channels, its shared-memory pool)."""
        if self.downstream is not None:
            await self.downstream.close()
        if self.pool is not None:
            self.pool.close()

    async def guarded(self, context, route: str, body, requests=None):
        """Run an event stream; count it; turn any exception into the mapped gRPC status (never crash).

        For client-streaming calls (``requests`` given), the rest of the caller's stream is drained before
        the status is sent, so the caller reads that status instead of a failed write.
        """
        gauge = self.metrics.in_flight.labels(self.service)
        gauge.inc()
        code = "OK"
        try:
            async for event in body:
                yield event
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, details = status_for(exc)
            code = status.name
            if status == grpc.StatusCode.INTERNAL:
                log.exception("%s: internal error", self.service)
            if requests is not None:
                await drain(requests)
            await context.abort(status, details)
        finally:
            gauge.dec()
            self.metrics.finished(route if route in self.route_labels else "unknown", code)


class ReceiverServicer(ServicerBase, kv_pb2_grpc.ReceiverServicer):
    service = "receiver"

    def __init__(self, config, metrics, routes: dict[str, runtime.ModelRoute]) -> None:
        super().__init__(config, metrics)
        self.routes = routes

    @classmethod
    def build(cls, config: ServeConfig, metrics: ServiceMetrics, downstream: Downstream | None = None) -> ReceiverServicer:
        return cls(config, metrics, runtime.load_receiver_routes(config))

    async def Generate(self, request_iterator, context):
        async for event in self.guarded(context, "-", self._generate(request_iterator, context), request_iterator):
            yield event

    async def _generate(self, messages, context=None):
        first = await read_setup(messages)
        reader = await transport.accept(first.setup, context, self.config)  # the same-node shortcut's verdict
        request = first.setup.request
        name, route = pick(self.routes, request, self.config)
        validate_request(request, self.config, relay_pb2)  # the sender checked it; a peer feeding us directly may not
        receiver = route.model
        route_limits = limits.RouteLimits.for_route(self.config, name)
        decoder = HopDecoder(receiver, route.bases, route_limits.decode_limits(), device=receiver.model.device)
        started = time.perf_counter()
        layer0_unix = [0.0]
        text_only = first.setup.text_only  # on_cache_failure = text: no cache, the receiver reads X itself

        def on_event(event) -> None:
            if event is not None and event.layer == 0 and event.layer_complete:
                layer0_unix[0] = time.time()

        def feed(frame):
            event = decoder.feed(frame)
            if reader is not None:
                reader.decoded(frame)  # its shared-memory slot may be reused
            return event

        upstream: list = []  # the StreamDone the adapter forwards after its last frame
        decoding = OverlappedDecode(feed, on_event, lambda: decoder.copy_only)  # decode frame i while frame i+1 arrives
        decoder.report.transport = "shm" if reader is not None else "bytes"
        arrival: list[float] = []
        await decode_overlapped(read_frames(messages, upstream.append, first.setup.transport or "bytes", reader, arrival),
                                decoding, reader)
        done = upstream[-1] if upstream else None
        # the receiver's space, RoPE, dtype and device
        cache = None if text_only else await asyncio.to_thread(decoder.finish)
        transfer_s = time.perf_counter() - (arrival[0] if arrival else started)  # first frame -> the cache held
        held, held_unix = time.perf_counter(), time.time()  # the receiver holds the whole cache in its model's space
        prompt = receiver_prompt(request, text_only)
        g = request.generation
        config = GenerationConfig(max_new_tokens=g.max_new_tokens or self.config.default_max_new_tokens,
                                  temperature=g.temperature, top_p=g.top_p or 1.0, seed=g.seed)
        # tokenized once, off the event loop: the window check counts these ids and the receiver reads them
        prompt_ids = (await asyncio.to_thread(receiver.tokenizer, prompt, add_special_tokens=cache is None))["input_ids"]
        check_prompt_tokens(len(prompt_ids), request)
        limits.check_window(int(cache.next_positions.max()) if cache is not None else 0, len(prompt_ids), config.max_new_tokens,
                            route_limits.receiver_window, name)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        eos = receiver.tokenizer.eos_token_id
        first_token_s = [0.0]
        gen_started = time.perf_counter()

        def on_token(step: int, tokens: torch.Tensor) -> None:
            token = int(tokens[0])
            if step == 0:
                first_token_s[0] = time.perf_counter() - gen_started
            if token != eos:
                loop.call_soon_threadsafe(queue.put_nowait, (step, token))

        stop = threading.Event()
        task = asyncio.ensure_future(in_thread(stop, receiver_generate, receiver, cache, [prompt_ids], config, on_token))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        previous = ""
        ids: list[int] = []
        try:
            async for batch in token_batches(queue, self.config.token_flush_ms / 1e3, task):
                events = []
                for step, token in batch:
                    ids.append(token)
                    text = receiver.tokenizer.decode(ids, skip_special_tokens=True)
                    events.append(relay_pb2.TokenEvent(index=step, token_id=token, text=text[len(previous):]))
                    previous = text
                yield relay_pb2.RelayEvent(tokens=relay_pb2.TokenBatch(tokens=events))
            out = await task
        finally:
            stop.set()  # the caller went away (or we are done): the generation thread stops at its next step
            task.cancel()
        stages = {"decode": decoder.report.decode_s, "transfer": transfer_s, "prompt": gen_started - held,
                  "first_token": first_token_s[0], "generate": time.perf_counter() - gen_started}
        if cache is not None and done is not None and done.prefill_end_unix:
            # the end of the sender's prefill -> the receiver holding the cache, through every hop (wall clocks
            # of two processes: exact on one node, off by the clock skew across nodes)
            stages["kv_handoff"] = max(0.0, held_unix - done.prefill_end_unix)
        stats = final_stats(name, done, decoder.report, out, receiver.non_embedding_params, layer0_unix[0], stages)
        stats.served_by = "text" if text_only else "cache"
        if not text_only:
            self.metrics.observe_hop_transfer("adapter->receiver", transfer_s)
        if text_only:  # no KV crossed a hop
            del stats.hops[:]
        else:
            last = stats.hops[-1]
            self.metrics.observe_hop(last.hop, last.raw_bytes, last.wire_bytes, last.chunks, last.transport or "bytes",
                                     reader.bytes_read if reader is not None else 0)
        for stage, seconds in stages.items():
            self.metrics.observe_stage(stage, seconds)
        self.metrics.tokens.labels(self.service, "receiver", "prefill").inc(out.counts.receiver_prefill)
        self.metrics.tokens.labels(self.service, "receiver", "decode").inc(out.counts.receiver_decode)
        self.metrics.flops.labels(self.service, "receiver").inc(stats.receiver_flops)
        yield relay_pb2.RelayEvent(stats=stats)


class AdapterServicer(ServicerBase, kv_pb2_grpc.AdapterServicer):
    service = "adapter"

    def __init__(self, config, metrics, routes: dict[str, runtime.AdapterRoute], receivers: Downstream) -> None:
        super().__init__(config, metrics, receivers)
        self.routes, self.receivers = routes, receivers
        self.pool = transport.make_pool(config)  # shared-memory slots of the adapter -> receiver hop

    @classmethod
    def build(cls, config: ServeConfig, metrics: ServiceMetrics, downstream: Downstream | None = None) -> AdapterServicer:
        return cls(config, metrics, runtime.load_adapter_routes(config), downstream)

    async def Transform(self, request_iterator, context):
        async for event in self.guarded(context, "-", self._transform(request_iterator, context), request_iterator):
            yield event

    async def _transform(self, messages, context=None):
        first = await read_setup(messages)
        reader = await transport.accept(first.setup, context, self.config)  # the sender -> adapter hop's verdict
        request = first.setup.request
        name, route = pick(self.routes, request, self.config)
        validate_request(request, self.config, relay_pb2)  # the sender checked it; a peer feeding us directly may not
        if first.setup.text_only:
            raise RequestError("a text_only setup carries no cache: it goes to the receiver itself, not through the adapter")
        codec = receiver_codec_for(request, self.config)
        streaming = StreamingAdapter(route.adapter, route.sender, route.receiver, codec,
                                     self.config.chunk_tokens or None,
                                     limits.RouteLimits.for_route(self.config, name).decode_limits(), route.bases,
                                     self.config.frame_bytes)
        outgoing: asyncio.Queue = asyncio.Queue()
        state = {"error": None}

        link = transport.HopLink(self.pool)  # the adapter -> receiver hop's carrier
        negotiated = asyncio.Event()  # the receiver's verdict is in: frames may be sent

        def feed(frame) -> list:
            """Transform one incoming frame (releasing its slot) and turn what it makes ready into messages."""
            out = streaming.feed(frame)
            if reader is not None:
                reader.decoded(frame)
            return [send_frame(parts, link) for parts in group_messages(([f] for f in out), self.config.frame_bytes)]

        async def pump() -> None:
            try:
                upstream: list = []
                arrival: list[float] = []

                def on_done(note) -> None:
                    upstream.append(note)
                    self.metrics.observe_hop_transfer("sender->adapter", (time.perf_counter() - arrival[0]) if arrival else 0.0)

                await negotiated.wait()
                async for frame in read_frames(messages, on_done, first.setup.transport or "bytes", reader, arrival):
                    for message in await asyncio.to_thread(feed, frame):
                        await outgoing.put(message)
                streaming.finish()
                done = kv_pb2.StreamDone()
                if upstream:
                    done.CopyFrom(upstream[-1])
                streaming.output_report.transport = link.transport
                done.hops.append(hop_bytes("adapter->receiver", streaming.output_report))
                done.latencies.add(stage="transform", seconds=streaming.transform_seconds)
                done.adapter_flops = float(route.flops_per_token * done.prefill_tokens)
                self.metrics.observe_stage("transform", streaming.transform_seconds)
                self.metrics.flops.labels(self.service, "adapter").inc(done.adapter_flops)
                await outgoing.put(kv_pb2.KVMessage(done=done))
            except Exception as exc:
                state["error"] = exc
            finally:
                await outgoing.put(None)

        async def forward():
            setup = link.setup(first.setup)  # offers the same-node shortcut when this adapter has a pool
            setup.transport = "shm" if setup.HasField("shm") else "bytes"
            yield kv_pb2.KVMessage(setup=setup)
            try:
                await link.negotiate(call)
            finally:
                negotiated.set()
            while (item := await outgoing.get()) is not None:
                yield item

        stub = await self.receivers.stub()  # before reading on: a dead receiver fails fast and cleanly
        pump_task = asyncio.create_task(pump())
        call = stub.Generate(forward(), timeout=hop_timeout(context, self.config))
        try:
            async with contextlib.aclosing(relay_events(call)) as events:
                async for event in events:
                    if state["error"] is not None:  # our input broke (a frame after its done, say) though the
                        raise state["error"]  # receiver got a whole cache: no answer of it goes out
                    yield event
        except DownstreamError:
            if state["error"] is not None:  # our input broke first: that is the precise cause
                raise state["error"]
            pump_task.cancel()
            raise
        except BaseException:  # our caller went away (cancelled): stop reading its stream too
            pump_task.cancel()
            raise
        finally:
            link.close()  # slots the receiver released go back to the pool, others are unlinked
            if reader is not None:
                reader.close()
        await asyncio.gather(pump_task, return_exceptions=True)
        if state["error"] is not None:
            raise state["error"]


class SenderServicer(ServicerBase, kv_pb2_grpc.SenderServicer):
    service = "sender"

    def __init__(self, config, metrics, routes: dict[str, runtime.ModelRoute], adapters: Downstream) -> None:
        super().__init__(config, metrics, adapters)
        self.routes, self.adapters = routes, adapters
        self.pool = transport.make_pool(config)  # shared-memory slots of the sender -> adapter hop

    @classmethod
    def build(cls, config: ServeConfig, metrics: ServiceMetrics, downstream: Downstream | None = None) -> SenderServicer:
        return cls(config, metrics, runtime.load_sender_routes(config), downstream)

    async def Prefill(self, request, context):
        async for event in self.guarded(context, route_name(request.request, self.config), self._prefill(request, context)):
            yield event

    def admit(self, name: str, sender, request) -> list[int]:
        """X as the sender's token ids, once every limit they can break is checked (in a
        worker thread: a large input takes the tokenizer tens of milliseconds, which the event loop's other
        streams would wait). The prefill reads these ids; it does not tokenize X again."""
        ids = input_ids(request, sender.tokenizer, FORMAT)
        self.check_limits(name, sender, request, len(ids))
        return ids

    def check_limits(self, name: str, sender, request, tokens: int) -> None:
        """Every limit that the input of ``tokens`` tokens can break, before any model work: tokens, the
        receiver's window, the cache's bytes (tokens x the sender's KV bytes per token)."""
        route_limits = limits.RouteLimits.for_route(self.config, name)
        prompt_tokens = len(sender.tokenizer(receiver_prompt(request, False), add_special_tokens=False)["input_ids"])  # shared tokenizer
        check_prompt_tokens(prompt_tokens, request)
        max_new = request.generation.max_new_tokens or self.config.default_max_new_tokens
        limits.check_tokens(tokens, prompt_tokens, max_new, route_limits)
        g = sender.geometry
        limits.check_cache_bytes(tokens, g.num_layers * 2 * g.num_kv_heads * g.head_dim * sender.dtype.itemsize, route_limits)

    async def _prefill(self, setup, context=None):
        arrived = time.perf_counter()
        request = setup.request
        validate_request(request, self.config, relay_pb2)
        name, route = pick(self.routes, request, self.config)
        sender = route.model
        encoder = HopEncoder(codec_for(request.codec, self.config), route.bases, sender, self.config.chunk_tokens or None,
                             workers=self.config.codec_workers, frame_bytes=self.config.frame_bytes)
        try:
            encoder.check(sender.geometry.fingerprint())  # a codec basis this route lacks fails before the prefill
        except CodecError as exc:
            raise RequestError(f"codec: {exc}") from exc
        link = transport.HopLink(self.pool)  # the sender -> adapter hop's carrier
        limits.check_input_bytes(request, limits.RouteLimits.for_route(self.config, name))  # before rendering a huge X
        ids = await asyncio.to_thread(self.admit, name, sender, request)
        stub = await self.adapters.stub()  # before any model work: a dead adapter fails fast
        prefilled: asyncio.Future = asyncio.get_running_loop().create_future()  # the cache's first frame header, or None
        failed: list[Exception] = []  # what broke our own stream, the precise cause of the call's failure
        note: dict = {}  # the prefill's figures, for the StreamDone

        async def frames():
            try:
                async for message in stream():
                    yield message
            except Exception as exc:  # gRPC would only cancel the call, with no status: end the stream, keep it
                failed.append(exc)

        async def stream():
            hop_setup = link.setup(setup)  # offers the same-node shortcut when this sender has a pool
            hop_setup.transport = "shm" if hop_setup.HasField("shm") else "bytes"
            yield kv_pb2.KVMessage(setup=hop_setup)
            await link.negotiate(call)  # "shm": the adapter maps our slots, each frame goes by reference
            if (header := await prefilled) is None:  # the prefill failed; the call is cancelled
                return
            async for message in encoded_messages(encoder, header, link, self.config.frame_bytes, self.config.max_message_bytes):
                yield send_frame(message)
            report = encoder.report
            report.transport = link.transport
            done = kv_pb2.StreamDone(last_chunk_unix=time.time(), prefill_tokens=note["tokens"], sender_flops=note["flops"],
                                     hops=[hop_bytes("sender->adapter", report)], prefill_end_unix=note["end_unix"])
            for stage, seconds in (("admit", note["admit"]), ("prefill", note["seconds"]), ("encode", report.encode_s)):
                done.latencies.add(stage=stage, seconds=seconds)
                self.metrics.observe_stage(stage, seconds)
            self.metrics.observe_hop("sender->adapter", report.raw_bytes, report.wire_bytes, report.chunks,
                                     report.transport, link.shm_bytes)
            self.metrics.tokens.labels(self.service, "sender", "prefill").inc(note["tokens"])
            self.metrics.flops.labels(self.service, "sender").inc(note["flops"])
            yield kv_pb2.KVMessage(done=done)

        # The call opens before the prefill: the adapter (and, through it, the receiver) sets up its side and
        # answers the shared-memory offer while this sender prefills, and the frames leave once the cache is ready.
        call = stub.Transform(frames(), timeout=hop_timeout(context, self.config))
        try:
            t = time.perf_counter()
            note["admit"] = t - arrived  # checks, tokenizing X, opening the call
            cache = await in_thread(threading.Event(), sender_prefill, sender, [ids], chunk_tokens=self.config.prefill_chunk_tokens)
            note.update(seconds=time.perf_counter() - t, end_unix=time.time(), tokens=int(cache.lengths.sum()))
            note["flops"] = 2.0 * sender.non_embedding_params * note["tokens"]
            prefilled.set_result(await asyncio.to_thread(encoder.start, cache))  # strip RoPE, bind the bases
        except BaseException:  # our own failure (or our caller went away): the adapter's call ends with it
            if not prefilled.done():
                prefilled.set_result(None)
            call.cancel()
            link.close()
            raise
        try:
            async with contextlib.aclosing(relay_events(call)) as events:
                async for event in events:
                    if failed:
                        break
                    yield event
        except DownstreamError as exc:
            # Ours is the cause only where the adapter reports the short stream it made (DATA_LOSS); any other
            # status (a receiver gone: UNAVAILABLE) came first, and our stream's error followed from it.
            if not failed or exc.code != grpc.StatusCode.DATA_LOSS:
                raise
        finally:
            link.close()  # slots the adapter released go back to the pool, others are unlinked
        if failed:
            call.cancel()
            raise failed[0]


class RelayServicer(ServicerBase, relay_pb2_grpc.RelayServicer):
    service = "relay"

    def __init__(self, config, metrics, senders: Downstream, receivers: Downstream | None = None) -> None:
        super().__init__(config, metrics, senders)
        self.senders = senders
        self.receivers = receivers  # the text path of on_cache_failure = text (None: not wired)

    @classmethod
    def build(cls, config: ServeConfig, metrics: ServiceMetrics, downstream: Downstream | None = None,
              receivers: Downstream | None = None) -> RelayServicer:
        return cls(config, metrics, downstream, receivers)

    async def close(self) -> None:
        await super().close()
        if self.receivers is not None:
            await self.receivers.close()

    async def Relay(self, request, context):
        async for event in self.guarded(context, route_name(request, self.config), self._relay(request, context)):
            yield event

    async def _relay(self, request, context):
        validate_request(request, self.config, relay_pb2)  # needs no model and no bases: any replica of the ingress
        name, names = route_name(request, self.config), [r.name for r in self.config.all_routes()]
        if name not in names:
            raise RouteNotFound(f"unknown route {runtime.shown(name)}; known routes: {names}")
        limits.check_input_bytes(request, limits.RouteLimits.for_route(self.config, name))
        started = time.perf_counter()
        setup = kv_pb2.HopSetup(request_id=uuid.uuid4().hex, request=request)
        reason = ""

        def on_stats(stats) -> None:  # the one stage only the ingress can measure
            e2e = time.perf_counter() - started
            latency(stats, "end_to_end", e2e)
            self.metrics.observe_stage("end_to_end", e2e)
            if stats.t2t_flops:
                self.metrics.t2t_flops.labels(self.service).inc(stats.t2t_flops)
            stats.served_by = stats.served_by or "cache"
            stats.fallback_reason = reason

        tokens = 0  # answer tokens sent to our client, whichever path made them

        def to_client(event) -> list:
            """The client's events for one downstream event; the first answer token is timed."""
            nonlocal tokens
            out = client_events(event)
            if not tokens and any(e.HasField("token") for e in out):
                self.metrics.observe_stage("time_to_first_token", time.perf_counter() - started)
            tokens += sum(e.HasField("token") for e in out)
            return out

        try:
            call = (await self.senders.stub()).Prefill(setup, timeout=hop_timeout(context, self.config))
            async with contextlib.aclosing(relay_events(call, on_stats)) as events:
                async for event in events:
                    for out in to_client(event):
                        yield out
            return
        except DownstreamError as exc:
            # Only before the first token: an answer is never spliced from two paths.
            if tokens or exc.code not in CACHE_PATH_FAILURES or self.receivers is None \
                    or cache_failure_policy(request, self.config) != "text":
                raise
            reason = f"{exc.code.name}: {exc.details}"
            log.warning("relay: cache path failed (%s); serving request %s as text", reason, setup.request_id)

        async def text_only():
            yield kv_pb2.KVMessage(setup=kv_pb2.HopSetup(request_id=setup.request_id, request=request, text_only=True))

        call = (await self.receivers.stub()).Generate(text_only(), timeout=hop_timeout(context, self.config))
        async with contextlib.aclosing(relay_events(call, on_stats)) as events:
            async for event in events:
                for out in to_client(event):
                    yield out
