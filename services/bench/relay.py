"""`densecomm bench relay`: the KV transport against a bare gRPC byte stream, Relay latency and service overhead,
the KV handoff, and issue 11's targets (each ok / missed), all measured in one run.

1. Ceiling: a bare gRPC client stream (generic raw-bytes handlers, no protobuf, nothing encoded) of a ~26.5 MB
   cache's bytes with the hops' channel options, at several message sizes. The best size is what the
   services' ``frame_bytes`` defaults to.
2. Hop throughput: that cache (Qwen3-4B's KV geometry) crosses one loopback gRPC hop the way it crosses
   between the services: ``HopEncoder`` (layers split to ``frame_bytes``; frame i+1 encoded in a worker
   thread while frame i is sent, ready frames sharing a message: ``servicers.ahead``) -> ``servicers.send_frame`` -> the raw KV stream (``services.kvstream``) -> ``servicers.read_frames`` ->
   ``HopDecoder`` (verify + decode of frame i in a worker thread while frame i+1 arrives). One row per
   codec, plus the previous framing (every frame inside a protobuf ``KVMessage``). Every figure is also a
   ratio to the bare stream with the hop's own message size. MB/s are of raw KV.
3. Relay latency on the embedded zoo at concurrency 1, 4 and 16 through the service stack, and the
   in-process ``DenseRelay`` (same requests, same lossless round trips) for the service overhead.
4. KV handoff on a Qwen3-4B-geometry route (lossless, and raw on the shortcut; both hops): from the end of the sender's prefill
   until the receiver holds the whole cache, and layer 0 vs the last chunk; one row per frame transport
   (``HANDOFF_TRANSPORTS``).
Every load loop is bounded in count and runs against loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.hop import HopDecoder, HopEncoder
from services import kvstream, protos, shm
from services import transport as hop_transport
from services.bench import torch_threads
from services.config import ServeConfig
from services.servicers import (
    OverlappedDecode,
    ahead,
    decode_overlapped,
    encoded_messages,
    read_frames,
    read_setup,
    send_frame,
)

relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()
HOP_CODECS = [
    ("raw", "raw", {}),
    ("lossless", "lossless", {}),
    ("int8", "quantized", {"key_bits": 8, "value_bits": 8}),
    ("int4k/int2v", "quantized", {"key_bits": 4, "value_bits": 2, "group": 64}),
]
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
CEILING_SIZES = (64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20)  # message sizes of the bare stream
# The frame transports the handoff is measured on: name -> ServeConfig overrides that select it. A
# transport added to the services adds its row here (the same-node target reads the "shm" row).
HANDOFF_TRANSPORTS: dict[str, dict] = {"bytes": {"hop_transport": "bytes"}, "shm": {"hop_transport": "auto"},
                                        "shm, raw codec": {"hop_transport": "auto", "default_codec": "raw"}}
SAME_NODE_TRANSPORT = "shm"
_POOL: list = []  # the bench's one shared-memory pool (warm across repeats, as a service's is)


def bench_pool() -> shm.ShmPool:
    if not _POOL:
        _POOL.append(shm.ShmPool(ServeConfig().shm_pool_bytes, ServeConfig().shm_min_bytes))
    return _POOL[0]


def close_bench_pool() -> None:
    """Unlink the bench pool's segments (a service's pool goes with its servicer's close)."""
    while _POOL:
        _POOL.pop().close()


# ---- 1, 2: one hop vs the bare byte stream ------------------------------------------------------------


DECODE_KEY = "densecomm-bench-decode"  # call metadata: "0" = the sink only reads the frames


class SinkServicer:
    """The receiving end of a hop, as the receiver does it (read_frames, verify + decode every frame while
    the next arrives, or on this thread for a ``copy_only`` codec), reporting the wire bytes it read."""

    async def Generate(self, request_iterator, context):
        decode = dict(context.invocation_metadata() or ()).get(DECODE_KEY, "1") != "0"
        first = await read_setup(request_iterator)
        reader = await hop_transport.accept(first.setup, context, ServeConfig())  # the same-node shortcut's verdict
        decoder = HopDecoder()

        def feed(frame):
            event = decoder.feed(frame) if decode else None
            if reader is not None:
                reader.decoded(frame)
            return event

        wire = 0

        async def counted():
            nonlocal wire
            async for frame in read_frames(request_iterator, lambda done: None, first.setup.transport or "bytes", reader):
                wire += len(frame)
                yield frame

        decoding = OverlappedDecode(feed, inline=lambda: decoder.copy_only) if decode or reader is not None else None
        await decode_overlapped(counted(), decoding, reader)
        if decode:
            await asyncio.to_thread(decoder.finish)
        yield relay_pb2.RelayEvent(stats=relay_pb2.RelayStats(wire_bytes=wire))


