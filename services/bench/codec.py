"""`densecomm bench codec`: compression ratio and throughput of every codec vs plain zstd -1, and accuracy through the lossy ones.

Caches measured, in one run:
- ``zoo``: the embedded sender's caches of 60 test inputs, one request each, in bf16 (the dtype a
  deployment ships);
- ``qwen3-4b``: a cache with Qwen3-4B's KV geometry (36 layers x 8 KV heads x 128, bf16, 180 tokens,
  ~25 MB) from a real forward pass of a Qwen3 model with that geometry and a small hidden size.
The ``pca`` rows use KV bases calibrated on other inputs of the same model (the zoo's committed
``kv_basis.safetensors``; for the Qwen3-4B stand-in, fitted here on 90 train-split contexts), and
ship keys RoPE-stripped as the services do (stripping is the sender's work, outside the timing). The
stand-in's weights are random, so its KV is close to isotropic: the least favourable case for a
transform codec (a trained model's KV concentrates in few directions; the zoo's does).
Throughput is MB/s of raw KV (best of ``repeats``), encode and decode, with ``workers`` threads; ``µs/req``
is encode + decode time per request (a cache's fixed cost: for the zoo's 48 KB caches it dominates).
``targets`` checks the rows against issue 11's codec goals and ``profile`` splits encode and decode
time into stages (zstd, byte planes, checksums, torch ops, Python) from a cProfile of one thread.
"""

from __future__ import annotations

import cProfile
import functools
import io
import pstats
import time
from dataclasses import dataclass

import torch
import zstandard

from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.codec.bytes import tensor_bytes
from densecomm_core.codec.transform import KVBases
from densecomm_core.hop import HopDecoder, HopEncoder, round_trip
from services.bench import torch_threads
from services.config import ServeConfig

CODECS: list[tuple[str, str, dict]] = [
    ("raw", "raw", {}),
    ("lossless", "lossless", {}),  # the default level (LosslessCodec: speed over the last few % of ratio)
    ("lossless 1", "lossless", {"level": 1}),  # its best ratio at a fast level
    ("int8", "quantized", {"key_bits": 8, "value_bits": 8}),
    ("int4", "quantized", {"key_bits": 4, "value_bits": 4, "group": 64}),
    ("int4k/int3v", "quantized", {"key_bits": 4, "value_bits": 3, "group": 64}),
    ("int3", "quantized", {"key_bits": 3, "value_bits": 3, "group": 64}),
    ("int4k/int2v", "quantized", {"key_bits": 4, "value_bits": 2, "group": 64}),
    ("ecsq 0.3", "ecsq", {"key_step": 0.3, "value_step": 0.3, "group": 64}),
    ("ecsq 0.35", "ecsq", {"key_step": 0.35, "value_step": 0.35, "group": 64}),
    ("ecsq 0.4", "ecsq", {"key_step": 0.4, "value_step": 0.4, "group": 64}),
    ("pca k.15/v.35", "pca", {"key_step": 0.15, "value_step": 0.35}),
    ("pca k.25/v.35", "pca", {"key_step": 0.25, "value_step": 0.35}),
    ("pca k.25/v.35 rot.", "pca", {"key_step": 0.25, "value_step": 0.35, "strip_rope": False}),
    ("pca k.25/v.5", "pca", {"key_step": 0.25, "value_step": 0.5}),
    ("evict50+lossless", "eviction", {"keep": 0.5}),
    ("evict50+obf+int4", "eviction", {"keep": 0.5, "obf_rank": 4, "inner": "quantized", "inner_params": {"key_bits": 4, "value_bits": 4, "group": 64}}),
]


SERVICE_FRAME_BYTES = ServeConfig().frame_bytes  # read once: encode_hop runs inside the timed loops


@dataclass
class CodecRow:
    cache: str
    codec: str
    raw_mb: float
    ratio: float
    encode_mb_s: float
    decode_mb_s: float
    requests: int = 1  # caches (one request each) in the row
    us_per_request: float = 0.0  # encode + decode per request, µs


