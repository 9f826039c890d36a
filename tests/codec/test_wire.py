"""Wire format: bit-exact round trips, chunk independence, every decoding error on purpose, and a fuzz test."""

from __future__ import annotations

import json
import random
import re
import struct

import pytest
import torch
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from densecomm_core.cache import KVCache
from densecomm_core.codec import (
    DecodeLimits,
    StreamDecoder,
    decode_cache,
    encode_cache,
    get_codec,
    iter_encode,
)
from densecomm_core.codec.base import (
    BadMagicError,
    ChecksumError,
    CodecError,
    DuplicateChunkError,
    LimitExceededError,
    MissingChunkError,
    OutOfOrderChunkError,
    ShapeMismatchError,
    TruncatedError,
    UnknownCodecError,
    UnsupportedVersionError,
)
from densecomm_core.codec.wire import (
    HEADER_PREFIX,
    header_frame,
    parse_header,
    split_frames,
)


def make_cache(layers=3, batch=1, heads=(2, 2), dims=(8, 8), tokens=11, dtype=torch.bfloat16, lengths=None, seed=0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys = [(torch.randn(batch, heads[0], tokens, dims[0], generator=g) * 3).to(dtype) for _ in range(layers)]
    values = [torch.randn(batch, heads[1], tokens, dims[1], generator=g).to(dtype) for _ in range(layers)]
    lengths = torch.tensor(lengths or [tokens] * batch)
    mask = torch.arange(tokens)[None] < lengths[:, None]
    return KVCache(keys, values, mask, (torch.arange(tokens)[None] * mask).long(), True, "test-fp")


def assert_bit_exact(a: KVCache, b: KVCache) -> None:
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.float32 else x, y.view(torch.uint8) if y.dtype != torch.float32 else y)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.positions[a.mask], b.positions[b.mask])
    assert a.rope_applied == b.rope_applied and a.fingerprint == b.fingerprint


@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from(["raw", "lossless"]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    layers=st.integers(1, 4), batch=st.integers(1, 3), heads=st.integers(1, 4),
    dk=st.sampled_from([1, 2, 8, 16]), dv=st.sampled_from([1, 4, 8]), tokens=st.integers(1, 40),
    chunk=st.integers(1, 50), seed=st.integers(0, 1000),
)
def test_lossless_codecs_round_trip_bit_exact(codec, dtype, layers, batch, heads, dk, dv, tokens, chunk, seed):
    lengths = [random.Random(seed + b).randint(0, tokens) for b in range(batch)]
    cache = make_cache(layers, batch, (heads, heads), (dk, dv), tokens, dtype, lengths, seed)
    assert_bit_exact(decode_cache(encode_cache(cache, get_codec(codec), chunk_tokens=chunk)), cache)


def test_special_values_survive_lossless():
    cache = make_cache(dtype=torch.float16)
    cache.keys[0][0, 0, :4, 0] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=torch.float16)
    out = decode_cache(encode_cache(cache, get_codec("lossless")))
    assert torch.equal(out.keys[0].view(torch.int16), cache.keys[0].view(torch.int16))


def test_lossless_beats_raw_on_real_caches(zoo_pair):
    from densecomm_core.relay import sender_prefill
    from densecomm_core.zoo import tasks

    sender, _ = zoo_pair
    cache = sender_prefill(sender, [e.context for e in tasks.make_split("test", 5)]).to(dtype=torch.bfloat16)
    raw, lossless = (len(encode_cache(cache, get_codec(c))) for c in ("raw", "lossless"))
    assert lossless < 0.85 * raw


@pytest.mark.parametrize("level", [19, 3, 2, 1, 0, -1, -16, -64])
def test_every_lossless_level_is_bit_exact(level):
    cache = make_cache(layers=2, heads=(4, 4), dims=(32, 32), tokens=64, seed=level + 100)
    assert_bit_exact(decode_cache(encode_cache(cache, get_codec("lossless", level=level))), cache)