async def _bare_sink(request_iterator, context):
    received = 0
    async for message in request_iterator:
        received += len(message)
    return received.to_bytes(8, "little")


def sink_server() -> tuple[grpc.aio.Server, int]:
    """A loopback server with both receiving ends of the bench: the bare byte sink (generic raw-bytes
    handlers, no deserializer: the message is the bytes; it answers the byte count) and the KV sink."""
    handler = grpc.method_handlers_generic_handler("densecomm.bench.Bytes", {"Sink": grpc.stream_unary_rpc_method_handler(_bare_sink)})
    server = grpc.aio.server(futures.ThreadPoolExecutor(2), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    kvstream.RECEIVER.add_to_server(SinkServicer(), server)
    return server, server.add_insecure_port("127.0.0.1:0")


def _serve_sinks(ports, threads: int) -> None:  # the child process of SinkProcess
    torch.set_num_threads(threads)

    async def serve() -> None:
        server, port = sink_server()
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


class SinkProcess:
    """The bench's receiving ends in a child process (spawned, loopback only, killed on exit): a hop joins two
    processes, as the services' hops do (each end with its own interpreter lock and core), and the bare
    stream it is compared with crosses the same boundary."""

    def __enter__(self) -> SinkProcess:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self.process = context.Process(target=_serve_sinks, args=(ports, torch.get_num_threads()), daemon=True)
        self.process.start()
        try:
            self.address = f"127.0.0.1:{ports.get(timeout=120)}"
        except BaseException:
            self.process.kill()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.join(10)


class _LocalSink:
    """A sink server in this process, for one measurement (``address`` None)."""

    async def __aenter__(self) -> str:
        self.server, port = sink_server()
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(0)


def _sink(address: str | None):
    if address is not None:
        return contextlib.nullcontext(address)
    return _LocalSink()


@dataclass
class HopRun:
    seconds: float
    wire_bytes: int
    messages: int
    transport: str = "bytes"  # what the frames used ("shm": the same-node shortcut; a small message stays bytes)
    cpu_seconds: float = 0.0  # this (sending) process's CPU time, all threads, over ``seconds``


async def one_hop(cache: KVCache, codec_name: str, params: dict, decode: bool, workers: int, frame_bytes: int,
                  framing: str = "raw", transport: str = "bytes", address: str | None = None) -> HopRun:
    """Encode -> loopback gRPC stream -> verify/decode of ``cache``, timed from the encoder's start.
    ``framing``: "raw" (the services' framing) or "protobuf" (every frame in a KVMessage, the previous one);
    ``transport``: "bytes", or "shm" (the same-node shortcut, negotiated as the services do); ``address``:
    a running sink (``SinkProcess``), else one in this process."""
    codec = get_codec(codec_name, **params)
    sent = [0]
    async with _sink(address) as target, grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = kvstream.RECEIVER.stub(channel)
        link = hop_transport.HopLink(bench_pool() if transport == "shm" else None)

        async def messages():
            setup = link.setup(kv_pb2.HopSetup(request_id="bench"))
            setup.transport = "shm" if setup.HasField("shm") else "bytes"
            yield kv_pb2.KVMessage(setup=setup)
            encoder = HopEncoder(codec, workers=workers, frame_bytes=frame_bytes)
            header = await asyncio.to_thread(encoder.start, cache)
            await link.negotiate(call)
            if framing == "raw":  # as the sender does, on either transport
                async for message in encoded_messages(encoder, header, link, frame_bytes):
                    sent[0] += 1
                    yield send_frame(message)
            else:
                yield kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=header))
                async for frame in ahead(encoder.chunks()):
                    sent[0] += 1
                    yield kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=frame))

        started, cpu = time.perf_counter(), time.process_time()
        call = stub.Generate(messages(), timeout=300, metadata=((DECODE_KEY, "1" if decode else "0"),))
        try:
            events = [e async for e in call]
        finally:
            link.close()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return HopRun(seconds, events[-1].stats.wire_bytes, sent[0], link.transport, cpu)