def qwen3_4b_geometry_model(tokenizer, rope_theta: float = 1_000_000.0):
    """A bf16 Qwen3 model with Qwen3-4B's KV layout (36 layers, 32 query / 8 KV heads x 128), hidden shrunk to 256."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return Qwen3ForCausalLM(config).to(torch.bfloat16)


def qwen3_4b_geometry_cache(tokens: int = 180, seed: int = 0) -> KVCache:
    """A real prefill through a Qwen3 model with Qwen3-4B's KV layout (hidden shrunk to 256)."""
    return qwen3_4b_geometry(tokens, seed)[1]


def qwen3_4b_geometry(tokens: int = 180, seed: int = 0):
    """(the wrapped Qwen3-4B-geometry model, its cache of a ``tokens``-token test-split text)."""
    from densecomm_core.models import wrap_model
    from densecomm_core.relay import sender_prefill
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = wrap_model(qwen3_4b_geometry_model(tokenizer), tokenizer)

    text, examples = "", iter(tasks.make_split("test", 100))
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " " + next(examples).context
    text = " ".join(text.split()[: tokens - 1])  # BOS + tokens-1 words
    return model, sender_prefill(model, [text])


def calibrate_stand_in(model, per_family: int = 30) -> KVBases:
    """The stand-in's KV bases (pca rows; stripped and rotated keys), fitted on train-split contexts,
    not the measured text."""
    from densecomm_core.codec.calibrate import calibrate
    from densecomm_core.zoo import tasks

    texts = [e.context for e in tasks.make_split("train", per_family)]
    return KVBases.of(*(calibrate(model, texts, strip_rope=strip)[0] for strip in (False, True)))


@functools.cache
def load_zoo_bases() -> KVBases:
    """The committed bases (RoPE-stripped keys), plus bases of rotated keys fitted here the same way
    (for the ``rotated`` row)."""
    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.codec.calibrate import calibrate
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.pair import (
        BASIS_CALIBRATION_PER_FAMILY,
        load_zoo_pair,
        zoo_adapter_dir,
        zoo_model_dirs,
    )

    sender, receiver = load_zoo_pair()
    adapter = DenseAdapter.load(zoo_adapter_dir(), sender.geometry, receiver.geometry)
    texts = [e.context for e in tasks.make_split("train", BASIS_CALIBRATION_PER_FAMILY)]
    committed = KVBases.load(zoo_model_dirs()[0], zoo_adapter_dir())
    return KVBases.of(*calibrate(sender, texts, adapter, receiver, strip_rope=False), *committed.by_fingerprint.values())


def zoo_caches(per_family: int = 20):
    """(the zoo sender, one cache per test input: batch 1, no padding, as the services ship them)."""
    from densecomm_core.relay import sender_prefill
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.pair import load_zoo_pair

    sender, _ = load_zoo_pair()
    return sender, [sender_prefill(sender, [e.context]).to(dtype=torch.bfloat16) for e in tasks.make_split("test", per_family)]


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def encode_hop(cache: KVCache, codec, bases: KVBases, workers: int) -> list[bytes]:
    """One hop's frames as the services encode them (their ``frame_bytes``: small caches packed in one chunk)."""
    encoder = HopEncoder(codec, bases, workers=workers, frame_bytes=SERVICE_FRAME_BYTES)
    return list(encoder.frames(cache))


def decode_hop(frames: list[bytes], bases: KVBases, workers: int) -> KVCache:
    decoder = HopDecoder(bases=bases)
    decoder.feed_all(frames, workers)
    return decoder.finish()


def measure(cache_name: str, model, caches: list[KVCache], repeats: int, workers: int, bases: KVBases) -> list[CodecRow]:
    """Every codec over ``caches`` of ``model`` (each one request, one hop's encoder and decoder), then
    zstd -1 over each cache's raw bytes. The ``workers`` chunk threads are the parallelism: torch's ops
    inside each run on one thread (two levels of threads oversubscribe the cores: pca's encode on two
    workers, each matmul on two threads, ran ~10 % slower here)."""
    with torch_threads(1):
        return _measure(cache_name, model, caches, repeats, workers, bases)


