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
    cpu_budget(...)                  the CPU time both processes spend on the bare stream and on the hop (the
                                     sink's read from /proc), and what that allows on this machine's cores:
                                     with perfect overlap a hop takes at least its CPU time / cores, so
                                     bare / that is the best ratio the hop's current work can reach here
    render_stages(rows)              the table, with the gap to the bare stream and what the stages add up to
    cprofile_hop(cache, workers)     cProfile's top functions of one raw hop (client and sink in one process)

Stages run one after another here, so their sum is what a hop would cost with no overlap; the hop's wall
time is lower where a stage hides behind gRPC's own work (the other end's process, encode-ahead / decode-behind
threads).
"""

from __future__ import annotations

import asyncio
import math
import os
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
    from services.bench.relay import one_hop

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

    bare_run = bare_runner(messages, address)  # (wall, this process's CPU time: how busy the sending end is)
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


def bare_runner(messages: list, address: str | None):
    """() -> (wall s, this process's CPU s): a bare stream of ``messages``' wire bytes in as many messages
    of their mean size, to the sink at ``address`` (None: one in this process)."""
    from services.bench.relay import timed_bare_stream

    wire = sum(len(m) for m in messages)
    return lambda: asyncio.run(timed_bare_stream(wire, max(1, wire // len(messages)), address))


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc; None where there
    is no /proc (not Linux). Resolution: one clock tick (10 ms), so callers time many runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_budget(run_bare, run_hop, sink_pid: int, raw_bytes: int, min_seconds: float = 0.5) -> dict | None:
    """Per run: wall and CPU seconds (this sending process + the sink process ``sink_pid``) of the bare
    stream and of the hop (``run_bare()``, ``run_hop()`` -> (wall s, this process's CPU s over that wall,
    setup left out)), each repeated until ``min_seconds`` of wall time (the sink's counter ticks at 10 ms);
    None where the sink's CPU cannot be read.

    With ``cores`` cores and perfect overlap a hop cannot finish faster than its CPU time / cores (nor than
    the bare stream), so ``bare_wall / floor`` is the best ratio the hop's present work allows here."""
    measured = {}
    for name, run in (("bare", run_bare), ("hop", run_hop)):
        run()  # warm: the first call pays channel setup
        runs, wall, cpu = 0, 0.0, 0.0
        sink_before = process_cpu_seconds(sink_pid)
        while sink_before is not None and (wall < min_seconds or runs < 3):
            seconds, seconds_cpu = run()
            runs, wall, cpu = runs + 1, wall + seconds, cpu + seconds_cpu
        sink_after = process_cpu_seconds(sink_pid)
        if sink_before is None or sink_after is None:  # no /proc, or the sink is gone
            return None
        measured[name] = {"wall": wall / runs, "sender_cpu": cpu / runs, "sink_cpu": (sink_after - sink_before) / runs}
    cores = usable_cores()
    hop_cpu = measured["hop"]["sender_cpu"] + measured["hop"]["sink_cpu"]
    floor = max(measured["bare"]["wall"], hop_cpu / cores)
    return {**measured, "cores": cores, "hop_cpu": hop_cpu, "floor": floor, "best_ratio": measured["bare"]["wall"] / floor,
            "best_mb_s": raw_bytes / floor / 1e6}


def hop_budget(cache: KVCache, codec_name: str, params: dict, frame_bytes: int, workers: int, address: str,
               sink_pid: int, min_seconds: float = 0.5) -> dict | None:
    """``cpu_budget`` of one hop of ``cache`` through ``codec_name`` to the sink process at ``address``,
    against a bare stream of the same wire bytes in the same number of messages."""
    from services.bench.relay import one_hop

    encoder = HopEncoder(get_codec(codec_name, **params), frame_bytes=frame_bytes)
    messages = list(join_messages([[f] for f in encoder.frames(cache)], frame_bytes))

    def hop() -> tuple[float, float]:
        run = asyncio.run(one_hop(cache, codec_name, params, True, workers, frame_bytes, address=address))
        return run.seconds, run.cpu_seconds

    return cpu_budget(bare_runner(messages, address), hop, sink_pid, cache.nbytes, min_seconds)


def render_budget(budget: dict | None) -> str:
    if budget is None:
        return "CPU budget: not measured (the sink's CPU time is read from /proc, which this system lacks)"
    lines = [f"CPU budget per run, both processes (sending | sink), {budget['cores']} usable cores:",
             f"{'':14s} {'wall ms':>8s} {'sender CPU':>11s} {'sink CPU':>9s} {'both':>8s}"]
    for name in ("bare", "hop"):
        m = budget[name]
        lines.append(f"{name + ' stream' if name == 'bare' else 'the hop':14s} {1e3 * m['wall']:8.2f} {1e3 * m['sender_cpu']:11.2f} "
                     f"{1e3 * m['sink_cpu']:9.2f} {1e3 * (m['sender_cpu'] + m['sink_cpu']):8.2f}")
    lines.append(f"floor with perfect overlap: max(bare {1e3 * budget['bare']['wall']:.2f} ms, hop CPU {1e3 * budget['hop_cpu']:.2f} ms / "
                 f"{budget['cores']} cores) = {1e3 * budget['floor']:.2f} ms: with the hop's present work this machine allows at "
                 f"best {budget['best_ratio']:.2f}x the bare stream, {budget['best_mb_s']:.0f} MB/s of raw KV")
    return "\n".join(lines)


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