async def bare_stream(total: int, message_bytes: int, address: str | None = None) -> float:
    """Seconds of ``timed_bare_stream``."""
    return (await timed_bare_stream(total, message_bytes, address))[0]


async def timed_bare_stream(total: int, message_bytes: int, address: str | None = None) -> tuple[float, float]:
    """(seconds, this process's CPU seconds over them) for ``total`` bytes in ``message_bytes`` messages
    through a bare loopback gRPC client stream: generic handlers with no (de)serializer (the message is the
    bytes), the hop's channel options, a sink that only counts. The ceiling a KV hop is measured against;
    ``address`` as ``one_hop``'s."""
    # distinct messages, made before the clock starts: the stream reads ``total`` bytes of memory, as a hop
    # does (one buffer sent over and over would stay in the CPU's cache)
    count, tail = divmod(total, message_bytes)
    payloads = [bytes(message_bytes) for _ in range(count)] + ([bytes(tail)] if tail else [])
    async with _sink(address) as target, grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary("/densecomm.bench.Bytes/Sink")

        async def messages():
            for payload in payloads:
                yield payload

        started, cpu = time.perf_counter(), time.process_time()
        received = await call(messages(), timeout=300)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if int.from_bytes(received, "little") != total:
        raise RuntimeError(f"the bare stream delivered {int.from_bytes(received, 'little')} of {total} bytes")
    return seconds, cpu


def bare_mb_s(total: int, message_bytes: int, repeats: int, address: str | None = None) -> float:
    return total / min(asyncio.run(bare_stream(total, message_bytes, address)) for _ in range(repeats)) / 1e6


def ceiling_table(total: int, repeats: int, sizes: tuple[int, ...] = CEILING_SIZES, address: str | None = None) -> list[dict]:
    """The bare byte stream at each message size (best of ``repeats``); the fastest row is marked best.
    ``address``: a ``SinkProcess``'s (else a sink in this process)."""
    rows = [{"message_kb": size / 1024, "mb_s": bare_mb_s(total, size, repeats, address), "best": False} for size in sizes]
    max(rows, key=lambda r: r["mb_s"])["best"] = True
    return rows


def best_message_bytes(ceilings: list[dict]) -> int:
    return int(next(r for r in ceilings if r["best"])["message_kb"] * 1024)


def hop_table(cache: KVCache, repeats: int, workers: int, frame_bytes: int, address: str | None = None) -> list[dict]:
    """Each hop path's MB/s of raw KV and its ratio to the bare stream of the same bytes in messages of the
    hop's own mean message size (measured in this run, to the same sink ``address``); the in-process copy
    for scale."""
    raw = cache.nbytes
    blob = np.frombuffer(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (*cache.keys, *cache.values)), dtype=np.uint8)
    best = min(_timed(lambda: blob.copy()) for _ in range(repeats))
    rows = [{"path": "in-process copy", "codec": "-", "wire_mb": raw / 1e6, "mb_s": raw / best / 1e6, "message_kb": 0.0}]
    paths = [("gRPC hop, no decode", "raw", "raw", {}, False, "raw")]
    paths += [("gRPC hop, encode+verify+decode", label, name, params, True, "raw") for label, name, params in HOP_CODECS]
    paths.insert(2, ("  same, protobuf KVMessage framing", "raw", "raw", {}, True, "protobuf"))
    if shm.available():  # the same-node shortcut: references in the stream, frames in shared memory
        paths += [("shm hop, encode+verify+decode", label, name, params, True, "shm")
                  for label, name, params in HOP_CODECS[:2]]
    runs = {}
    try:
        for path, label, name, params, decode, framing in paths:
            via, wire_framing = ("shm", "raw") if framing == "shm" else ("bytes", framing)
            runs[path, label] = min((asyncio.run(one_hop(cache, name, params, decode, workers, frame_bytes, wire_framing, via, address))
                                     for _ in range(repeats)), key=lambda r: r.seconds)
    finally:
        close_bench_pool()
    for path, label, name, params, decode, framing in paths:
        via = "shm" if framing == "shm" else "bytes"
        run = runs[path, label]
        if via == "shm" and run.transport != "shm":
            path += f" (went as {run.transport})"
        rows.append({"path": path, "codec": label, "wire_mb": run.wire_bytes / 1e6, "mb_s": raw / run.seconds / 1e6,
                     "message_kb": run.wire_bytes / max(run.messages, 1) / 1024})
    # the ceiling: the same bytes in messages of the raw encode+verify+decode hop's own mean size
    message = max(1, round(next(r for r in rows if r["path"] == paths[1][0] and r["codec"] == "raw")["message_kb"] * 1024))
    ceiling = bare_mb_s(raw, message, repeats, address)
    rows.insert(1, {"path": f"bare gRPC bytes, {message / 1024:.0f} KiB msgs", "codec": "-", "wire_mb": raw / 1e6,
                    "mb_s": ceiling, "message_kb": message / 1024})
    for row in rows:
        row["ratio"] = row["mb_s"] / ceiling
    raw_row = next(r for r in rows if r["path"] == paths[1][0] and r["codec"] == "raw")
    raw_row["paired"] = paired_ratios(cache, message, repeats, workers, frame_bytes, address)
    return rows


