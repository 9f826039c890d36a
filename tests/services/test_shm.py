"""services.shm: the same-node carrier on its own (slots, references, release, stale and corrupt frames)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densecomm_core.codec import get_codec
from densecomm_core.codec.base import ChecksumError, DataLossError
from densecomm_core.codec.wire import split_frames
from densecomm_core.hop import HopDecoder, HopEncoder
from services import shm
from tests.codec.test_wire import assert_bit_exact, make_cache

pytestmark = pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory")
ROOT = Path(__file__).resolve().parents[2]


def stream(codec: str = "raw", chunk_tokens: int = 4, **params) -> list[bytes]:
    return list(HopEncoder(get_codec(codec, **params), chunk_tokens=chunk_tokens).frames(make_cache(tokens=11)))


def decode(messages, reader: shm.ShmReader | None = None):
    """Decode a stream of messages (frames or references) the way the servicers do: frame by frame, each
    reported decoded so its slot is released."""
    decoder = HopDecoder()
    for message in messages:
        frames = reader.open(message) if shm.is_reference(message) else list(split_frames(message))
        for frame in frames:
            decoder.feed(frame)
            if reader is not None:
                reader.decoded(frame)
    return decoder.finish()


@pytest.fixture
def pool():
    pool = shm.ShmPool(max_bytes=8 << 20, min_message_bytes=0)
    yield pool
    pool.close()


@pytest.mark.parametrize("codec, params", [("raw", {}), ("lossless", {}), ("quantized", {"key_bits": 4, "value_bits": 4, "group": 4})])
def test_shm_and_bytes_paths_give_bit_identical_caches(pool, codec, params):
    frames = stream(codec, **params)
    reader = shm.ShmReader()
    with pool.lease() as lease:
        refs = [lease.carry(frame) for frame in frames]
        assert all(shm.is_reference(r) for r in refs) and lease.transport == "shm"
        assert_bit_exact(decode(refs, reader), decode(frames))
        assert pool.lent_count == 0 or all(s.released() for s in pool.lent.values())  # every slot released
    reader.close()


def test_released_slots_are_reused_and_a_list_of_buffers_is_one_message(pool):
    frames = stream()
    reader = shm.ShmReader()
    with pool.lease() as lease:
        decode([lease.carry(f) for f in frames], reader)
        total, names = pool.total, set(pool.lent) | {s.name for slots in pool.free.values() for s in slots}
        ref = lease.carry([frames[0], memoryview(frames[1]), bytearray(frames[2])])  # frames back to back
        assert pool.total == total and shm.unpack_reference(ref)[0] in names  # a released slot, no new segment
        assert [bytes(f) for f in reader.open(ref)] == frames[:3]
    reader.close()


def test_small_messages_and_a_full_pool_go_as_bytes(pool):
    frames = stream()
    small = shm.ShmPool(max_bytes=8 << 20, min_message_bytes=1 << 20)
    try:
        with small.lease() as lease:
            assert lease.carry(frames[1]) == frames[1] and lease.transport == "bytes"
    finally:
        small.close()
    tiny = shm.ShmPool(max_bytes=shm.MIN_CAPACITY + shm.DATA_OFFSET, min_message_bytes=0)  # room for one slot
    try:
        with tiny.lease() as lease:
            first, second = lease.carry(frames[1]), lease.carry(frames[2])  # nobody released the first slot
            assert shm.is_reference(first) and second == frames[2] and lease.transport == "shm+bytes"
    finally:
        tiny.close()


def test_a_refused_segment_sends_bytes_for_a_while_not_for_good(pool, monkeypatch):
    """/dev/shm full for a moment (ENOSPC, or no descriptor left): that message goes as bytes, and the pool
    tries again once room is freed or NO_SPACE_RETRY_S passed. It used to stop for good when the failing stream
    left no slot for a reader to release."""
    import errno
    import time

    frames = stream()
    real, failures = shm.Segment, [1]

    def flaky(name, size=0, create=False):
        if create and failures[0]:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(name, size, create)

    monkeypatch.setattr(shm, "Segment", flaky)
    with pool.lease() as lease:
        assert lease.carry(frames[1]) == frames[1] and pool.no_space
    with pool.lease() as lease:  # within the back-off: still bytes, no new try
        assert lease.carry(frames[1]) == frames[1]
    monkeypatch.setattr(pool, "_no_space_until", time.monotonic() - 1)  # the back-off passed
    with pool.lease() as lease:
        assert shm.is_reference(lease.carry(frames[1])) and not pool.no_space


def test_a_stream_holds_a_bounded_number_of_unreleased_slots(pool, monkeypatch):
    """A reader far behind its sender: past MAX_LENT_PER_STREAM unreleased slots the messages go as bytes (each
    mapped slot holds a descriptor on both ends; a stream 600 slots ahead failed at a 1,024-descriptor limit)."""
    monkeypatch.setattr(shm, "MAX_LENT_PER_STREAM", 3)
    frames = stream()
    reader = shm.ShmReader()
    with pool.lease() as lease:
        sent = [lease.carry(frame) for frame in frames[:5]]
        assert [shm.is_reference(m) for m in sent] == [True, True, True, False, False]
        for frame in reader.open(sent[0]):
            reader.decoded(frame)  # the reader releases one slot: the next message may take a slot again
        assert shm.is_reference(lease.carry(frames[5]))
    reader.close()


def test_a_stream_that_ends_unreleased_unlinks_its_slots_and_a_reader_gets_a_stale_reference(pool, monkeypatch):
    monkeypatch.setattr(shm, "RETIRE_GRACE_S", 0.0)
    frames = stream()
    lease = pool.lease()
    refs = [lease.carry(f) for f in frames]
    assert lease.close() == (0, len(frames)) and pool.total == 0
    with pytest.raises(shm.StaleShmReferenceError, match="is gone") as error:
        shm.ShmReader().open(refs[0])
    assert error.value.status == "DATA_LOSS" and shm.unpack_reference(refs[0])[0] in str(error.value)


def test_an_ended_streams_unreleased_slots_stay_readable_for_a_grace(pool, monkeypatch):
    """A caller that goes away ends the stream while its reader may still hold references in its receive buffer:
    the slots stay for RETIRE_GRACE_S, so the reader sees the cancellation rather than a vanished segment (about
    one cancellation in twenty mid-transfer was counted DATA_LOSS at the receiver), then are unlinked."""
    import time

    monkeypatch.setattr(shm, "RETIRE_GRACE_S", 0.2)
    frames = stream()
    lease = pool.lease()
    refs = [lease.carry(f) for f in frames]
    total = pool.total
    assert lease.close() == (0, len(frames)) and pool.total == total  # retiring, not yet unlinked
    reader = shm.ShmReader()
    assert [bytes(f) for f in reader.open(refs[0])] == frames[:1]
    reader.close()
    time.sleep(0.5)  # no further use of the pool: its timer unlinks them
    with pytest.raises(shm.StaleShmReferenceError, match="is gone"):
        shm.ShmReader().open(refs[1])
    assert not pool.retiring and pool.total == 0


def test_a_reused_slot_makes_an_old_reference_stale(pool):
    frames = stream()
    reader = shm.ShmReader()
    with pool.lease() as lease:
        old = lease.carry(frames[1])
        for frame in reader.open(old):
            reader.decoded(frame)  # released
        lease.carry(frames[2])  # the same slot, a new token
        with pytest.raises(shm.StaleShmReferenceError, match="reused"):
            reader.open(old)
    reader.close()


def test_a_corrupt_frame_in_a_slot_is_data_loss(pool):
    frames = stream()
    reader = shm.ShmReader()
    with pool.lease() as lease:
        refs = [lease.carry(f) for f in frames]
        segment = pool.lent[shm.unpack_reference(refs[2])[0]].segment
        segment.mmap[shm.DATA_OFFSET + len(frames[2]) - 1] ^= 0x40  # a payload byte of chunk 1: its checksum catches it
        with pytest.raises(ChecksumError):
            decode(refs, reader)
        segment.mmap[shm.DATA_OFFSET + 24] ^= 0x01  # the chunk's checksum itself: the reference catches it first
        with pytest.raises(shm.ShmReferenceError, match="do not verify"):
            reader.open(refs[2])
    reader.close()


def test_another_streams_reference_is_data_loss_and_leaves_its_slot_alone(pool):
    """A peer replaying stream A's references into stream B was answered from A's cache (OK) and released A's
    slots under A's own reader; each stream's references now verify only with its own key."""
    frames = stream()
    with pool.lease(stream_key=11) as a, pool.lease(stream_key=22):
        refs = [a.carry(f) for f in frames]
        stranger = shm.ShmReader(stream_key=22)
        with pytest.raises(shm.ShmReferenceError, match="belongs to another stream"):
            stranger.open(refs[1])
        stranger.close()
        assert not any(s.released() for s in pool.lent.values())  # nothing of A's was released
        assert_bit_exact(decode(refs, shm.ShmReader(stream_key=11)), decode(frames))  # A's own reader reads them
        name = shm.unpack_reference(refs[1])[0]
        with pytest.raises(shm.ShmReferenceError, match="token 0"):  # 0 marks a released slot
            shm.ShmReader(stream_key=11).open(shm.pack_reference(name, 0, 0, 0))
        probe = pool.offer().probe
        with pytest.raises(shm.ShmReferenceError, match="is not a slot"):  # was "holds at most -48 bytes"
            shm.ShmReader().open(shm.pack_reference(probe, 5, 8, 0))


def test_a_missing_frame_is_data_loss_on_both_paths(pool):
    frames = stream()
    with pool.lease() as lease:
        refs = [lease.carry(f) for f in frames]
        for messages in (frames[:-1], refs[:-1], frames[:2] + frames[3:], refs[:2] + refs[3:]):
            with pytest.raises(DataLossError):
                decode(messages, shm.ShmReader())


@pytest.mark.parametrize("ref, fragment", [
    (b"DCSR", "truncated"),
    (shm.pack_reference("densecomm_1_1_000000000000", 1, 10, 0)[:-1], "prefix says"),
    (shm.pack_reference("../etc/passwd", 1, 10, 0), "not a densecomm slot"),
    (shm.pack_reference("dc1_000000000000", 1, 10, 0), "not a densecomm slot"),  # the names of builds before the sweep
    (b"XXXX" + shm.pack_reference("densecomm_1_1_000000000000", 1, 10, 0)[4:], "bad shared-memory reference"),
])
def test_malformed_references_are_data_loss(ref, fragment):
    with pytest.raises(shm.ShmReferenceError, match=fragment) as error:
        shm.ShmReader().open(ref)
    assert error.value.status == "DATA_LOSS"


def test_the_probe_accepts_this_node_and_refuses_others(pool):
    offer = pool.offer()
    assert shm.accept_offer(offer) == (True, "")
    assert shm.accept_offer(shm.ShmOffer("another-boot/ipc:[1]", offer.probe, offer.nonce))[0] is False
    assert shm.accept_offer(shm.ShmOffer(offer.identity, offer.probe, "00" * 16)) == (False, "probe segment holds another nonce")
    refused, reason = shm.accept_offer(shm.ShmOffer(offer.identity, f"densecomm_{shm.pid_namespace()}_1_0123456789ab", offer.nonce))
    assert not refused and "cannot be opened" in reason
    refused, reason = shm.accept_offer(shm.ShmOffer(offer.identity, "dc1_0123456789ab", offer.nonce))  # a build before the sweep
    assert not refused and "not a densecomm segment" in reason  # its hops stay on bytes


CHILD = """
import sys
from services import shm
from densecomm_core.hop import HopDecoder
offer = shm.ShmOffer(*sys.argv[1:4])
print(shm.accept_offer(offer)[0])
reader, decoder = shm.ShmReader(), HopDecoder()
for ref in sys.argv[4:]:
    for frame in reader.open(bytes.fromhex(ref)):
        decoder.feed(frame)
        reader.decoded(frame)
