"""The same-node shortcut in the service stack: negotiated per hop, reported in the stats, bit-identical to
bytes, forced off by hop_transport = "bytes", and DATA_LOSS / a clear status for corrupt, missing and stale
shared-memory frames."""

from __future__ import annotations

import grpc
import pytest
import torch

from densecomm_core.codec import iter_encode
from densecomm_core.codec.base import get_codec
from densecomm_core.relay import DenseRelay
from densecomm_core.zoo import tasks
from services import kvstream, servicers, shm, transport
from services.client import build_request
from services.stack import LocalStack
from tests.services.conftest import collect, run, stack_config

pytestmark = pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory")
EXAMPLES = tasks.make_split("test", 2)
SHORTCUT = {"chunk_tokens": 4, "frame_bytes": 4096, "shm_min_bytes": 1}  # every zoo-sized message by reference


@pytest.fixture(scope="module")
def stacks(random_route):
    with LocalStack(stack_config(random_route, **SHORTCUT)) as shm_stack, \
            LocalStack(stack_config(random_route, hop_transport="bytes", **SHORTCUT)) as bytes_stack:
        yield shm_stack, bytes_stack


def relay_capturing_cache(stack, monkeypatch, **request):
    """One Relay; (its stats, the cache the receiver generated from) - the stack runs in this process."""
    caches = []
    generate = servicers.receiver_generate

    def capture(receiver, cache, *args, **kwargs):
        caches.append(cache)
        return generate(receiver, cache, *args, **kwargs)

    monkeypatch.setattr(servicers, "receiver_generate", capture)
    events = run(collect(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=6, **request)))
    return events[-1].stats, caches[0]


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_the_shortcut_and_bytes_give_bit_identical_caches_and_say_which_they_used(stacks, monkeypatch, codec):
    shm_stack, bytes_stack = stacks
    stats, cache = relay_capturing_cache(shm_stack, monkeypatch, codec=codec)
    forced, reference = relay_capturing_cache(bytes_stack, monkeypatch, codec=codec)
    assert [h.transport for h in stats.hops] == ["shm", "shm"] and stats.hops[0].chunks > 8
    assert [h.transport for h in forced.hops] == ["bytes", "bytes"]  # hop_transport = "bytes" forces them
    for a, b in zip(cache.keys + cache.values, reference.keys + reference.values):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert stats.text == forced.text and [h.wire_bytes for h in stats.hops] == [h.wire_bytes for h in forced.hops]
    for host in ("sender", "adapter"):  # every slot went back to its pool once its stream ended
        pool = shm_stack.hosts[host].servicer.pool
        assert pool.lent_count == 0 and pool.total > 0


def transport_counters(stack) -> dict[tuple[str, str], float]:
    """(hop, transport) -> wire bytes, and (hop, "hops " + transport) -> hops, from the series of the service
    that counts each hop (sender->adapter: the sender, adapter->receiver: the receiver)."""
    out = {}
    for service, hop in (("sender", "sender->adapter"), ("receiver", "adapter->receiver")):
        registry = stack.hosts[service].metrics.registry
        for name in ("bytes", "shm", "shm+bytes"):
            labels = {"service": service, "hop": hop, "transport": name}
            out[hop, name] = registry.get_sample_value("densecomm_hop_transport_bytes_total", labels) or 0.0
            out[hop, "hops " + name] = registry.get_sample_value("densecomm_hop_transport_total", labels) or 0.0
    return out


def test_the_transport_series_count_a_relay_over_shm_as_shm_and_one_over_bytes_as_bytes(stacks):
    for stack, expected in zip(stacks, ("shm", "bytes")):
        other = "bytes" if expected == "shm" else "shm"
        before = transport_counters(stack)
        stats = run(collect(stack.relay_address, build_request(EXAMPLES[1].context, max_new_tokens=2, codec="lossless")))[-1].stats
        after = transport_counters(stack)
        delta = {key: after[key] - before[key] for key in after}
        for hop in stats.hops:
            assert hop.transport == expected and hop.wire_bytes > 0
            # every message of these hops is big enough for a slot (shm_min_bytes = 1): all wire bytes on one path
            assert delta[hop.hop, expected] == hop.wire_bytes and delta[hop.hop, other] == 0, (expected, hop.hop, delta)
            assert delta[hop.hop, "hops " + expected] == 1 and delta[hop.hop, "hops " + other] == 0, (expected, hop.hop, delta)


def test_a_receiving_end_set_to_bytes_refuses_the_offer(stacks):
    shm_stack, bytes_stack = stacks
    for stack, expected in ((shm_stack, "shm"), (bytes_stack, "bytes: hop_transport = bytes here")):
        pool = shm.ShmPool(min_message_bytes=1)
        try:
            assert run(verdict(stack.hosts["receiver"].address, pool)) == expected
        finally:
            pool.close()