def paired_ratios(cache: KVCache, message: int, repeats: int, workers: int, frame_bytes: int,
                  address: str | None = None) -> list[float]:
    """The raw encode+verify+decode hop against the bare stream of the same bytes in ``message``-byte
    messages, run back to back in ``repeats`` pairs, rounded up to an even count so that each order (hop
    first, bare first) runs equally often: bare seconds / hop seconds per pair. The table's ratio sets the best of each against the other, taken minutes apart; on a host whose
    bare stream has fast and slow runs that ratio follows the bare stream's luckiest run, while a pair sees
    one state of the machine."""
    hop = lambda: asyncio.run(one_hop(cache, "raw", {}, True, workers, frame_bytes, "raw", "bytes", address)).seconds  # noqa: E731
    bare = lambda: asyncio.run(bare_stream(cache.nbytes, message, address))  # noqa: E731
    ratios = []
    for i in range(repeats + repeats % 2):
        if i % 2:
            b, h = bare(), hop()
        else:
            h, b = hop(), bare()
        ratios.append(b / h)
    return ratios


def render_hop(rows: list[dict], ceilings: list[dict]) -> str:
    """The hop table, every figure also as a ratio to the bare byte stream, then the ceiling per message size."""
    lines = [f"{'path':36s} {'codec':12s} {'msg KiB':>8s} {'wire MB':>8s} {'MB/s':>8s} {'x bare':>7s}"]
    lines += [f"{r['path']:36s} {r['codec']:12s} {r['message_kb']:8.0f} {r['wire_mb']:8.2f} {r['mb_s']:8.0f} {r['ratio']:7.2f}" for r in rows]
    lines += ["", "bare gRPC byte stream by message size (the ceiling; same bytes, same channel options)",
              f"{'message KiB':>11s} {'MB/s':>8s}"]
    lines += [f"{c['message_kb']:11.0f} {c['mb_s']:8.0f}{'  <- best' if c['best'] else ''}" for c in ceilings]
    return "\n".join(lines)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ---- 3: Relay latency, and the in-process relay for the same requests -----------------------------------

MAX_NEW_TOKENS = 24


def zoo_contexts() -> list[str]:
    from densecomm_core.zoo import tasks

    return [e.context for e in tasks.make_split("test", 50)]


@dataclass(frozen=True)
class Timing:
    """One answer's timing as its reader saw it: the whole call, the wait for its first token, and the tokens."""

    total_s: float
    first_token_s: float
    tokens: int
    stages: dict[str, float] = field(default_factory=dict)  # the answer's RelayStats latencies (services only)

    @classmethod
    def of(cls, started: float, seen: list[float], stages: dict[str, float] | None = None) -> Timing:
        """From the ``perf_counter`` times of the start and of each answer token (the call ends now)."""
        total = time.perf_counter() - started
        return cls(total, (seen[0] - started) if seen else total, len(seen), stages or {})

    @property
    def per_token_s(self) -> float | None:
        """Mean gap between later tokens (None with fewer than two): what each generated token adds."""
        return (self.total_s - self.first_token_s) / (self.tokens - 1) if self.tokens > 1 else None


# The stages that follow one another from the sender's receiving the call to the receiver's first token: the
# sender's checks, its prefill, the cache crossing both hops, the receiver's prompt, its first decoding step.
FIRST_TOKEN_PATH = ("admit", "prefill", "kv_handoff", "prompt", "first_token")