cache = decoder.finish()
print(sum(int(k.float().abs().sum()) for k in cache.keys))
"""


def test_another_process_on_this_node_reads_the_slots_and_releases_them(pool):
    cache = make_cache(tokens=11)
    frames = list(HopEncoder(get_codec("raw"), chunk_tokens=4).frames(cache))
    offer = pool.offer()
    with pool.lease() as lease:
        refs = [lease.carry(f).hex() for f in frames]
        out = subprocess.run([sys.executable, "-c", CHILD, offer.identity, offer.probe, offer.nonce, *refs], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        accepted, checksum = out.stdout.split()
        assert accepted == "True" and int(checksum) == sum(int(k.float().abs().sum()) for k in cache.keys)
        assert all(s.released() for s in pool.lent.values())  # the child released every slot
        assert lease.close() == (len(frames), 0)


@pytest.mark.parametrize("codec, params", [("raw", {}), ("lossless", {}), ("quantized", {}), ("ecsq", {}),
                                           ("eviction", {"keep": 0.5, "window": 2})])
def test_decoded_tensors_never_alias_the_frame(codec, params):
    """What makes releasing a slot right after decoding safe: no codec's tensors point into the frame."""
    frames = [bytearray(f) for f in stream(codec, **params)]
    decoder = HopDecoder()
    for frame in frames:
        decoder.feed(memoryview(frame))
    before = [t.clone() for t in decoder.stream.keys + decoder.stream.values]
    for frame in frames[1:]:
        frame[32:] = bytes(len(frame) - 32)  # the slot is reused: every payload byte overwritten
    assert all(torch.equal(a, b) for a, b in zip(before, decoder.stream.keys + decoder.stream.values))


