"""Where one KV hop's time goes (`densecomm bench relay --profile`): every stage timed alone on the hop's own frames.

    stage_table(cache, codec, ...)   per stage, seconds on this cache: the codec's encode, the sender's chunk
                                     checksums, the join of a chunk's parts into its frame (the one copy of the
                                     payload on the sending side), gRPC core + syscalls (a bare byte stream of the same
                                     messages; beside it the sending process's CPU time during that stream, which
                                     says how much of a core is left to hide work in), the receiver's frame split, checksum verification, the codec's
                                     decode, header/order checks + placement into the cache; beside them the
                                     protobuf serialize + parse that the raw framing no longer pays, and the hop's
                                     own wall time (as the services run it: a ``copy_only`` codec on the
                                     streams' own threads, others encoded ahead and decoded overlapped)
    render_stages(rows)              the table, with the gap to the bare stream and what the stages add up to
    cprofile_hop(cache, workers)     cProfile's top functions of one raw hop (client and sink in one process)

Stages run one after another here, so their sum is what a hop would cost with no overlap; the hop's wall
time is lower where a stage hides behind gRPC's own work (the other end's process, encode-ahead / decode-behind
threads).
"""

from __future__ import annotations

import asyncio
import math
import time

import torch
import xxhash

from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.codec.wire import (
    CHUNK_FIELDS,
    CHUNK_PREFIX_SIZE,
    StreamDecoder,
    chunk_parts,
    split_frames,
    start_stream,
)
from densecomm_core.hop import HopEncoder, join_messages
from services import protos

relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def stage_table(cache: KVCache, codec_name: str, params: dict, frame_bytes: int, workers: int, repeats: int,
                address: str | None = None) -> list[dict]:
    """Seconds of each stage of one hop of ``cache`` through ``codec_name`` (best of ``repeats``); the bare
    stream and the hop itself go to the sink at ``address`` (a ``relay.SinkProcess``; None: this process)."""
    from services.bench.relay import bare_stream, one_hop

    probe = HopEncoder(get_codec(codec_name, **params), frame_bytes=frame_bytes)
    header_frame = probe.start(cache)
    coded, codec, header = start_stream(cache, get_codec(codec_name, **params), probe.header.chunk_tokens, None,
                                        probe.header.layers_per_chunk)
    ranges = list(enumerate(header.chunk_ranges()))
    packed = header.layers_per_chunk > 1  # a small cache: whole layers per chunk (wire version 2)

    def encode_payloads() -> list:
        if packed:
            return [codec.encode_packed_parts([t for l in header.span(layer) for t in (coded.keys[l], coded.values[l])])
                    for _, (layer, _, _) in ranges]
        return [codec.for_layer(layer).encode_parts(coded.keys[layer][:, :, start : start + count],
                                                    coded.values[layer][:, :, start : start + count])
                for _, (layer, start, count) in ranges]

    payloads = encode_payloads()
    framed = [chunk_parts(seq, layer, start, count, payload) for (seq, (layer, start, count)), payload in zip(ranges, payloads)]
    frames = [header_frame, *(b"".join(parts) for parts in framed)]
    messages = list(join_messages([[f] for f in frames], frame_bytes))  # grouped greedily: the fewest messages a hop sends
    wire = sum(len(m) for m in messages)

    def verify() -> None:
        for frame in frames[1:]:
            view = memoryview(frame)
            check = xxhash.xxh3_64(view[4 : 4 + CHUNK_FIELDS.size])
            check.update(view[CHUNK_PREFIX_SIZE:])
            check.intdigest()

    def codec_decode() -> None:
        for frame, (_, (layer, _, count)) in zip(frames[1:], ranges):
            if packed:
                numel = sum(math.prod(shape) for l in header.span(layer) for shape in header.chunk_shapes(l, count))
                codec.decode_packed_into(memoryview(frame)[CHUNK_PREFIX_SIZE:], torch.empty(numel, dtype=header.torch_dtype))
                continue
            key_shape, value_shape = header.chunk_shapes(layer, count)
            codec.for_layer(layer).decode(memoryview(frame)[CHUNK_PREFIX_SIZE:], key_shape, value_shape, header.torch_dtype)

    def full_decode() -> None:
        decoder = StreamDecoder()
        for frame in frames:
            decoder.feed(frame)
        decoder.finish()

    def protobuf() -> None:
        for message in messages:
            parsed = kv_pb2.KVMessage.FromString(kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=message)).SerializeToString())
            _ = parsed.frame.frame  # upb copies the field out when it is read

    def bare_run() -> tuple[float, float]:  # (wall, this process's CPU time: how busy the sending end is)
        cpu = time.process_time()
        wall = asyncio.run(bare_stream(wire, max(1, wire // len(messages)), address))
        return wall, time.process_time() - cpu

    bare_runs = [bare_run() for _ in range(repeats)]
    seconds = {
        "encode: codec": _best(encode_payloads, repeats),
        "encode: chunk checksums (xxh3)": _best(lambda: [chunk_parts(s, l, a, n, p) for (s, (l, a, n)), p in zip(ranges, payloads)], repeats),
        "send: join chunk parts into frames (copy)": _best(lambda: [b"".join(parts) for parts in framed], repeats),
        "gRPC core + syscalls (bare stream, same messages)": min(bare_runs)[0],
        "receive: split messages into frames": _best(lambda: [f for m in messages for f in split_frames(m)], repeats),
        "decode: verify checksums (xxh3)": _best(verify, repeats),
        "decode: codec": _best(codec_decode, repeats),
    }
    full = _best(full_decode, repeats)
    seconds["decode: header, order checks, placement"] = max(0.0, full - seconds["decode: verify checksums (xxh3)"] - seconds["decode: codec"])
    rows = [{"stage": name, "seconds": s, "paid": True} for name, s in seconds.items()]
    rows.append({"stage": "protobuf serialize + parse (old framing; not paid)", "seconds": _best(protobuf, repeats), "paid": False})
    rows.append({"stage": "bare stream: the sending process's CPU time", "seconds": min(bare_runs)[1], "paid": False})
    hop = min(asyncio.run(one_hop(cache, codec_name, params, True, workers, frame_bytes, address=address)).seconds
              for _ in range(repeats))
    rows.append({"stage": "the hop, wall (as the services run it)", "seconds": hop, "paid": False})
    for row in rows:
        row["mb_s"] = cache.nbytes / row["seconds"] / 1e6 if row["seconds"] > 0 else float("inf")
        row["messages"], row["frames"] = len(messages), len(frames)
    return rows


def render_stages(codec_name: str, rows: list[dict]) -> str:
    hop = next(r["seconds"] for r in rows if r["stage"].startswith("the hop"))
    bare = next(r["seconds"] for r in rows if r["stage"].startswith("gRPC core"))
    paid = sum(r["seconds"] for r in rows if r["paid"])
    outside = paid - bare
    lines = [f"{codec_name}: {rows[0]['messages']} messages, {rows[0]['frames']} frames",
             f"{'stage':52s} {'ms':>8s} {'MB/s':>8s} {'% of hop':>9s}"]
    lines += [f"{r['stage']:52s} {1e3 * r['seconds']:8.2f} {r['mb_s']:8.0f} {100 * r['seconds'] / hop:9.1f}" for r in rows]
    lines.append(f"gap to the bare stream: hop {1e3 * hop:.1f} ms - bare {1e3 * bare:.1f} ms = {1e3 * (hop - bare):.1f} ms; "
                 f"the stages besides gRPC add up to {1e3 * outside:.1f} ms run one after another "
                 f"({1e3 * (outside - (hop - bare)):.1f} ms of them hidden by the overlap)")
    return "\n".join(lines)


def cprofile_hop(cache: KVCache, workers: int, frame_bytes: int) -> str:
    """cProfile of one raw hop: client and sink share this process; worker threads are not profiled."""
    import cProfile
    import io
    import pstats

    from services.bench.relay import one_hop

    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(one_hop(cache, "raw", {}, True, workers, frame_bytes))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()
