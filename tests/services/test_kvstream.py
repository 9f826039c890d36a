"""services.kvstream's raw framing and the servicers' frame pair (send_frame / read_frames), without a stack."""

from __future__ import annotations

import asyncio

import pytest
import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.codec.base import DataLossError
from densecomm_core.hop import HopDecoder, HopEncoder, pack_frames
from services import kvstream
from services.errors import RequestError
from services.servicers import ahead, kv_pb2, read_frames, send_frame


def tiny_cache(layers: int = 3, tokens: int = 16) -> KVCache:
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    return KVCache(keys, values, torch.ones(1, tokens, dtype=torch.bool), torch.arange(tokens)[None], True, "tiny")


async def collect(messages: list, transport: str = "bytes") -> tuple[list, list]:
    async def stream():
        for message in messages:  # as gRPC hands them to the servicer: through the request deserializer
            yield kvstream.deserialize(kvstream.serialize(message))

    done: list = []
    frames = [bytes(f) async for f in read_frames(stream(), done.append, transport)]
    return frames, done


def test_frames_travel_as_the_messages_and_protobuf_wrapped_frames_still_read():
    cache = tiny_cache()
    frames = list(HopEncoder(get_codec("lossless"), frame_bytes=300).frames(cache))  # layers split into 4-token chunks
    messages = [send_frame(m) for m in pack_frames(frames, 2000)]
    assert len(messages) < len(frames)  # some messages carry several frames
    assert all(kvstream.serialize(m) is m for m in messages)  # no copy, no protobuf around a frame
    wrapped = [kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=f)) for f in HopEncoder(get_codec("lossless")).frames(cache)]
    done = kv_pb2.KVMessage(done=kv_pb2.StreamDone(prefill_tokens=7))
    for stream in (messages, wrapped):
        frames, notes = asyncio.run(collect([*stream, done]))
        assert [n.prefill_tokens for n in notes] == [7]
        decoder = HopDecoder()
        for frame in frames:
            decoder.feed(frame)
        out = decoder.finish()
        assert all(torch.equal(a, b) for a, b in zip(out.keys + out.values, cache.keys + cache.values))


def test_a_message_that_is_neither_frames_nor_a_kvmessage_is_data_loss():
    garbage = b"\x00\xff" * 40  # e.g. a frame whose first byte was flipped
    assert isinstance(kvstream.deserialize(garbage), kvstream.Unreadable)
    assert isinstance(kvstream.deserialize(b"\x12\x03abc"), kvstream.Unreadable)  # a KVFrame that does not parse
    with pytest.raises(DataLossError, match="neither wire frames nor a KVMessage"):
        asyncio.run(collect([garbage]))
    with pytest.raises(RequestError, match="unexpected setup"):
        asyncio.run(collect([kv_pb2.KVMessage(setup=kv_pb2.HopSetup(request_id="again"))]))
    with pytest.raises(RequestError, match="frame transport 'carrier-pigeon'"):
        asyncio.run(collect([], "carrier-pigeon"))


def test_ahead_joins_only_frames_that_are_ready():
    """A slow consumer (sending is the bottleneck) gets ready frames joined up to frame_bytes; a slow producer's
    frames each leave as soon as they are computed, never held back for a later one."""
    import time

    frames = [bytes([0x44]) * n for n in (10, 20, 30, 40, 50, 5)]

    async def consume(iterator, consumer_delay: float) -> list[bytes]:
        out = []
        async for message in ahead(iterator, depth=8, frame_bytes=64):
            out.append(message)
            await asyncio.sleep(consumer_delay)
        return out

    def slow(items):
        for item in items:
            time.sleep(0.02)
            yield item

    behind = asyncio.run(consume(iter(frames), 0.05))
    assert b"".join(behind) == b"".join(frames) and len(behind) < len(frames)
    assert all(len(m) <= 64 or m in frames for m in behind)
    assert asyncio.run(consume(slow(frames), 0.0)) == frames