LEAKER = """
import sys
from multiprocessing import resource_tracker
from services import shm
segment = shm.Segment(shm._new_name(), 1 << 16, create=True)  # registered with this process's resource tracker
print(segment.name, resource_tracker._resource_tracker._pid, flush=True)
sys.stdin.readline()  # alive until the test kills it
"""


def make_foreign(name: str) -> Path:
    """A shared-memory segment that is not a densecomm slot of this PID namespace (as another program's)."""
    import _posixshmem

    os.close(_posixshmem.shm_open("/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600))
    return Path(shm.SHM_DIR) / name


@pytest.mark.skipif(not Path(shm.SHM_DIR).is_dir() or not shm.pid_namespace(), reason="no /dev/shm or /proc to sweep")
def test_a_pool_sweeps_the_segments_of_processes_killed_with_their_tracker_and_nothing_else(caplog):
    child = subprocess.Popen([sys.executable, "-c", LEAKER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    foreign: list[Path] = []
    leaked = None
    try:
        name, tracker = child.stdout.readline().split()
        leaked = Path(shm.SHM_DIR) / name
        assert leaked.exists() and shm.NAME_PATTERN.fullmatch(name).group(2) == str(child.pid)  # the creator is named
        # same PID, not ours to sweep: another program's name, the old name scheme, another PID namespace
        foreign = [make_foreign(f"othertool_{child.pid}"), make_foreign(f"dc{child.pid}_0123456789ab"),
                   make_foreign(f"densecomm_{shm.pid_namespace() + 1}_{child.pid}_0123456789ab")]
        alive = shm.ShmPool(max_bytes=1 << 20)
        alive.close()
        assert leaked.exists()  # its creator is alive: untouched

        os.kill(int(tracker), signal.SIGKILL)  # killed together with its resource tracker: nobody unlinks the slot
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        assert leaked.exists() and not shm.process_exists(child.pid)
        with caplog.at_level("WARNING", logger="services.shm"):
            pool = shm.ShmPool(max_bytes=1 << 20)
        pool.close()
        assert not leaked.exists()
        assert pool.swept.segments >= 1 and pool.swept.total_bytes >= 1 << 16  # (any other dead process's leaks too)
        assert "swept" in caplog.text and "bytes" in caplog.text
        assert all(path.exists() for path in foreign)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for path in foreign + ([leaked] if leaked is not None else []):
            path.unlink(missing_ok=True)


def test_a_service_process_lifts_its_soft_open_file_limit():
    """Each mapped slot holds a descriptor on both ends; a service starts by lifting the usual 1,024 soft limit
    to the hard one."""
    script = ("import resource; from services.shm import raise_open_file_limit\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
              "before, after = raise_open_file_limit()\n"
              "print(before, after, hard if hard != resource.RLIM_INFINITY else -1)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    before, after, hard = map(int, result.stdout.split())
    assert before <= 256 and (after == hard if hard != -1 else after >= 1 << 20), result.stderr
