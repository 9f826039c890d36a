"""`densecomm bench relay`: per-hop transport throughput, end-to-end Relay latency, time to layer 0.

1. Hop throughput: a ~25 MB cache with Qwen3-4B's KV geometry crosses one loopback gRPC hop (client
   stream of wire frames into a sink that verifies and decodes them), with each codec, against the
   ceiling measured in the same run: a bare gRPC byte stream (generic raw-bytes handlers, no protobuf,
   nothing encoded) of the same bytes with the hop's message size and channel options, at several
   message sizes. Every hop figure is printed as a ratio to that ceiling. MB/s are of raw KV.
2. Relay latency on the embedded zoo at concurrency 1, 4 and 16 (p50 / p99), through the service stack.
3. Time to layer 0: on a Qwen3-4B-geometry route, when the receiver held layer 0 vs when the sender
   handed over its last chunk.
Every load loop is bounded in count and runs against loopback only.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.hop import HopDecoder, HopEncoder
from services import protos
from services.servicers import OverlappedDecode, ahead

relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()
HOP_CODECS = [
    ("raw", "raw", {}),
    ("lossless", "lossless", {}),
    ("int8", "quantized", {"key_bits": 8, "value_bits": 8}),
    ("int4k/int2v", "quantized", {"key_bits": 4, "value_bits": 2, "group": 64}),
]
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


class SinkServicer(kv_pb2_grpc.ReceiverServicer):
    """Receives a KV stream like the receiver does (verify + decode every chunk) and reports bytes."""

    def __init__(self, decode: bool) -> None:
        self.decode = decode

    async def Generate(self, request_iterator, context):
        decoder = HopDecoder()
        decoding = OverlappedDecode(decoder.feed)  # as the receiver does: decode frame i while frame i+1 arrives
        wire = 0
        async for message in request_iterator:
            if message.HasField("frame"):
                wire += len(message.frame.frame)
                if self.decode:
                    await decoding.submit(message.frame.frame)
        if self.decode:
            await decoding.drain()
            await asyncio.to_thread(decoder.finish)
        yield relay_pb2.RelayEvent(stats=relay_pb2.RelayStats(wire_bytes=wire))


async def one_hop(cache: KVCache, codec_name: str, params: dict, decode: bool, workers: int) -> tuple[float, int]:
    """Seconds for encode -> loopback gRPC stream -> verify/decode of ``cache``; returns (seconds, wire bytes)."""
    server = grpc.aio.server(futures.ThreadPoolExecutor(2), options=CHANNEL_OPTIONS)
    kv_pb2_grpc.add_ReceiverServicer_to_server(SinkServicer(decode), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codec = get_codec(codec_name, **params)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            stub = kv_pb2_grpc.ReceiverStub(channel)

            async def messages():
                yield kv_pb2.KVMessage(setup=kv_pb2.HopSetup(request_id="bench"))
                async for frame in ahead(HopEncoder(codec, workers=workers).frames(cache)):  # as the sender does
                    yield kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=frame))

            started = time.perf_counter()
            events = [e async for e in stub.Generate(messages(), timeout=300)]
            return time.perf_counter() - started, events[-1].stats.wire_bytes
    finally:
        await server.stop(0)


CEILING_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)  # message sizes the bare stream is measured at


async def bare_stream(total: int, message_bytes: int) -> float:
    """Seconds for ``total`` bytes in ``message_bytes`` messages through a bare loopback gRPC client stream:
    generic handlers with no (de)serializer (the message is the bytes), the hop's channel options, a sink
    that only counts. The ceiling a KV hop is measured against."""
    received = [0]

    async def sink(request_iterator, context):
        async for message in request_iterator:
            received[0] += len(message)
        return b""

    handler = grpc.method_handlers_generic_handler("densecomm.bench.Bytes", {"Sink": grpc.stream_unary_rpc_method_handler(sink)})
    server = grpc.aio.server(futures.ThreadPoolExecutor(2), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    payload = bytes(message_bytes)
    count, tail = divmod(total, message_bytes)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            call = channel.stream_unary("/densecomm.bench.Bytes/Sink")

            async def messages():
                for _ in range(count):
                    yield payload
                if tail:
                    yield payload[:tail]

            started = time.perf_counter()
            await call(messages(), timeout=300)
            seconds = time.perf_counter() - started
    finally:
        await server.stop(0)
    if received[0] != total:
        raise RuntimeError(f"the bare stream delivered {received[0]} of {total} bytes")
    return seconds


def ceiling_table(total: int, repeats: int, sizes: tuple[int, ...] = CEILING_SIZES) -> list[dict]:
    """The bare byte stream at each message size (best of ``repeats``)."""
    return [{"message_kb": size / 1024, "mb_s": total / min(asyncio.run(bare_stream(total, size)) for _ in range(repeats)) / 1e6}
            for size in sizes]


def hop_table(cache: KVCache, repeats: int, workers: int) -> list[dict]:
    """Each hop path's MB/s of raw KV and its ratio to the bare stream of the same bytes in messages of
    the hop's own mean frame size (measured in this run)."""
    raw = cache.nbytes
    blob = np.frombuffer(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (*cache.keys, *cache.values)), dtype=np.uint8)
    best = min(_timed(lambda: blob.copy()) for _ in range(repeats))
    message = max(1, raw // cache.num_layers)  # the hop's frames: one layer's K and V each
    ceiling = raw / min(asyncio.run(bare_stream(raw, message)) for _ in range(repeats)) / 1e6
    rows = [{"path": "in-process copy", "codec": "-", "wire_mb": raw / 1e6, "mb_s": raw / best / 1e6},
            {"path": f"bare gRPC bytes, {message / 1024:.0f} KiB msgs", "codec": "-", "wire_mb": raw / 1e6, "mb_s": ceiling}]
    for label, name, params in HOP_CODECS:
        for decode in (False, True) if label == "raw" else (True,):
            times = [asyncio.run(one_hop(cache, name, params, decode, workers)) for _ in range(repeats)]
            seconds, wire = min(times)
            path = "gRPC hop, no decode" if not decode else "gRPC hop, encode+verify+decode"
            rows.append({"path": path, "codec": label, "wire_mb": wire / 1e6, "mb_s": raw / seconds / 1e6})
    for row in rows:
        row["ratio"] = row["mb_s"] / ceiling
    return rows


def render_hop(rows: list[dict], ceilings: list[dict]) -> str:
    """The hop table, every figure also as a ratio to the bare byte stream, then the ceiling per message size."""
    lines = [f"{'path':36s} {'codec':12s} {'wire MB':>8s} {'MB/s':>8s} {'x bare':>7s}"]
    lines += [f"{r['path']:36s} {r['codec']:12s} {r['wire_mb']:8.2f} {r['mb_s']:8.0f} {r['ratio']:7.2f}" for r in rows]
    lines += ["", "bare gRPC byte stream by message size (the ceiling; same bytes, same channel options)", f"{'message KiB':>11s} {'MB/s':>8s}"]
    lines += [f"{c['message_kb']:11.0f} {c['mb_s']:8.0f}" for c in ceilings]
    return "\n".join(lines)


def profile_hop(cache: KVCache, workers: int) -> str:
    """Where one raw gRPC hop spends its time (client and sink share this process)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(one_hop(cache, "raw", {}, True, workers))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def latency_run(address: str, contexts: list[str], concurrency: int, requests: int, timeout: float = 120.0) -> list[float]:
    from services.client import build_request, relay_stream

    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)

        async def one(i: int) -> None:
            async with semaphore:
                started = time.perf_counter()
                await relay_stream(stub, build_request(contexts[i % len(contexts)], max_new_tokens=24), timeout)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(i) for i in range(requests)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def latency_table(address: str, requests: int) -> list[dict]:
    from densecomm_core.zoo import tasks

    contexts = [e.context for e in tasks.make_split("test", 50)]
    asyncio.run(latency_run(address, contexts, 1, 4))  # warm-up
    rows = []
    for concurrency in (1, 4, 16):
        started = time.perf_counter()
        latencies = asyncio.run(latency_run(address, contexts, concurrency, requests))
        wall = time.perf_counter() - started
        rows.append({"concurrency": concurrency, "requests": requests, "p50_ms": 1e3 * percentile(latencies, 50),
                     "p99_ms": 1e3 * percentile(latencies, 99), "mean_ms": 1e3 * statistics.mean(latencies),
                     "requests_per_s": requests / wall})
    return rows


def qwen3_4b_route(root: Path) -> dict:
    """Sender and receiver with Qwen3-4B's KV geometry (random weights, hidden 256) and an adapter between them."""
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
            "adapter": str(root / "adapter"), "dtype": "bfloat16"}