def test_accelerated_levels_still_entropy_code_the_exponent_plane():
    """zstd's own negative levels store literals raw, so a bf16 exponent plane (few distinct bytes, no long
    repeats) would barely shrink; ours force its Huffman stage (an experimental zstd parameter, which a
    library that ignored it would show here as a plane stored almost whole)."""
    from densecomm_core.codec.lossless import byte_planes
    from densecomm_core.codec.zstd import compress

    values = (torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 2).to(torch.bfloat16)
    exponent = byte_planes(values)[1]
    stock = zstandard.ZstdCompressor(level=-16).compress(exponent.tobytes())
    ours = compress(exponent, -16, float_planes=True)
    assert len(ours) < 0.4 * exponent.size < 0.5 * len(stock)  # ~2.6 bits per byte; stock --fast=16 keeps ~all 8
    assert len(compress(exponent, 1, float_planes=True)) <= len(ours) * 1.05  # level 1 is no worse here


def test_chunks_are_independent_and_stream_in_layer_order():
    cache = make_cache(layers=4, tokens=10)
    frames = list(iter_encode(cache, get_codec("lossless"), chunk_tokens=4))
    assert len(frames) == 1 + 4 * 3
    decoder = StreamDecoder()
    decoder.feed(frames[0])
    events = [decoder.feed(f) for f in frames[1:]]
    assert [(e.layer, e.token_start, e.token_count) for e in events[:3]] == [(0, 0, 4), (0, 4, 4), (0, 8, 2)]
    assert [e.layer_complete for e in events[:3]] == [False, False, True]  # layer 0 is usable before layer 1 arrives
    torch.testing.assert_close(events[1].keys, cache.keys[0][:, :, 4:8], rtol=0, atol=0)
    # any chunk decodes on its own, given only the header
    lone = StreamDecoder(strict_order=False)
    lone.feed(frames[0])
    event = lone.feed(frames[7])
    torch.testing.assert_close(event.values, cache.values[event.layer][:, :, event.token_start : event.token_start + event.token_count], rtol=0, atol=0)
    assert_bit_exact(decode_frames_in_order(frames[:1] + frames[1:][::-1]), cache)  # any arrival order


def decode_frames_in_order(frames):
    decoder = StreamDecoder(strict_order=False)
    for f in frames:
        decoder.feed(f)
    return decoder.finish()


def test_out_of_order_missing_and_duplicate_chunks():
    frames = list(iter_encode(make_cache(), get_codec("raw"), chunk_tokens=4))
    decoder = StreamDecoder()
    decoder.feed(frames[0])
    with pytest.raises(OutOfOrderChunkError, match="expected 0"):
        decoder.feed(frames[2])
    decoder = StreamDecoder(strict_order=False)
    decoder.feed(frames[0])
    decoder.feed(frames[2])
    with pytest.raises(DuplicateChunkError, match="arrived twice"):
        decoder.feed(frames[2])
    with pytest.raises(MissingChunkError, match="missing"):
        decoder.finish()
    with pytest.raises(TruncatedError, match="before its header"):
        StreamDecoder().finish()


def resign_header(frame: bytes, mutate) -> bytes:
    size = HEADER_PREFIX.unpack_from(frame)[3]
    data = json.loads(frame[HEADER_PREFIX.size : HEADER_PREFIX.size + size])
    mutate(data)
    from densecomm_core.codec.wire import WireHeader

    return header_frame(WireHeader(**data))


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda d: d.update(codec="zfp"), UnknownCodecError, "unknown codec 'zfp'"),
        (lambda d: d.update(dtype="float64"), CodecError, "dtype"),
        (lambda d: d.update(tokens=d["tokens"] + 1), CodecError, "positions"),
        (lambda d: d.update(num_chunks=99), ShapeMismatchError, "num_chunks"),
        (lambda d: d.update(layers=[[8, 1 << 16, 8, 1 << 16]] * 64, tokens=1 << 19, positions=[[0]], lengths=[0]), LimitExceededError, "exceeds the limit"),
        (lambda d: d.update(batch=10_000), LimitExceededError, "batch"),
        (lambda d: d.update(params={"level": "max"}), CodecError, "level"),
        (lambda d: d.update(layers=[[2, 8, 2, -8]]), CodecError, "positive integers"),
    ],
)
def test_bad_headers_are_rejected(mutate, error, message):
    frames = list(iter_encode(make_cache(), get_codec("lossless")))
    bad = resign_header(frames[0], mutate)
    with pytest.raises(error, match=message):
        decoder = StreamDecoder()
        decoder.feed(bad)