def split_table(timings: list[Timing]) -> dict:
    """Median time to the first token and median per-token gap after it, in ms; the median of each stage the
    services reported (``stage_ms``: the stages every answer has); and, where every answer reports the
    stages of ``FIRST_TOKEN_PATH``, the median of what its first-token wait spent outside them
    (``forwarding_ms``: the request reaching the sender, the first token travelling back through the calls)."""
    gaps = [t.per_token_s for t in timings if t.per_token_s is not None]
    common = set.intersection(*(set(t.stages) for t in timings)) if timings else set()
    table = {"first_token_ms": 1e3 * statistics.median(t.first_token_s for t in timings),
             "per_token_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"),
             "tokens": statistics.median(t.tokens for t in timings),
             "stage_ms": {stage: 1e3 * statistics.median(t.stages[stage] for t in timings) for stage in sorted(common)}}
    if timings and common >= set(FIRST_TOKEN_PATH):
        table["forwarding_ms"] = 1e3 * statistics.median(t.first_token_s - sum(t.stages[s] for s in FIRST_TOKEN_PATH)
                                                         for t in timings)
    return table


async def latency_run(address: str, contexts: list[str], concurrency: int, requests: int, timeout: float = 120.0) -> list[Timing]:
    from services.client import build_request, relay_stream

    semaphore = asyncio.Semaphore(concurrency)
    timings: list[Timing] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)

        async def one(i: int) -> None:
            async with semaphore:
                seen: list[float] = []
                started = time.perf_counter()
                stats = await relay_stream(stub, build_request(contexts[i % len(contexts)], max_new_tokens=MAX_NEW_TOKENS),
                                           timeout, on_text=lambda _: seen.append(time.perf_counter()))
                timings.append(Timing.of(started, seen, {s.stage: s.seconds for s in stats.latencies}))

        await asyncio.gather(*(one(i) for i in range(requests)))
    return timings


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def latency_table(address: str, requests: int, levels: tuple[int, ...] = (1, 4, 16)) -> list[dict]:
    contexts = zoo_contexts()
    asyncio.run(latency_run(address, contexts, 1, 4))  # warm-up
    rows = []
    for concurrency in levels:
        started = time.perf_counter()
        timings = asyncio.run(latency_run(address, contexts, concurrency, requests))
        wall = time.perf_counter() - started
        latencies = [t.total_s for t in timings]
        rows.append({"concurrency": concurrency, "requests": requests, "p50_ms": 1e3 * percentile(latencies, 50),
                     "p99_ms": 1e3 * percentile(latencies, 99), "mean_ms": 1e3 * statistics.mean(latencies),
                     "requests_per_s": requests / wall} | split_table(timings))
    return rows


def in_process_table(requests: int, codec_name: str = "lossless", threads: int = 1) -> dict:
    """The in-process DenseRelay on the same requests as ``latency_table``'s (zoo, unaware, greedy,
    MAX_NEW_TOKENS, one at a time), each cache through the same codec round trip per hop as the services,
    with ``threads`` torch threads (1: as each Ray actor of the stack runs on this 2-core machine; more
    threads beside the other processes oversubscribe the cores and run slower)."""
    with torch_threads(threads):
        return _in_process(requests, codec_name) | {"threads": threads}


def _in_process(requests: int, codec_name: str) -> dict:
    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.generation import GenerationConfig
    from densecomm_core.hop import round_trip
    from densecomm_core.relay import ContextMode, DenseRelay
    from densecomm_core.zoo.pair import load_zoo_pair, zoo_adapter_dir

    sender, receiver = load_zoo_pair()
    adapter = DenseAdapter.load(zoo_adapter_dir(), sender.geometry, receiver.geometry).eval()
    codec = get_codec(codec_name)
    frame_bytes = ServeConfig().frame_bytes  # frames as the services size them (a zoo cache: one packed chunk)
    relay = DenseRelay(sender, receiver, adapter,
                       channel=lambda cache, hop: round_trip(cache, codec, dtype=cache.dtype, frame_bytes=frame_bytes))
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    contexts = zoo_contexts()
    for context in contexts[:4]:  # warm-up, as the service run has
        relay.run([context], ContextMode.UNAWARE, config)
    eos = receiver.tokenizer.eos_token_id
    timings = []
    for i in range(requests):
        seen: list[float] = []  # each answer token timed as the services stream it (EOS is not one)

        def on_token(step: int, tokens: torch.Tensor) -> None:
            if int(tokens[0]) != eos:
                seen.append(time.perf_counter())

        started = time.perf_counter()
        relay.run([contexts[i % len(contexts)]], ContextMode.UNAWARE, config, on_token=on_token)
        timings.append(Timing.of(started, seen))
    times = [t.total_s for t in timings]
    return {"requests": requests, "p50_ms": 1e3 * percentile(times, 50), "mean_ms": 1e3 * statistics.mean(times)} \
        | split_table(timings)


