"""The four gRPC servicers (grpc.aio). Thin: translate messages, call the core, map errors in one place.

    RelayServicer.Relay        public ingress: validate, call Sender.Prefill, stream events back
    SenderServicer.Prefill     prefill X, encode layer by layer, stream frames into Adapter.Transform
    AdapterServicer.Transform  decode sender chunks, map each receiver layer as soon as its source
                               layer is in (core.streaming), stream frames into Receiver.Generate
    ReceiverServicer.Generate  assemble the cache as chunks arrive, generate, stream tokens + stats

KV flows forward in client streams; token events and the final stats flow back along the same calls.
Every downstream call carries a deadline; model work runs in worker threads so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import torch

from densecomm_core.codec.base import DecodeLimits
from densecomm_core.codec.wire import StreamDecoder, iter_encode
from densecomm_core.errors import GeometryMismatchError
from densecomm_core.generation import GenerationConfig
from densecomm_core.relay import (
    ContextMode,
    PromptFormat,
    receiver_generate,
    sender_prefill,
)
from densecomm_core.rope import restore_rope, strip_rope
from densecomm_core.streaming import StreamingAdapter
from services import protos
from services.config import ServeConfig
from services.errors import DownstreamError, RequestError, RouteNotFound, status_for
from services.metrics import ServiceMetrics
from services.runtime import (
    codec_for,
    context_text,
    pick,
    receiver_codec_for,
    render_input,
    route_bases,
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
        self.channels = [grpc.aio.insecure_channel(a, options=channel_options(config)) for a in addresses]
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


def mode_of(request) -> ContextMode:
    return ContextMode.AWARE if request.mode == relay_pb2.CONTEXT_MODE_AWARE else ContextMode.UNAWARE


def latency(stats, stage: str, seconds: float) -> None:
    stats.latencies.add(stage=stage, seconds=seconds)


async def drain(requests) -> None:
    """Read and drop what is left of a client stream (bounded by the caller's deadline)."""
    try:
        async for _ in requests:
            pass
    except Exception:
        pass


async def read_setup(messages):
    """The first message of a KV stream, which must carry the hop setup."""
    first = await anext(messages, None)
    if first is None or not first.HasField("setup"):
        raise RequestError("the first KVMessage must be a setup message")
    return first


async def relay_events(call, on_stats=None):
    """Forward a downstream call's events, converting its failure into DownstreamError."""
    try:
        async for event in call:
            if event.HasField("stats") and on_stats is not None:
                on_stats(event.stats)
            yield event
    except grpc.aio.AioRpcError as exc:
        raise DownstreamError(exc.code(), exc.details() or exc.code().name) from exc


class ServicerBase:
    service = ""

    def __init__(self, config: ServeConfig, metrics: ServiceMetrics) -> None:
        self.config, self.metrics = config, metrics

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
            self.metrics.finished(route, code)


class ReceiverServicer(ServicerBase, kv_pb2_grpc.ReceiverServicer):
    service = "receiver"

    def __init__(self, config, metrics, routes) -> None:
        super().__init__(config, metrics)
        self.routes = routes

    async def Generate(self, request_iterator, context):
        async for event in self.guarded(context, "-", self._generate(request_iterator), request_iterator):
            yield event

    async def _generate(self, messages):
        first = await read_setup(messages)
        request = first.setup.request
        name, receiver = pick(self.routes, request, self.config)
        decoder = StreamDecoder(DecodeLimits(max_raw_bytes=self.config.max_cache_bytes))
        started = time.perf_counter()
        layer0_unix = 0.0
        done = None
        decode_s = 0.0
        async for message in messages:
            kind = message.WhichOneof("message")
            if kind == "frame":
                t = time.perf_counter()
                event = await asyncio.to_thread(decoder.feed, message.frame.frame)
                decode_s += time.perf_counter() - t
                if event is not None and event.layer == 0 and event.layer_complete:
                    layer0_unix = time.time()
            elif kind == "done":
                done = message.done
            else:
                raise RequestError(f"unexpected {kind} message inside a KV stream")
        cache = decoder.finish()
        transfer_s = time.perf_counter() - started
        if cache.fingerprint != receiver.geometry.fingerprint():
            raise GeometryMismatchError(f"received a cache for {cache.fingerprint}, this receiver is {receiver.geometry.fingerprint()}")
        if not cache.rope_applied:  # shipped RoPE-stripped (the hop's codec codes stripped keys)
            cache = restore_rope(cache, receiver)
        cache = cache.to(dtype=receiver.dtype, device=receiver.model.device)
        mode = mode_of(request)
        prompt = request.receiver_prompt if (mode is ContextMode.AWARE and request.receiver_prompt) else FORMAT.receiver_prompt(mode, context_text(request))
        g = request.generation
        config = GenerationConfig(max_new_tokens=g.max_new_tokens or self.config.default_max_new_tokens,
                                  temperature=g.temperature, top_p=g.top_p or 1.0, seed=g.seed)
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

        task = asyncio.create_task(asyncio.to_thread(receiver_generate, receiver, cache, [prompt], config, on_token))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        previous = ""
        ids: list[int] = []
        while (item := await queue.get()) is not None:
            step, token = item
            ids.append(token)
            text = receiver.tokenizer.decode(ids, skip_special_tokens=True)
            yield relay_pb2.RelayEvent(token=relay_pb2.TokenEvent(index=step, token_id=token, text=text[len(previous):]))
            previous = text
        out = await task
        generate_s = time.perf_counter() - gen_started
        n_r = receiver.non_embedding_params
        stats = relay_pb2.RelayStats(
            route=name, receiver_prefill_tokens=out.counts.receiver_prefill, receiver_decode_tokens=out.counts.receiver_decode,
            receiver_flops=2.0 * n_r * (out.counts.receiver_prefill + out.counts.receiver_decode),
            receiver_layer0_unix=layer0_unix, text=out.texts[0],
        )
        if done is not None:
            stats.hops.add(hop="adapter->receiver", raw_bytes=done.raw_bytes, wire_bytes=decoder.wire_bytes, chunks=done.chunks,
                           codec=decoder.header.codec if decoder.header else "")
            self.metrics.observe_hop("adapter->receiver", done.raw_bytes, decoder.wire_bytes, done.chunks)
        self.metrics.observe_hop_transfer("adapter->receiver", transfer_s)
        for stage, seconds in (("decode", decode_s), ("transfer", transfer_s), ("first_token", first_token_s[0]), ("generate", generate_s)):
            latency(stats, stage, seconds)
            self.metrics.observe_stage(stage, seconds)
        self.metrics.tokens.labels(self.service, "receiver", "prefill").inc(out.counts.receiver_prefill)
        self.metrics.tokens.labels(self.service, "receiver", "decode").inc(out.counts.receiver_decode)
        self.metrics.flops.labels(self.service, "receiver").inc(stats.receiver_flops)
        yield relay_pb2.RelayEvent(stats=stats)


class AdapterServicer(ServicerBase, kv_pb2_grpc.AdapterServicer):
    service = "adapter"

    def __init__(self, config, metrics, routes, receivers: Downstream) -> None:
        super().__init__(config, metrics)
        self.routes, self.receivers = routes, receivers

    async def Transform(self, request_iterator, context):
        async for event in self.guarded(context, "-", self._transform(request_iterator), request_iterator):
            yield event

    async def _transform(self, messages):
        first = await read_setup(messages)
        request = first.setup.request
        _, route = pick(self.routes, request, self.config)
        codec = receiver_codec_for(request, self.config)
        streaming = StreamingAdapter(route.adapter, route.sender, route.receiver, codec,
                                     self.config.chunk_tokens or None, DecodeLimits(max_raw_bytes=self.config.max_cache_bytes),
                                     route.bases)
        outgoing: asyncio.Queue = asyncio.Queue()
        state = {"sender_done": None, "chunks_out": 0, "wire_out": 0, "error": None}

        async def pump() -> None:
            try:
                started = time.perf_counter()
                async for message in messages:
                    kind = message.WhichOneof("message")
                    if kind == "frame":
                        for frame in await asyncio.to_thread(streaming.feed, message.frame.frame):
                            if frame[:4] == b"DCCH":
                                state["chunks_out"] += 1
                            state["wire_out"] += len(frame)
                            await outgoing.put(kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=frame)))
                    elif kind == "done":
                        state["sender_done"] = message.done
                        self.metrics.observe_hop_transfer("sender->adapter", time.perf_counter() - started)
                    else:
                        raise RequestError(f"unexpected {kind} message inside a KV stream")
                streaming.finish()
                await outgoing.put(kv_pb2.KVMessage(done=kv_pb2.StreamDone(raw_bytes=streaming.raw_bytes_out, chunks=state["chunks_out"])))
            except Exception as exc:
                state["error"] = exc
            finally:
                await outgoing.put(None)

        async def forward():
            setup = kv_pb2.HopSetup()
            setup.CopyFrom(first.setup)
            yield kv_pb2.KVMessage(setup=setup)
            while (item := await outgoing.get()) is not None:
                yield item

        stub = await self.receivers.stub()  # before reading on: a dead receiver fails fast and cleanly
        pump_task = asyncio.create_task(pump())
        call = stub.Generate(forward(), timeout=self.config.hop_deadline_s)

        def on_stats(stats) -> None:
            done = state["sender_done"]
            stats.adapter_flops = float(route.flops_per_token * (done.prefill_tokens if done else 0))
            latency(stats, "transform", streaming.transform_seconds)
            self.metrics.observe_stage("transform", streaming.transform_seconds)
            self.metrics.flops.labels(self.service, "adapter").inc(stats.adapter_flops)
            if done is not None:
                stats.sender_last_chunk_unix = done.last_chunk_unix

        try:
            async for event in relay_events(call, on_stats):
                yield event
        except DownstreamError:
            if state["error"] is not None:  # our input broke first: that is the precise cause
                raise state["error"]
            pump_task.cancel()
            raise
        except BaseException:  # our caller went away (cancelled): stop reading its stream too
            pump_task.cancel()
            raise
        await asyncio.gather(pump_task, return_exceptions=True)
        if state["error"] is not None:
            raise state["error"]