def test_header_errors():
    frame = header_frame(parse_header(next(iter_encode(make_cache(), get_codec("raw"))), DecodeLimits()))
    with pytest.raises(BadMagicError):
        parse_header(b"XXXX" + frame[4:], DecodeLimits())
    with pytest.raises(UnsupportedVersionError, match="version 7"):
        parse_header(frame[:4] + struct.pack("<H", 7) + frame[6:], DecodeLimits())
    with pytest.raises(ChecksumError, match="header checksum"):
        parse_header(frame[:-1] + bytes([frame[-1] ^ 1]), DecodeLimits())
    with pytest.raises(TruncatedError):
        parse_header(frame[:-3], DecodeLimits())
    with pytest.raises(LimitExceededError, match="header of"):
        parse_header(frame, DecodeLimits(max_header_bytes=16))
    with pytest.raises(LimitExceededError, match="decoded cache"):
        parse_header(frame, DecodeLimits(max_raw_bytes=100))


def test_chunk_errors():
    frames = list(iter_encode(make_cache(), get_codec("lossless"), chunk_tokens=4))

    def feed(frame):
        decoder = StreamDecoder()
        decoder.feed(frames[0])
        return decoder.feed(frame)

    chunk = frames[1]
    with pytest.raises(ChecksumError, match="chunk 0 checksum"):
        feed(chunk[:-1] + bytes([chunk[-1] ^ 0xFF]))
    with pytest.raises(ChecksumError):  # sequence fields are covered by the checksum too
        feed(chunk[:4] + struct.pack("<I", 1) + chunk[8:])
    with pytest.raises(TruncatedError):
        feed(chunk[:-5])
    with pytest.raises(TruncatedError):
        feed(chunk[:10])
    with pytest.raises(BadMagicError):
        feed(b"NOPE" + chunk[4:])
    with pytest.raises(TruncatedError, match="stream ends|needs"):
        list(split_frames(b"".join(frames)[:-3]))

    # Checksummed (as a buggy or hostile sender would send them) but not what the header announced:
    def forged(chunk, **changes):
        from densecomm_core.codec.wire import CHUNK_FIELDS, CHUNK_PREFIX_SIZE, DIGEST

        names = ("seq", "layer", "reserved", "start", "count", "size")
        fields = dict(zip(names, CHUNK_FIELDS.unpack_from(chunk, 4))) | changes
        packed = CHUNK_FIELDS.pack(*(fields[n] for n in names))
        digest = xxhash.xxh3_64(packed + chunk[CHUNK_PREFIX_SIZE:]).intdigest()
        return chunk[:4] + packed + DIGEST.pack(digest) + chunk[CHUNK_PREFIX_SIZE:]

    assert feed(forged(chunk)).seq == 0  # the forger itself is sound
    header = json.loads(frames[0][HEADER_PREFIX.size : -8])
    with pytest.raises(ShapeMismatchError, match=rf"sequence number {header['num_chunks']} is beyond the header's {header['num_chunks']} chunks"):
        feed(forged(chunk, seq=header["num_chunks"]))
    with pytest.raises(ShapeMismatchError, match=r"chunk 0 covers \(layer, start, count\) = \(1, 0, 4\), header says \(0, 0, 4\)"):
        feed(forged(chunk, layer=1))