# ---- 4: the KV handoff on a Qwen3-4B-geometry route --------------------------------------------------


def qwen3_4b_route(root: Path) -> dict:
    """Sender and receiver with Qwen3-4B's KV geometry (random weights, hidden 256) and an adapter between them,
    all three in bf16 as a GPU deployment runs them (the adapter's MLPs on this CPU's AVX512-BF16 units)."""
    from densecomm_core.adapter import AdapterConfig, DenseAdapter
    from densecomm_core.models import geometry_of
    from densecomm_core.zoo.tokenizer import build_tokenizer
    from services.bench.codec import qwen3_4b_geometry_model

    tokenizer = build_tokenizer()
    geometries = []
    for i, name in enumerate(("sender", "receiver")):
        torch.manual_seed(i)
        model = qwen3_4b_geometry_model(tokenizer, rope_theta=1_000_000.0 * (i + 1))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        geometries.append(geometry_of(model))
    DenseAdapter(AdapterConfig(*geometries, expansion=1)).to(torch.bfloat16).save(root / "adapter")
    return {"name": "qwen3-4b-geometry", "sender": str(root / "sender"), "receiver": str(root / "receiver"),
            "adapter": str(root / "adapter"), "dtype": "bfloat16", "adapter_dtype": "bfloat16"}


def handoff_table(address: str, text: str, repeats: int, transport: str = "bytes") -> list[dict]:
    """Per Relay call on the Qwen3-4B-geometry route: the KV handoff (sender's prefill end -> the receiver
    holds the whole cache), the sender's encode, the receiver's transfer, layer 0 vs the last chunk."""
    from services.client import relay_once

    asyncio.run(relay_once(address, text, route="qwen3-4b-geometry", max_new_tokens=2, timeout=300))  # warm-up
    rows = []
    for _ in range(repeats):
        stats = asyncio.run(relay_once(address, text, route="qwen3-4b-geometry", max_new_tokens=2, timeout=300))
        latency = {l.stage: l.seconds for l in stats.latencies}
        rows.append({"transport": transport, "used": "/".join(h.transport for h in stats.hops), "codec": stats.codec,
                     "raw_mb": stats.raw_bytes / 1e6, "handoff_ms": 1e3 * latency["kv_handoff"],
                     "sender_encode_ms": 1e3 * latency["encode"], "transform_ms": 1e3 * latency.get("transform", 0.0),
                     "receiver_transfer_ms": 1e3 * latency["transfer"],
                     "layer0_before_last_chunk_ms": 1e3 * (stats.sender_last_chunk_unix - stats.receiver_layer0_unix)})
    return rows


def render_handoff(rows: list[dict]) -> str:
    # "- transform": the handoff without the adapter's RoPE + MLP compute (what transport and codecs cost)
    lines = [f"{'transport':14s} {'hops used':>11s} {'codec':>9s} {'raw MB':>7s} {'handoff ms':>10s} {'- transform':>11s} "
             f"{'encode ms':>9s} {'transform ms':>12s} {'rcv transfer ms':>15s} {'layer0 before last chunk ms':>27s}"]
    lines += [f"{r['transport']:14s} {r['used']:>11s} {r['codec']:>9s} {r['raw_mb']:7.1f} {r['handoff_ms']:10.1f} "
              f"{r['handoff_ms'] - r['transform_ms']:11.1f} {r['sender_encode_ms']:9.1f} {r['transform_ms']:12.1f} "
              f"{r['receiver_transfer_ms']:15.1f} {r['layer0_before_last_chunk_ms']:27.1f}" for r in rows]
    return "\n".join(lines)


def long_text(tokens: int) -> str:
    from densecomm_core.zoo import tasks

    words, examples = [], iter(tasks.make_split("test", 200))
    while len(words) < tokens - 1:
        words += next(examples).context.split()
    return " ".join(words[: tokens - 1])