def _measure(cache_name: str, model, caches: list[KVCache], repeats: int, workers: int, bases: KVBases) -> list[CodecRow]:
    from densecomm_core.rope import strip_rope

    raw_bytes = sum(c.nbytes for c in caches)
    stripped = [strip_rope(c, model).to(dtype=c.dtype) for c in caches]  # the sender's work, outside the timing
    rows = []
    for label, name, params in CODECS:
        codec = get_codec(name, **params)
        shipped = stripped if codec.strips_rope else caches
        encode_s, streams = best_of(repeats, lambda: [encode_hop(c, codec, bases, workers) for c in shipped])
        decode_s, _ = best_of(repeats, lambda: [decode_hop(frames, bases, workers) for frames in streams])
        wire = sum(len(f) for frames in streams for f in frames)
        rows.append(row(cache_name, label, raw_bytes, wire, encode_s, decode_s, len(caches)))
    raws = [b"".join(tensor_bytes(t) for t in (*c.keys, *c.values)) for c in caches]
    # zstd's own threads only pay on big inputs (it splits into jobs of >= 512 KB); one thread below that.
    compressor = zstandard.ZstdCompressor(level=1, threads=workers if workers > 1 and raw_bytes / len(caches) > (1 << 20) else 0)
    encode_s, packed = best_of(repeats, lambda: [compressor.compress(r) for r in raws])
    decompressor = zstandard.ZstdDecompressor()
    decode_s, _ = best_of(repeats, lambda: [decompressor.decompress(p) for p in packed])
    rows.append(row(cache_name, REFERENCE, raw_bytes, sum(len(p) for p in packed), encode_s, decode_s, len(caches)))
    return rows


REFERENCE = "zstd -1 (reference)"


def row(cache: str, codec: str, raw_bytes: int, wire_bytes: int, encode_s: float, decode_s: float, requests: int) -> CodecRow:
    return CodecRow(cache, codec, raw_bytes / 1e6, raw_bytes / wire_bytes, raw_bytes / encode_s / 1e6, raw_bytes / decode_s / 1e6,
                    requests, (encode_s + decode_s) / requests * 1e6)


@dataclass
class Target:
    """One of issue 11's codec goals, checked against a row of the table measured in the same run."""

    name: str
    value: float
    goal: float
    unit: str
    higher_is_better: bool = True
    compare: str = ""  # the same figure of the reference, for context

    @property
    def ok(self) -> bool:
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal


def targets(rows: list[CodecRow]) -> list[Target]:
    """Issue 11's codec goals, from the rows that are present (a missing row is no target)."""
    by = {(r.cache, r.codec): r for r in rows}
    found = []
    big, zoo = by.get(("qwen3-4b", "lossless")), by.get(("zoo", "lossless"))
    big_ref, zoo_ref = by.get(("qwen3-4b", REFERENCE)), by.get(("zoo", REFERENCE))
    if big is not None:
        found.append(Target("qwen3-4b lossless decode", big.decode_mb_s, 2000, "MB/s",
                            compare=f"zstd -1 {big_ref.decode_mb_s:.0f} MB/s" if big_ref else ""))
        found.append(Target("qwen3-4b lossless encode", big.encode_mb_s, 1200, "MB/s",
                            compare=f"zstd -1 {big_ref.encode_mb_s:.0f} MB/s" if big_ref else ""))
    if zoo is not None:
        found.append(Target("zoo lossless enc+dec per request", zoo.us_per_request / 1e3, 0.5, "ms", higher_is_better=False,
                            compare=f"zstd -1 {zoo_ref.us_per_request / 1e3:.3f} ms" if zoo_ref else ""))
    pca = by.get(("qwen3-4b", "pca k.25/v.35"))
    if pca is not None:
        found.append(Target("qwen3-4b pca k.25/v.35 encode", pca.encode_mb_s, 400, "MB/s"))
    return found