async def verdict(address, pool) -> str:
    link = transport.HopLink(pool)
    setup = link.setup(servicers.kv_pb2.HopSetup(request_id="t", request=build_request(EXAMPLES[0].context)))

    async def messages():
        yield servicers.kv_pb2.KVMessage(setup=setup)

    async with grpc.aio.insecure_channel(address) as channel:
        call = kvstream.RECEIVER.stub(channel).Generate(messages(), timeout=30)
        answer = dict(await call.initial_metadata())[transport.VERDICT_KEY]
        call.cancel()
    return answer


@pytest.fixture(scope="module")
def receiver_frames(zoo_pair, zoo_adapter):
    relay = DenseRelay(*zoo_pair, zoo_adapter)
    return list(iter_encode(relay.transfer([EXAMPLES[0].context]), get_codec("lossless"), chunk_tokens=4))


async def send_by_reference(address, pool, frames, damage=None) -> tuple[grpc.StatusCode, str]:
    """A client that offers the shortcut to a receiver, then sends ``frames`` by reference (``damage(lease,
    refs)`` may alter them first); the call's status."""
    link = transport.HopLink(pool)
    setup = link.setup(servicers.kv_pb2.HopSetup(request_id="t", request=build_request(EXAMPLES[0].context, max_new_tokens=2)))
    setup.transport = "shm"
    refs: list = []

    async def messages():
        yield servicers.kv_pb2.KVMessage(setup=setup)
        assert await link.negotiate(call) == "shm"
        refs.extend(link.carry(frame) for frame in frames)
        if damage is not None:
            damage(link.lease, refs)
        for ref in refs:
            yield ref

    async with grpc.aio.insecure_channel(address) as channel:
        call = kvstream.RECEIVER.stub(channel).Generate(messages(), timeout=30)
        try:
            [e async for e in call]
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        finally:
            link.close()
    return grpc.StatusCode.OK, ""


def corrupt_payload(lease, refs):
    name, _, length, _ = shm.unpack_reference(refs[3])
    segment = lease.pool.lent[name].segment
    segment.mmap[shm.DATA_OFFSET + length - 1] ^= 0x40


def drop_one(lease, refs):
    del refs[-1]  # the last chunk never arrives


def unlink_one(lease, refs):
    name = shm.unpack_reference(refs[2])[0]
    lease.pool.lent[name].segment.unlink()  # the segment is gone before the receiver maps it


def reuse_one(lease, refs):
    name, token, length, digest = shm.unpack_reference(refs[2])
    refs[2] = shm.pack_reference(name, token + 1, length, digest)  # a token the slot does not hold


@pytest.mark.parametrize("damage, fragment", [(corrupt_payload, "checksum"), (drop_one, "missing"),
                                              (unlink_one, "is gone"), (reuse_one, "reused")])
def test_corrupt_missing_and_stale_shared_memory_frames_are_data_loss(stacks, receiver_frames, damage, fragment):
    address = stacks[0].hosts["receiver"].address
    pool = shm.ShmPool(min_message_bytes=1)
    try:
        code, details = run(send_by_reference(address, pool, receiver_frames, damage))
        assert code == grpc.StatusCode.DATA_LOSS and fragment in details
        assert run(send_by_reference(address, pool, receiver_frames)) == (grpc.StatusCode.OK, "")  # and it still serves
        assert pool.lent_count == 0
    finally:
        pool.close()


def test_a_reference_on_a_hop_that_refused_the_shortcut_is_data_loss(stacks, receiver_frames):
    address = stacks[1].hosts["receiver"].address  # hop_transport = "bytes": it refuses, a reference arrives anyway
    pool = shm.ShmPool(min_message_bytes=1)
    lease = pool.lease()

    async def messages():
        yield servicers.kv_pb2.KVMessage(setup=servicers.kv_pb2.HopSetup(request_id="t", request=build_request(EXAMPLES[0].context)))
        for frame in receiver_frames:
            yield lease.carry(frame)

    async def call():
        async with grpc.aio.insecure_channel(address) as channel:
            return [e async for e in kvstream.RECEIVER.stub(channel).Generate(messages(), timeout=30)]

    try:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            run(call())
        assert error.value.code() == grpc.StatusCode.DATA_LOSS and "did not accept" in error.value.details()
    finally:
        lease.close()
        pool.close()


def test_no_room_for_the_offer_leaves_the_hops_on_bytes(stacks, monkeypatch):
    """/dev/shm full when a sending end makes its offer: the request is served on bytes, not failed."""
    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm.ShmPool, "offer", full)
    shm_stack, _ = stacks
    stats = run(collect(shm_stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=4)))[-1].stats
    assert [h.transport for h in stats.hops] == ["bytes", "bytes"] and stats.text
