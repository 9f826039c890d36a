"""densecomm_core.hop: a cache crosses a hop (encoder -> frames -> decoder) into the consuming model's space."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.codec import get_codec
from densecomm_core.codec import round_trip as codec_round_trip
from densecomm_core.codec.base import DataLossError, MissingChunkError
from densecomm_core.codec.transform import KVBases, KVBasis
from densecomm_core.codec.wire import is_chunk, is_header
from densecomm_core.errors import GeometryMismatchError
from densecomm_core.hop import HopDecoder, HopEncoder, round_trip
from densecomm_core.relay import sender_prefill
from densecomm_core.rope import strip_rope
from densecomm_core.zoo import tasks

TEXTS = [e.context for e in tasks.make_split("test", 1)[:2]]


def test_frames_and_reports_agree(tiny_pair):
    sender, _ = tiny_pair
    cache = sender_prefill(sender, TEXTS[:1])
    encoder = HopEncoder(get_codec("lossless"), chunk_tokens=4)
    frames = list(encoder.frames(cache))
    assert is_header(frames[0]) and all(is_chunk(f) for f in frames[1:]) and not is_chunk(frames[0])
    report = encoder.report
    assert (report.codec, report.raw_bytes, report.chunks) == ("lossless", cache.nbytes, len(frames) - 1)
    assert report.wire_bytes == sum(len(f) for f in frames) and report.encode_s > 0 and report.transport == "bytes"
    decoder = HopDecoder(sender)
    for frame in frames:
        decoder.feed(frame)
    out = decoder.finish()
    assert (decoder.report.wire_bytes, decoder.report.chunks, decoder.report.raw_bytes) == (report.wire_bytes, report.chunks, cache.nbytes)
    for a, b in zip(out.keys + out.values, cache.keys + cache.values):
        assert torch.equal(a, b)


def test_decoder_restores_rope_casts_and_places(tiny_pair):
    """A stripped stream comes out in the consumer's space: rotation re-applied, its dtype, the given device."""
    sender, _ = tiny_pair
    cache = sender_prefill(sender, TEXTS[:1])
    stripped = strip_rope(cache, sender)
    frames = list(HopEncoder(get_codec("raw")).frames(stripped))
    decoder = HopDecoder(sender, dtype=torch.bfloat16, device="cpu")
    decoder.feed_all(frames, workers=2)
    out = decoder.finish()
    assert out.rope_applied and out.dtype == torch.bfloat16 and out.keys[0].device == torch.device("cpu")
    torch.testing.assert_close(out.keys[0].float(), cache.keys[0].float(), atol=2e-2, rtol=2e-2)


def test_a_cache_for_another_model_is_refused(tiny_pair):
    sender, receiver = tiny_pair
    frames = list(HopEncoder(get_codec("raw")).frames(sender_prefill(sender, TEXTS[:1])))
    decoder = HopDecoder(receiver)
    for frame in frames:
        decoder.feed(frame)
    with pytest.raises(GeometryMismatchError, match=receiver.geometry.fingerprint()):
        decoder.finish()


def test_missing_and_corrupt_frames_are_data_loss(tiny_pair):
    sender, _ = tiny_pair
    frames = list(HopEncoder(get_codec("lossless"), chunk_tokens=4).frames(sender_prefill(sender, TEXTS[:1])))
    decoder = HopDecoder(sender)
    for frame in frames[:-1]:
        decoder.feed(frame)
    with pytest.raises(MissingChunkError):
        decoder.finish()
    corrupt = bytearray(frames[1])
    corrupt[-1] ^= 1
    decoder = HopDecoder(sender)
    decoder.feed(frames[0])
    with pytest.raises(DataLossError) as info:
        decoder.feed(bytes(corrupt))
    assert info.value.status == "DATA_LOSS"


def test_round_trip_with_explicit_bases_equals_the_codec_package_entry_point(tiny_pair):
    """``densecomm_core.codec.round_trip`` (phase II's codec-aware batches) is the hop's round trip."""
    sender, _ = tiny_pair
    fitted = KVBasis.fit([strip_rope(sender_prefill(sender, [e.context]), sender) for e in tasks.make_split("train", 3)])
    bases = KVBases.of(fitted)
    cache = sender_prefill(sender, TEXTS)  # two rows, padded: one payload per row
    sizes = []
    out = round_trip(cache, get_codec("pca"), model=sender, bases=bases, on_payload=lambda raw, wire: sizes.append((raw, wire)))
    again = codec_round_trip(cache, get_codec("pca"), model=sender, bases=bases)
    assert out.rope_applied and out.dtype == cache.dtype and len(sizes) == 2 and all(w < r for r, w in sizes)
    for a, b in zip(out.keys, again.keys):
        assert torch.equal(a, b)


@pytest.mark.parametrize("frame_bytes", [96, 700, 1 << 20])
def test_frame_bytes_splits_layers_and_packs_small_frames_into_messages(tiny_pair, frame_bytes):
    from densecomm_core.codec.wire import split_frames
    from densecomm_core.hop import pack_frames

    sender, _ = tiny_pair
    cache = sender_prefill(sender, TEXTS[:1])
    encoder = HopEncoder(get_codec("raw"), frame_bytes=frame_bytes)
    frames = list(encoder.frames(cache))
    per_token = max(2 * k.shape[1] * k.shape[3] * k.element_size() for k in cache.keys)  # K and V of one token, one layer
    assert encoder.header.chunk_tokens == min(cache.num_tokens, max(1, frame_bytes // per_token))  # layers split to fit
    assert all(len(f) <= max(frame_bytes, per_token) + 64 for f in frames[1:])  # + the chunk prefix
    messages = pack_frames(frames, frame_bytes)
    assert [bytes(f) for m in messages for f in split_frames(m)] == frames  # cut apart again, in order
    for message in messages:  # several frames share a message only while it stays within frame_bytes
        assert len(message) <= frame_bytes or len(list(split_frames(message))) == 1
    if frame_bytes >= encoder.report.wire_bytes:
        assert len(messages) == 1  # a small cache crosses in one message
    decoder = HopDecoder(sender)
    for frame in (f for m in messages for f in split_frames(m)):
        decoder.feed(frame)
    out = decoder.finish()
    for a, b in zip(out.keys + out.values, cache.keys + cache.values):
        assert torch.equal(a, b)
    assert [len(m) for m in pack_frames([b"D" * 10, b"D" * 10, b"D" * 30, b"D" * 5], 25)] == [20, 30, 5]
    assert pack_frames([b"D" * 10, b"D" * 10], None) == [b"D" * 10, b"D" * 10]


def test_round_trip_with_service_frame_sizes_packs_and_is_bit_exact(tiny_pair):
    """With a service's frame_bytes a small cache crosses as one packed chunk; the cache is the same."""
    sender, _ = tiny_pair
    cache = sender_prefill(sender, TEXTS)
    payloads = []
    for frame_bytes in (None, 1 << 20):
        out = round_trip(cache, get_codec("lossless"), dtype=cache.dtype, frame_bytes=frame_bytes,
                         on_payload=lambda raw, wire: payloads.append(wire))
        for a, b in zip(out.keys + out.values, cache.keys + cache.values):  # every real token (padding is zeroed)
            assert torch.equal(a.transpose(1, 2)[cache.mask], b.transpose(1, 2)[cache.mask])
    per_layer, packed = payloads[: len(TEXTS)], payloads[len(TEXTS):]
    assert all(p < q for p, q in zip(packed, per_layer))  # one chunk prefix instead of one per layer