class SenderServicer(ServicerBase, kv_pb2_grpc.SenderServicer):
    service = "sender"

    def __init__(self, config, metrics, routes, adapters: Downstream) -> None:
        super().__init__(config, metrics)
        self.routes, self.adapters = routes, adapters

    async def Prefill(self, request, context):
        async for event in self.guarded(context, route_name(request.request, self.config), self._prefill(request)):
            yield event

    async def _prefill(self, setup):
        request = setup.request
        validate_request(request, self.config, relay_pb2)
        name, sender = pick(self.routes, request, self.config)
        codec = codec_for(request.codec, self.config)
        text = render_input(request, sender.tokenizer, FORMAT)
        t = time.perf_counter()
        cache = await asyncio.to_thread(sender_prefill, sender, [text])
        if codec.strips_rope:  # the codec codes RoPE-stripped keys; the adapter reads the header's rope_applied
            cache = strip_rope(cache, sender).to(dtype=cache.dtype)
        codec = codec.bind(cache.fingerprint, cache.rope_applied, route_bases(name))
        prefill_s = time.perf_counter() - t
        tokens = int(cache.lengths.sum())
        raw_bytes = cache.nbytes
        info = {"wire": 0, "chunks": 0, "encode_s": 0.0, "last_unix": 0.0}

        async def frames():
            yield kv_pb2.KVMessage(setup=setup)
            encoder = iter_encode(cache, codec, self.config.chunk_tokens or None)
            while True:
                t = time.perf_counter()
                frame = await asyncio.to_thread(next, encoder, None)
                info["encode_s"] += time.perf_counter() - t
                if frame is None:
                    break
                info["wire"] += len(frame)
                info["chunks"] += frame[:4] == b"DCCH"
                yield kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=frame))
            info["last_unix"] = time.time()
            yield kv_pb2.KVMessage(done=kv_pb2.StreamDone(
                last_chunk_unix=info["last_unix"], prefill_tokens=tokens, raw_bytes=raw_bytes, wire_bytes=info["wire"],
                chunks=info["chunks"], prefill_seconds=prefill_s, encode_seconds=info["encode_s"]))

        n_s = sender.non_embedding_params

        def on_stats(stats) -> None:
            stats.codec = codec.name
            stats.raw_bytes, stats.wire_bytes = raw_bytes, info["wire"]
            stats.compression_ratio = raw_bytes / info["wire"] if info["wire"] else 0.0
            stats.hops.insert(0, relay_pb2.HopBytes(hop="sender->adapter", raw_bytes=raw_bytes, wire_bytes=info["wire"], chunks=info["chunks"],
                                                        codec=codec.name))
            stats.sender_prefill_tokens, stats.sender_decode_tokens = tokens, 0
            stats.sender_flops = 2.0 * n_s * tokens
            stats.sender_last_chunk_unix = info["last_unix"]
            # Text-to-text: the sender decodes a message as long as X, the receiver re-reads it with its
            # own prompt and decodes the same answer (paper appendix B.1's recipe, message length assumed).
            n_r = stats.receiver_flops / max(1, stats.receiver_prefill_tokens + stats.receiver_decode_tokens) / 2
            stats.t2t_flops = 2.0 * n_s * 2 * tokens + 2.0 * n_r * (tokens + stats.receiver_prefill_tokens + stats.receiver_decode_tokens)
            latency(stats, "prefill", prefill_s)
            latency(stats, "encode", info["encode_s"])
            self.metrics.observe_stage("prefill", prefill_s)
            self.metrics.observe_stage("encode", info["encode_s"])
            self.metrics.observe_hop("sender->adapter", raw_bytes, info["wire"], info["chunks"])
            self.metrics.tokens.labels(self.service, "sender", "prefill").inc(tokens)
            self.metrics.flops.labels(self.service, "sender").inc(stats.sender_flops)
            self.metrics.t2t_flops.labels(self.service).inc(stats.t2t_flops)

        call = (await self.adapters.stub()).Transform(frames(), timeout=self.config.hop_deadline_s)
        async for event in relay_events(call, on_stats):
            yield event