# ---- 5: the targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One of issue 11's targets: the measured value against its limit (None: reported only / not measured)."""

    name: str
    value: float | None
    unit: str
    limit: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        if self.limit is None:
            return "reported"
        met = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "ok" if met else "missed"


def targets(report: dict) -> list[Target]:
    """The targets from one run's report (the ``run`` dict)."""
    hop = {(r["path"], r["codec"]): r for r in report["hop"]}
    raw = hop[("gRPC hop, encode+verify+decode", "raw")]
    lossless = hop[("gRPC hop, encode+verify+decode", "lossless")]
    handoff = {}
    for row in report["handoff"]:
        handoff.setdefault(row["transport"], []).append(row["handoff_ms"])
    bytes_ms = statistics.median(handoff["bytes"]) if handoff.get("bytes") else None
    shm_ms = statistics.median(handoff[SAME_NODE_TRANSPORT]) if handoff.get(SAME_NODE_TRANSPORT) else None
    c1 = next(r for r in report["latency"] if r["concurrency"] == 1)
    c16 = next((r for r in report["latency"] if r["concurrency"] == 16), None)
    p = report["in_process"]
    in_process = p["p50_ms"]
    raw_mb = report["handoff"][0]["raw_mb"] if report["handoff"] else 0.0
    paired = raw.get("paired") or []
    paired_note = (f"; run in pairs: median {statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}, "
                   f"{len(paired)} pairs)" if paired else "")
    return [
        Target("raw gRPC hop, encode+verify+decode / bare stream", raw["ratio"], "x", 0.80,
               note=f"best of each: {raw['mb_s']:.0f} vs {raw['mb_s'] / raw['ratio']:.0f} MB/s{paired_note}"),
        Target("lossless hop, raw KV throughput", lossless["mb_s"], "MB/s", 800.0),
        Target(f"{raw_mb:.1f} MB relay, prefill end -> receiver holds it (bytes)", bytes_ms, "ms", 150.0, False,
               note=f"median of {len(handoff.get('bytes', []))}, lossless, both hops"),
        Target("the same through the same-node shortcut", shm_ms, "ms", 40.0, False,
               note="" if shm_ms is not None else f"no {SAME_NODE_TRANSPORT!r} transport in this build"),
        Target("service overhead: Relay p50 (c=1) - in-process", c1["p50_ms"] - in_process, "ms", 20.0, False,
               note=f"Relay {c1['p50_ms']:.1f} ms, in-process DenseRelay {in_process:.1f} ms; first token "
                    f"+{c1['first_token_ms'] - p['first_token_ms']:.1f} ms, each later token "
                    f"+{c1['per_token_ms'] - p['per_token_ms']:.2f} ms"),
        Target("Relay throughput at concurrency 16", c16["requests_per_s"] if c16 else None, "req/s"),
    ]


def render_targets(rows: list[Target]) -> str:
    lines = [f"{'target':58s} {'value':>12s} {'limit':>8s} {'status':>12s}  note"]
    for t in rows:
        value = "-" if t.value is None else f"{t.value:.2f} {t.unit}" if t.unit == "x" else f"{t.value:.1f} {t.unit}"
        limit = "-" if t.limit is None else f"{'>=' if t.higher_is_better else '<='} {t.limit:g}"
        lines.append(f"{t.name:58s} {value:>12s} {limit:>8s} {t.status:>12s}  {t.note}".rstrip())
    return "\n".join(lines)


# ---- the whole run ------------------------------------------------------------------------------------