@pytest.mark.parametrize("level", [-65, 20, 1.0, "1", None])
def test_lossless_levels_outside_zstds_range_are_refused(level):
    with pytest.raises(CodecError, match=rf"lossless level must be an integer in \[-64, 19\], got {re.escape(repr(level))}"):
        get_codec("lossless", level=level)


def test_wire_stream_refuses_left_padded_caches():
    cache = make_cache(batch=2, lengths=[11, 5])
    cache.mask = cache.mask.flip(1)
    with pytest.raises(CodecError, match="right-padded"):
        encode_cache(cache, get_codec("raw"))


def test_fuzz_mutations_only_raise_codec_errors(zoo_pair):
    """Thousands of mutated, truncated and spliced real payloads: only CodecError, never anything else."""
    from densecomm_core.codec.transform import load_bases
    from densecomm_core.relay import sender_prefill
    from densecomm_core.rope import strip_rope
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.pair import zoo_root

    sender, _ = zoo_pair
    load_bases(zoo_root() / sender.path.split("/")[-1])
    cache = sender_prefill(sender, [e.context for e in tasks.make_split("test", 1)]).to(dtype=torch.float16)
    streams = [encode_cache(cache, get_codec(name, **params), chunk_tokens=8) for name, params in
               [("raw", {}), ("lossless", {}), ("quantized", {"key_bits": 4, "value_bits": 2}), ("ecsq", {}),
                ("eviction", {"keep": 0.5, "inner": "quantized"})]]
    streams.append(encode_cache(strip_rope(cache, sender).to(dtype=torch.float16), get_codec("pca"), chunk_tokens=8))
    streams += [encode_cache(cache, get_codec(name), layers_per_chunk=2) for name in ("raw", "lossless")]  # packed (v2)
    rng = random.Random(0)
    limits = DecodeLimits(max_raw_bytes=64 << 20)
    outcomes = {"ok": 0, "error": 0}
    for trial in range(2500):
        blob = bytearray(rng.choice(streams))
        action = rng.randrange(4)
        if action == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif action == 1:  # truncate
            blob = blob[: rng.randrange(len(blob))]
        elif action == 2:  # splice two streams
            other = rng.choice(streams)
            cut = rng.randrange(len(blob))
            blob = blob[:cut] + other[rng.randrange(len(other)) :]
        else:  # overwrite a header byte (fields, JSON)
            blob[rng.randrange(min(len(blob), 400))] = rng.randrange(256)
        try:
            decode_cache(bytes(blob), limits)
            outcomes["ok"] += 1
        except CodecError:
            outcomes["error"] += 1
    assert outcomes["error"] > 2000


def test_in_place_decoding_refuses_a_duplicate_before_it_overwrites_a_placed_chunk():
    first, other = make_cache(seed=1), make_cache(seed=2)  # same geometry, different values
    frames = list(iter_encode(first, get_codec("lossless"), chunk_tokens=4))
    impostor = list(iter_encode(other, get_codec("lossless"), chunk_tokens=4))[1]  # seq 0, a valid checksum
    decoder = StreamDecoder(strict_order=False)
    decoder.feed(frames[0])
    decoder.feed(frames[1])
    with pytest.raises(DuplicateChunkError):
        decoder.feed(impostor)
    torch.testing.assert_close(decoder.keys[0][:, :, :4], first.keys[0][:, :, :4], rtol=0, atol=0)


def test_decode_into_matches_decode_for_every_codec_and_strided_outputs():
    cache = make_cache(layers=1, tokens=12, dims=(16, 16))
    for name in ("raw", "lossless", "quantized"):
        codec = get_codec(name)
        keys, values = cache.keys[0][:, :, 2:9], cache.values[0][:, :, 2:9]
        payload = codec.encode(keys, values)
        k, v = codec.decode(payload, tuple(keys.shape), tuple(values.shape), keys.dtype)
        k_out, v_out = torch.zeros_like(cache.keys[0]), torch.zeros_like(cache.values[0])
        codec.decode_into(payload, k_out[:, :, 2:9], v_out[:, :, 2:9])  # strided views of bigger tensors
        assert torch.equal(k_out[:, :, 2:9].view(torch.int16), k.view(torch.int16)) and torch.equal(v_out[:, :, 2:9].view(torch.int16), v.view(torch.int16))
        assert not k_out[:, :, :2].any() and not k_out[:, :, 9:].any()  # nothing outside the slots