def layer0_table(address: str, text: str, repeats: int) -> list[dict]:
    from services.client import relay_once

    rows = []
    for _ in range(repeats):
        stats = asyncio.run(relay_once(address, text, route="qwen3-4b-geometry", max_new_tokens=2, timeout=300))
        latency = {l.stage: l.seconds for l in stats.latencies}
        rows.append({"raw_mb": stats.raw_bytes / 1e6, "sender_encode_ms": 1e3 * latency["encode"],
                     "receiver_transfer_ms": 1e3 * latency["transfer"],
                     "layer0_before_last_chunk_ms": 1e3 * (stats.sender_last_chunk_unix - stats.receiver_layer0_unix)})
    return rows


def long_text(tokens: int) -> str:
    from densecomm_core.zoo import tasks

    words, examples = [], iter(tasks.make_split("test", 200))
    while len(words) < tokens - 1:
        words += next(examples).context.split()
    return " ".join(words[: tokens - 1])


def temporary_route_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="densecomm-bench-"))


HANDOFF_CODECS = ("raw", "lossless")


def handoff_table(routes: list[dict], text: str, repeats: int, no_ray: bool, chunk_tokens: int = 0,
                  codecs: tuple[str, ...] = HANDOFF_CODECS) -> list[dict]:
    """The KV hand-off on the Qwen3-4B-geometry route with each hop transport, measured in one run: from the
    end of the sender's prefill to the receiver holding the whole cache in its model's space, through both
    hops (the receiver's ``kv_handoff`` stage). One stack with ``hop_transport = "bytes"``, then one with
    ``"auto"`` (the same-node shortcut: every service of the stack is on this node); best and median of
    ``repeats`` after one warm-up call per codec."""
    from services.client import relay_once
    from services.config import load_config
    from services.stack import LocalStack, RayStack

    rows = []
    for hop_transport in ("bytes", "auto"):
        config = load_config(None, relay_port=0, routes=routes, chunk_tokens=chunk_tokens, hop_transport=hop_transport)
        with (LocalStack(config) if no_ray else RayStack(config)) as stack:
            for codec in codecs:
                samples = []
                for _ in range(repeats + 1):  # the first call warms the pools and the channels
                    stats = asyncio.run(relay_once(stack.relay_address, text, route="qwen3-4b-geometry", codec=codec,
                                                   max_new_tokens=1, timeout=300))
                    stages = {l.stage: l.seconds for l in stats.latencies}
                    samples.append({k: 1e3 * stages.get(k, 0.0) for k in ("kv_handoff", "encode", "transform", "decode")})
                samples = samples[1:]
                handoff = sorted(s["kv_handoff"] for s in samples)
                rows.append({"hop_transport": hop_transport, "transports": "/".join(h.transport for h in stats.hops),
                             "codec": codec, "raw_mb": stats.raw_bytes / 1e6, "handoff_ms_best": handoff[0],
                             "handoff_ms_median": statistics.median(handoff),
                             **{f"{k}_ms": statistics.median(s[k] for s in samples) for k in ("encode", "transform", "decode")}})
    return rows


def render_handoff(rows: list[dict]) -> str:
    lines = [f"{'hop_transport':>13s} {'hops used':>17s} {'codec':>9s} {'raw MB':>7s} {'handoff ms best':>16s} {'median':>7s}"
             f" {'encode ms':>9s} {'transform ms':>12s} {'decode ms':>9s}"]
    lines += [f"{r['hop_transport']:>13s} {r['transports']:>17s} {r['codec']:>9s} {r['raw_mb']:7.1f} {r['handoff_ms_best']:16.1f}"
              f" {r['handoff_ms_median']:7.1f} {r['encode_ms']:9.1f} {r['transform_ms']:12.1f} {r['decode_ms']:9.1f}" for r in rows]
    return "\n".join(lines)