def run(repeats: int, workers: int, tokens: int, requests: int, no_ray: bool, chunk_tokens: int = 0,
        frame_bytes: int | None = None) -> dict:
    """Every table of the bench in one run (the CLI renders it). ``frame_bytes`` None: the services'
    default; the hop table uses the same value."""
    from services.bench import codec as bench_codec
    from services.config import ServeConfig, load_config, zoo_route
    from services.stack import LocalStack, RayStack

    frame_bytes = frame_bytes or ServeConfig().frame_bytes
    report: dict = {"frame_bytes": frame_bytes, "hosting": "local gRPC stack" if no_ray else "Ray actors"}
    cache = bench_codec.qwen3_4b_geometry_cache(tokens)
    report["raw_mb"] = cache.nbytes / 1e6
    with SinkProcess() as sink:  # every hop and its ceiling cross into another process, as the services' do
        report["ceiling"] = ceiling_table(cache.nbytes, repeats, address=sink.address)
        report["hop"] = hop_table(cache, repeats, workers, frame_bytes, sink.address)
    report["in_process"] = in_process_table(requests)
    root = Path(tempfile.mkdtemp(prefix="densecomm-bench-"))
    report["handoff"] = []
    try:
        big = qwen3_4b_route(root)
        for i, (transport, overrides) in enumerate(HANDOFF_TRANSPORTS.items()):
            config = load_config(None, relay_port=0, routes=[zoo_route().__dict__, big], chunk_tokens=chunk_tokens,
                                 frame_bytes=frame_bytes, **overrides)
            with (LocalStack(config) if no_ray else RayStack(config)) as stack:
                if i == 0:  # the zoo latency on the default transport
                    report["latency"] = latency_table(stack.relay_address, requests)
                report["handoff"] += handoff_table(stack.relay_address, long_text(tokens), repeats, transport)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["targets"] = [t.__dict__ | {"status": t.status} for t in targets(report)]
    return report


def render(report: dict, repeats: int, requests: int, tokens: int) -> str:
    out = [f"1-2. one loopback gRPC hop, {report['raw_mb']:.1f} MB Qwen3-4B-geometry cache (MB/s of raw KV, best of "
           f"{repeats}; frame_bytes {report['frame_bytes'] // 1024} KiB)\n", render_hop(report["hop"], report["ceiling"])]
    best = best_message_bytes(report["ceiling"])
    out.append(f"\nbest bare message size this run: {best // 1024} KiB; the hops ran with frame_bytes "
               f"{report['frame_bytes'] // 1024} KiB (services.config.ServeConfig.frame_bytes)")
    out.append(f"\n3. Relay end to end on the zoo ({report['hosting']}, {requests} requests per level, lossless codec, "
               f"{MAX_NEW_TOKENS} new tokens)\n")
    out.append(f"{'concurrency':>11s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s} {'req/s':>7s} {'1st tok ms':>10s} "
               f"{'ms/token':>8s} {'tokens':>6s}")
    out += [f"{r['concurrency']:11d} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['mean_ms']:8.1f} {r['requests_per_s']:7.1f} "
            f"{r['first_token_ms']:10.1f} {r['per_token_ms']:8.2f} {r['tokens']:6.0f}" for r in report["latency"]]
    p = report["in_process"]
    out.append(f"{'in-process':>11s} {p['p50_ms']:8.1f} {'':8s} {p['mean_ms']:8.1f} {'':7s} {p['first_token_ms']:10.1f} "
               f"{p['per_token_ms']:8.2f} {p['tokens']:6.0f}")
    c1 = next(r for r in report["latency"] if r["concurrency"] == 1)
    if c1.get("stage_ms"):
        out.append("concurrency 1, the stages the services report (medians, ms): "
                   + ", ".join(f"{stage} {ms:.1f}" for stage, ms in c1["stage_ms"].items()))
    if "forwarding_ms" in c1:
        out.append(f"concurrency 1, the first token's path (medians, ms): {' + '.join(FIRST_TOKEN_PATH)} = "
                   + " + ".join(f"{c1['stage_ms'][s]:.1f}" for s in FIRST_TOKEN_PATH)
                   + f", and {c1['forwarding_ms']:.1f} outside them (the request reaching the sender, the first token "
                     f"coming back through the calls) of the caller's {c1['first_token_ms']:.1f}")
    out.append(f"(in-process: DenseRelay, the same requests one at a time, lossless round trip per hop, {p['threads']} torch "
               f"thread. '1st tok' and 'ms/token' are medians over the requests of the wait for the first answer token "
               f"and of the mean gap between later ones, as the caller receives them: where the overhead is fixed, and "
               f"where each token adds to it)")
    out.append(f"\n4. KV handoff on a Qwen3-4B-geometry route ({tokens} tokens, models and adapter in bf16, both hops; every call; lossless unless "
               f"the row names another codec; 'hops used' is what each hop reported)\n")
    out.append(render_handoff(report["handoff"]))
    out.append("\n5. targets (issue 11)\n")
    out.append(render_targets([Target(**{k: v for k, v in t.items() if k != "status"}) for t in report["targets"]]))
    return "\n".join(out)