def test_small_streams_are_coded_inline_and_big_ones_on_the_pool():
    from densecomm_core.codec.wire import (
        PARALLEL_MIN_CHUNK_BYTES,
        chunk_workers,
        make_header,
    )

    small = make_header(make_cache(layers=4), get_codec("raw"), None)
    assert chunk_workers(small, 2) == 1
    tokens = PARALLEL_MIN_CHUNK_BYTES // (2 * 2 * 8 * 2) + 1  # each layer's K + V just over the threshold
    big = make_header(make_cache(layers=2, tokens=tokens), get_codec("raw"), None)
    assert chunk_workers(big, 2) == 2 and chunk_workers(big, 1) == 1


# ---- version 2: whole layers packed into one chunk -------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "lossless"])
@pytest.mark.parametrize("layers, per_chunk, lengths", [(4, 4, None), (5, 2, None), (3, 2, [11, 6]), (1, 1, None)])
def test_packed_layers_round_trip_bit_exact(codec, layers, per_chunk, lengths):
    cache = make_cache(layers=layers, batch=len(lengths or [0]), dims=(8, 4), lengths=lengths)
    frames = list(iter_encode(cache, get_codec(codec), layers_per_chunk=per_chunk))
    header = parse_header(frames[0], DecodeLimits())
    assert header.layers_per_chunk == per_chunk and header.version == (2 if per_chunk > 1 else 1)
    assert len(frames) - 1 == -(-layers // per_chunk)  # one chunk per group of whole layers
    decoder = StreamDecoder()
    decoder.feed(frames[0])
    complete = []
    for frame in frames[1:]:
        event = decoder.feed(frame)
        assert event.layer_complete
        complete.append([layer for layer, pending in enumerate(decoder.pending_per_layer) if pending == 0])
    assert complete[0] == list(range(min(per_chunk, layers)))  # a group's layers are usable together, in order
    assert_bit_exact(decoder.finish(), cache)


def test_one_layer_per_chunk_headers_stay_version_1_byte_for_byte():
    frame = next(iter_encode(make_cache(), get_codec("raw")))
    assert HEADER_PREFIX.unpack_from(frame)[1] == 1 and b"layers_per_chunk" not in frame


def test_the_hop_encoder_packs_small_caches_and_emits_groups_as_their_layers_arrive():
    from densecomm_core.hop import HopEncoder

    cache = make_cache(layers=5, tokens=11)  # 704 raw bytes per layer
    frames = list(HopEncoder(get_codec("lossless"), frame_bytes=1500).frames(cache))
    assert parse_header(frames[0], DecodeLimits()).layers_per_chunk == 2 and len(frames) == 1 + 3
    split = list(HopEncoder(get_codec("lossless"), frame_bytes=600).frames(cache))  # a layer alone exceeds it
    assert parse_header(split[0], DecodeLimits()).layers_per_chunk == 1 and len(split) == 1 + 5 * 2  # token ranges
    assert parse_header(next(HopEncoder(get_codec("quantized"), frame_bytes=1 << 20).frames(cache)), DecodeLimits()).layers_per_chunk == 1
    # a producer that emits layer by layer (the adapter) gets the same frames, a group once its last layer is in
    layered = HopEncoder(get_codec("lossless"), frame_bytes=1500)
    out = [layered.begin(cache.dtype, [[2, 8, 2, 8]] * 5, cache.lengths.tolist(), cache.positions.tolist(), True, "test-fp")]
    emitted = []
    for layer in range(5):
        emitted.append(layered.layer(layer, cache.keys[layer], cache.values[layer]))
    assert [len(e) for e in emitted] == [0, 1, 0, 1, 1]
    out += [f for e in emitted for f in e]
    assert out == frames and layered.report.raw_bytes == cache.nbytes and layered.report.chunks == 3
    with pytest.raises(CodecError, match="out of order"):
        skipped = HopEncoder(get_codec("lossless"), frame_bytes=1500)
        skipped.begin(cache.dtype, [[2, 8, 2, 8]] * 5, cache.lengths.tolist(), cache.positions.tolist(), True, "test-fp")
        skipped.layer(1, cache.keys[1], cache.values[1])


@pytest.mark.parametrize(
    "mutate, version, error, message",
    [
        (lambda d: None, 1, UnsupportedVersionError, "version 1 header with layers_per_chunk 2"),
        (lambda d: d.update(layers_per_chunk=1, num_chunks=4), 2, UnsupportedVersionError, "version 2 header with layers_per_chunk 1"),
        (lambda d: d.update(layers_per_chunk=5), 2, CodecError, "layers_per_chunk 5 must be an integer in \\[1, 4\\]"),
        (lambda d: d.update(num_chunks=4), 2, ShapeMismatchError, "num_chunks"),
        (lambda d: d.update(chunk_tokens=4), 2, ShapeMismatchError, "must cover its 11 tokens"),
        (lambda d: d.update(codec="quantized", params={}), 2, CodecError, "cannot decode packed layers"),
    ],
)
def test_bad_packed_headers_are_rejected(mutate, version, error, message):
    frame = next(iter_encode(make_cache(layers=4), get_codec("lossless"), layers_per_chunk=2))
    data = json.loads(frame[HEADER_PREFIX.size : HEADER_PREFIX.size + HEADER_PREFIX.unpack_from(frame)[3]])
    mutate(data)
    body = json.dumps(data).encode()
    import xxhash

    bad = HEADER_PREFIX.pack(b"DCKV", version, 0, len(body)) + body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    with pytest.raises(error, match=message):
        StreamDecoder().feed(bad)


def test_packed_chunk_errors_are_data_loss():
    frames = list(iter_encode(make_cache(layers=4), get_codec("lossless"), layers_per_chunk=2))

    def decoder():
        d = StreamDecoder()
        d.feed(frames[0])
        return d

    with pytest.raises(ChecksumError, match="chunk 1 checksum"):
        decoder().feed(frames[2][:-1] + bytes([frames[2][-1] ^ 1]))
    with pytest.raises(OutOfOrderChunkError):
        decoder().feed(frames[2])
    d = decoder()
    d.feed(frames[1])
    with pytest.raises(DuplicateChunkError):
        d.feed(frames[1])
    d = decoder()
    d.feed(frames[1])
    with pytest.raises(MissingChunkError, match="1 of 2 chunks missing"):
        d.finish()
    with pytest.raises(CodecError, match="does not pack"):
        list(iter_encode(make_cache(), get_codec("quantized"), layers_per_chunk=2))


def test_parallel_encoding_keeps_order_bounds_what_runs_ahead_and_matches_one_thread():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from densecomm_core.codec.wire import PARALLEL_MIN_CHUNK_BYTES, bounded_map

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        return i * i

    with ThreadPoolExecutor(2) as pool:
        out = bounded_map(pool, work, range(100), window=4)
        assert [next(out) for _ in range(3)] == [0, 1, 4]
        assert len(started) <= 3 + 4  # taken + in flight, not all 100 as Executor.map would submit
        out.close()
    assert len(started) <= 3 + 4
    tokens = PARALLEL_MIN_CHUNK_BYTES // (2 * 2 * 8 * 2) + 1  # chunks big enough for the pool
    cache = make_cache(layers=3, tokens=tokens)
    for codec in ("raw", "lossless"):
        assert list(iter_encode(cache, get_codec(codec), workers=2)) == list(iter_encode(cache, get_codec(codec), workers=1))