class RelayServicer(ServicerBase, relay_pb2_grpc.RelayServicer):
    service = "relay"

    def __init__(self, config, metrics, senders: Downstream) -> None:
        super().__init__(config, metrics)
        self.senders = senders

    async def Relay(self, request, context):
        async for event in self.guarded(context, route_name(request, self.config), self._relay(request, context)):
            yield event

    async def _relay(self, request, context):
        validate_request(request, self.config, relay_pb2)
        names = [r.name for r in self.config.all_routes()]
        if route_name(request, self.config) not in names:
            raise RouteNotFound(f"unknown route {route_name(request, self.config)!r}; known routes: {names}")
        started = time.perf_counter()
        remaining = context.time_remaining()
        timeout = min(self.config.hop_deadline_s, remaining) if remaining is not None else self.config.hop_deadline_s
        setup = kv_pb2.HopSetup(request_id=uuid.uuid4().hex, request=request)
        call = (await self.senders.stub()).Prefill(setup, timeout=timeout)

        def on_stats(stats) -> None:
            e2e = time.perf_counter() - started
            latency(stats, "end_to_end", e2e)
            self.metrics.observe_stage("end_to_end", e2e)

        first_token = True
        async for event in relay_events(call, on_stats):
            if first_token and event.HasField("token"):
                first_token = False
                self.metrics.observe_stage("time_to_first_token", time.perf_counter() - started)
            yield event