@pytest.mark.parametrize("codec", ["raw", "lossless"])
@pytest.mark.parametrize("frame_bytes", [200, 4096])
def test_encoded_messages_carry_the_encoders_frames_whatever_thread_encodes_them(codec, frame_bytes):
    """A copy_only codec (raw) is encoded on the stream's own thread, others ahead in a worker thread: either
    way the messages are the encoder's frames in order, ready ones joined up to frame_bytes."""
    from services.servicers import encoded_messages
    from services.transport import HopLink

    cache = tiny_cache()
    assert get_codec("raw").copy_only and not get_codec("lossless").copy_only
    expected = list(HopEncoder(get_codec(codec), frame_bytes=frame_bytes).frames(cache))

    async def messages() -> list:
        encoder = HopEncoder(get_codec(codec), frame_bytes=frame_bytes)
        header = encoder.start(cache)
        return [send_frame(m) async for m in encoded_messages(encoder, header, HopLink(None), frame_bytes)]

    sent = asyncio.run(messages())
    started = HopEncoder(get_codec(codec), frame_bytes=frame_bytes)
    assert not started.copy_only  # nothing to encode before start
    started.start(cache)
    assert started.copy_only == (codec == "raw")  # a CPU cache through raw: copies of host memory only
    frames, _ = asyncio.run(collect(sent))
    assert frames == expected
    assert all(len(m) <= frame_bytes or bytes(m) in expected for m in sent)  # only a frame bigger than a message stands alone
    if codec == "raw" and frame_bytes == 4096:  # header and the one packed chunk share the message
        assert len(sent) == 1


def test_shortcut_groups_stay_within_the_message_limit_when_a_slot_is_refused():
    """On the shortcut a copy_only stream groups frames per slot; a group that finds no free slot leaves as
    bytes, so no group may exceed the channel's message limit (the services' max_message_bytes)."""
    from services import transport
    from services.servicers import encoded_messages

    class SpillingLink:  # an accepted shortcut whose pool never has a free slot: every group leaves as bytes
        shortcut = True

        def carry(self, message):
            return b"".join(bytes(memoryview(p).cast("B")) for p in message)

    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(1, 2, 2048, 64, generator=g).to(torch.bfloat16) for _ in range(4)]  # 512 KiB per layer
    cache = KVCache(kv[:2], kv[2:], torch.ones(1, 2048, dtype=torch.bool), torch.arange(2048)[None], True, "big")
    limit = 600 << 10
    assert limit < transport.SLOT_MESSAGE_BYTES

    async def messages(max_message_bytes) -> list:
        encoder = HopEncoder(get_codec("raw"), frame_bytes=256 << 10)
        header = encoder.start(cache)
        return [m async for m in encoded_messages(encoder, header, SpillingLink(), 256 << 10, max_message_bytes)]

    capped = asyncio.run(messages(limit))
    assert all(len(m) <= limit for m in capped) and len(capped) > 1
    frames, _ = asyncio.run(collect(capped))
    assert b"".join(frames) == b"".join(HopEncoder(get_codec("raw"), frame_bytes=256 << 10).frames(cache))
    assert max(len(m) for m in asyncio.run(messages(None))) > limit  # uncapped, groups grow to the slot size


def test_overlapped_decode_feeds_inline_while_asked_and_keeps_the_order():
    """Frames go to a worker thread until ``inline()`` says the stream is copy_only; the switch waits for the
    frame still decoding in the thread, so every frame is fed once, in order."""
    import threading
    import time

    from services.servicers import OverlappedDecode

    fed: list[tuple[int, bool]] = []
    loop_thread = threading.get_ident()

    def feed(frame: int):
        if frame == 0:
            time.sleep(0.05)  # the header decodes slowly in its thread: frame 1 must wait for it
        fed.append((frame, threading.get_ident() == loop_thread))
        return frame

    async def run() -> None:
        decoding = OverlappedDecode(feed, inline=lambda: len(fed) > 0)
        for frame in range(4):
            await decoding.submit(frame)
        await decoding.drain()

    asyncio.run(run())
    assert fed == [(0, False), (1, True), (2, True), (3, True)]