def render_targets(found: list[Target]) -> str:
    lines = []
    for t in found:
        sign = ">=" if t.higher_is_better else "<="
        value = f"{t.value:.3f}" if t.unit == "ms" else f"{t.value:.0f}"
        lines.append(f"{'ok    ' if t.ok else 'MISSED'} {t.name:34s} {value:>8s} {t.unit:4s} (target {sign} {t.goal:g} {t.unit})"
                     + (f"  [{t.compare}]" if t.compare else ""))
    return "\n".join(lines)


def accuracy_through_codecs(per_family: int, hops: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Dense context-unaware and -aware accuracy on the zoo test split, the given cache hops (0: sender ->
    adapter, 1: adapter -> receiver) through the codec."""
    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.relay import ContextMode, DenseRelay
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.pair import load_zoo_pair, relay_accuracy, zoo_adapter_dir

    sender, receiver = load_zoo_pair()
    adapter = DenseAdapter.load(zoo_adapter_dir(), sender.geometry, receiver.geometry)
    bases = load_zoo_bases()
    examples = tasks.make_split("test", per_family)
    results = []
    for label, name, params in CODECS:
        if label not in ("raw",) and get_codec(name, **params).lossless:
            continue
        codec = get_codec(name, **params)
        sizes = {"raw": 0, "wire": 0}

        def count(raw: int, wire: int, sizes=sizes) -> None:
            sizes["raw"] += raw
            sizes["wire"] += wire

        def channel(cache: KVCache, hop: int, codec=codec, count=count) -> KVCache:
            if hop not in hops:
                return cache
            # One bf16 wire payload per request, as the services ship them.
            return round_trip(cache, codec if hop == 0 else codec.for_forwarding(), on_payload=count,
                              model=sender if hop == 0 else receiver, bases=bases)

        relay = DenseRelay(sender, receiver, adapter, channel=channel)
        row = {"codec": label}
        for mode in (ContextMode.UNAWARE, ContextMode.AWARE):
            accuracy, _ = relay_accuracy(relay, examples, mode)
            row[mode.value] = sum(accuracy.values()) / len(accuracy)
            row[f"{mode.value}_by_family"] = accuracy
        row["ratio"] = sizes["raw"] / sizes["wire"]
        results.append(row)
    return results


# Stages of a codec's time, recognised in a cProfile by function name: (stage, substrings of the
# profiler's function label). C functions count where they run; numpy ufuncs, which cProfile does not
# see, count in the Python function that calls them (byte_planes, merge_planes).
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("zstd compress", ("ZstdCompressor' objects",)),
    ("zstd decompress", ("ZstdDecompressor' objects", "ZstdDecompressionReader' objects", "frame_content_size")),
    ("xxh3 checksums", ("xxh3",)),
    ("split byte planes (numpy)", ("byte_planes", "tensor_uint8")),
    ("merge byte planes (numpy)", ("merge_planes", "tensor_from_bytes")),
    ("join frames", ("join' of 'bytes",)),
    ("matmul", ("matmul", "baddbmm", "bmm")),
    ("other torch ops", ("torch", "Tensor")),
    ("header (json, validation)", ("json", "header", "validate", "_require", "_is_int")),
    ("thread pool handoff", ("acquire' of '_thread.lock", "threading.py", "futures")),
]


def stage_times(profiler: cProfile.Profile) -> dict[str, float]:
    """Seconds of self time per stage (``STAGES``; everything else is "python (rest)")."""
    totals: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in pstats.Stats(profiler).stats.items():
        label = f"{filename}:{name}"
        stage = next((stage for stage, keys in STAGES if any(k in label for k in keys)), "python (rest)")
        totals[stage] = totals.get(stage, 0.0) + tottime
    return totals


def profile_codec(caches: list[KVCache], codec, bases: KVBases, repeats: int = 3) -> tuple[dict, dict, float, float]:
    """(encode stages, decode stages, encode s, decode s) per request, one thread: the stages from a
    cProfile of ``repeats`` passes, the seconds without the profiler (best of ``repeats``)."""
    encode_s, streams = best_of(repeats, lambda: [encode_hop(c, codec, bases, 1) for c in caches])
    decode_s, _ = best_of(repeats, lambda: [decode_hop(frames, bases, 1) for frames in streams])
    stages = []
    for work in (lambda: [encode_hop(c, codec, bases, 1) for c in caches], lambda: [decode_hop(f, bases, 1) for f in streams]):
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeats):
            work()
        profiler.disable()
        stages.append({k: v / repeats / len(caches) for k, v in stage_times(profiler).items()})
    return stages[0], stages[1], encode_s / len(caches), decode_s / len(caches)


def render_profile(title: str, profile: tuple[dict, dict, float, float], unit: str = "ms") -> str:
    """A stage table: self time per stage under the profiler, and the wall time without it."""
    encode, decode, encode_s, decode_s = profile
    scale = 1e3 if unit == "ms" else 1e6
    names = [stage for stage, _ in STAGES] + ["python (rest)"]
    lines = [title, f"  {'stage':28s} {'encode ' + unit:>10s} {'decode ' + unit:>10s}"]
    for name in names:
        if encode.get(name, 0) or decode.get(name, 0):
            lines.append(f"  {name:28s} {encode.get(name, 0) * scale:10.2f} {decode.get(name, 0) * scale:10.2f}")
    lines.append(f"  {'total under cProfile':28s} {sum(encode.values()) * scale:10.2f} {sum(decode.values()) * scale:10.2f}")
    lines.append(f"  {'wall, no profiler':28s} {encode_s * scale:10.2f} {decode_s * scale:10.2f}")
    return "\n".join(lines)


def profiles(big: KVCache, big_model, big_bases: KVBases, zoo: list[KVCache], zoo_model, zoo_bases: KVBases) -> str:
    """The ``--profile`` view: lossless and pca on the big cache, lossless on one zoo request, 1 thread."""
    from densecomm_core.rope import strip_rope

    lossless, pca = get_codec("lossless"), get_codec("pca", key_step=0.25, value_step=0.35)
    stripped = strip_rope(big, big_model).to(dtype=big.dtype)
    zoo_stripped = [strip_rope(c, zoo_model).to(dtype=c.dtype) for c in zoo]
    return "\n\n".join([
        render_profile("lossless, qwen3-4b cache, 1 thread, ms per request", profile_codec([big], lossless, KVBases())),
        render_profile("pca k.25/v.35, qwen3-4b cache, 1 thread, ms per request", profile_codec([stripped], pca, big_bases)),
        render_profile(f"lossless, zoo caches ({len(zoo)} requests), 1 thread, µs per request", profile_codec(zoo, lossless, KVBases(), 5), "µs"),
        render_profile(f"pca k.25/v.35, zoo caches ({len(zoo)} requests), 1 thread, µs per request", profile_codec(zoo_stripped, pca, zoo_bases, 5), "µs"),
    ])


def profile_lossless(cache: KVCache, workers: int) -> str:
    """The top functions of one lossless encode + decode of ``cache`` by self time (cProfile)."""
    codec = get_codec("lossless")
    profiler = cProfile.Profile()
    profiler.enable()
    decode_hop(encode_hop(cache, codec, KVBases(), 1), KVBases(), 1)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def render(rows: list[CodecRow]) -> str:
    header = f"{'cache':10s} {'codec':20s} {'raw MB':>8s} {'ratio':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'µs/req':>8s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.cache:10s} {r.codec:20s} {r.raw_mb:8.2f} {r.ratio:7.2f} {r.encode_mb_s:9.0f} {r.decode_mb_s:9.0f} "
                     f"{r.us_per_request:8.0f}")
    return "\n".join(lines)


def render_accuracy(rows: list[dict]) -> str:
    raw = next(r for r in rows if r["codec"] == "raw")
    header = f"{'codec':20s} {'ratio':>6s} {'unaware %':>10s} {'Δ pts':>6s} {'aware %':>8s} {'Δ pts':>6s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['codec']:20s} {r['ratio']:6.2f} {100 * r['unaware']:10.1f} {100 * (r['unaware'] - raw['unaware']):+6.1f} "
                     f"{100 * r['aware']:8.1f} {100 * (r['aware'] - raw['aware']):+6.1f}")
    return "\n".join(lines)
