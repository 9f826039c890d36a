"""Same-node shortcut for a KV hop: frames cross in POSIX shared memory, the gRPC stream carries references.

    node_identity() -> str                   boot id + IPC namespace: what two processes that can share
                                             /dev/shm have in common (the probe then proves it)
    ShmPool(max_bytes, min_message_bytes)    the sending end's slots, one pool per service process: shared
                                             memory segments reused across requests, bounded in total bytes
      .offer() -> ShmOffer                   identity + probe segment + nonce, carried in the hop setup
      .lease() -> ShmLease                   one stream's use of the pool
    ShmLease.carry(message) -> bytes         one transport message (wire frames back to back, bytes or a list
                                             of buffers) copied into a free slot: its reference; the message
                                             itself when it is small or the pool is full (it goes as bytes)
    ShmLease.close()                         end of the stream: slots the reader released go back to the pool,
                                             slots it never released are unlinked (a reader that still maps one
                                             keeps its pages; nobody can open it again)
    accept_offer(offer) -> (bool, reason)    the receiving end's test: same identity, and the probe segment
                                             reads back the nonce
    ShmReader.open(ref) -> [frame, ...]      map the slot (once per stream), check token, length and the
                                             frames' own checksums against the reference; the frames to decode
    ShmReader.decoded(frame)                 after a frame is decoded: once every frame of its slot is, the
                                             slot is released to its sender
    ShmReader.close()                        end of the stream: unmap everything
    .carried_bytes / .bytes_read             a lease's / a reader's frame bytes that crossed in shared memory
    is_reference(message) -> bool            whether a transport message is a reference (by its magic)
    sweep_dead() -> SweepReport              unlink the segments of densecomm processes that died without
                                             cleaning up (every ShmPool runs it when it starts)

Reference (little-endian)::

    b"DCSR" | u16 version | u16 name length | u64 token | u64 length | u64 digest | name (ASCII)

``digest`` is xxh3_64 over the frames' own checksums in order (a header's trailing u64, a chunk's prefix
u64): the reader compares it before anything is decoded, and the decoder then verifies every frame's
checksum exactly as on the bytes path, so a corrupt frame is DATA_LOSS on both paths. A segment that is
gone or a slot that holds another token is a stale reference (``StaleShmReferenceError``, DATA_LOSS with
the segment's name), never a hang: nothing here waits.

Slot segment: ``u64 token | u64 length | 48 reserved bytes | the message``. The sender writes the message,
then the token; the reader writes token 0 when it has decoded every frame (released): only then does the
sender reuse the slot. Segments are created with ``posix_fallocate`` (a full /dev/shm is an error at
creation, which the sender answers by sending bytes, never SIGBUS on a write) and registered with
multiprocessing's resource tracker, which unlinks them if the sending process dies.

Segment names are ``densecomm_<pid namespace inode>_<pid>_<12 hex>``: the creating process is in the name.
A process SIGKILLed together with its resource tracker (an OOM kill of the whole process group, a killed
container whose /dev/shm outlives it) leaves its segments behind; ``sweep_dead`` finds ours in /dev/shm
by that name, owned by this user, created in this PID namespace by a PID that no longer exists, and unlinks
them. Anything else (another program's segment, one of a live process, one from another PID namespace,
where a PID says nothing about liveness) is never touched. A PID that was reused keeps its dead segments
until the new process exits too: the sweep errs on the side of leaving a segment.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
from dataclasses import dataclass

import xxhash

from densecomm_core.codec.base import DataLossError
from densecomm_core.codec.wire import CHUNK_FIELDS, CHUNK_MAGIC, CHUNK_PREFIX_SIZE, HEADER_MAGIC, split_frames

try:  # POSIX shared memory (Linux, macOS); without it every hop uses bytes
    import _posixshmem
    from multiprocessing import resource_tracker
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

log = logging.getLogger(__name__)

REF_MAGIC = b"DCSR"
REF_VERSION = 1
REF_PREFIX = struct.Struct("<4sHHQQQ")  # magic, version, name length, token, length, digest
SLOT_HEADER = struct.Struct("<QQ")  # token, length
DATA_OFFSET = 64  # the message starts here (cache-line aligned)
MIN_CAPACITY = 1 << 16
NAME_PREFIX = "densecomm_"
# densecomm_<pid namespace>_<pid>_<random>: the only segments a reader opens, the only ones a sweep unlinks
NAME_PATTERN = re.compile(r"densecomm_([0-9]+)_([0-9]+)_[0-9a-f]{12}")
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory segments (a tmpfs)
PROBE_BYTES = 16
# A stream holds at most this many unreleased slots; further messages go as bytes until its reader catches up.
# References are tiny, so without a bound a sender runs hundreds of slots ahead of a slow reader, and each
# mapped slot holds a file descriptor on both ends (a 1,024-descriptor limit failed streams).
MAX_LENT_PER_STREAM = 64
# A stream that ends with slots its reader has not released (a caller that went away, a reader that failed)
# keeps them this long before they are unlinked: a reader may still hold their references in its receive
# buffer, and should see the cancellation, not a reference to a vanished segment (DATA_LOSS).
RETIRE_GRACE_S = 2.0
NO_SPACE_RETRY_S = 1.0  # after /dev/shm refused a segment, messages go as bytes this long before the next try
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page up front: no page faults while copying


class ShmReferenceError(DataLossError):
    """A shared-memory reference that cannot be resolved to the frames it names (DATA_LOSS)."""


class StaleShmReferenceError(ShmReferenceError):
    """The segment a reference names is gone, or its slot was reused or released (DATA_LOSS)."""


@dataclass(frozen=True)
class ShmOffer:
    """What the sending end of a hop puts in the setup so the receiving end can test the shortcut."""

    identity: str  # node_identity() of the sending process
    probe: str  # name of a segment holding ``nonce``
    nonce: str  # hex


def node_identity() -> str:
    """This machine's boot id and this process's IPC namespace: two processes with different identities
    cannot share a POSIX shared-memory segment (equal identities still need the probe)."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()), ("/proc/self/ns/ipc", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("")
    if not any(parts):
        import socket

        parts = [socket.gethostname()]
    return "/".join(parts)


def available() -> bool:
    """Whether this platform has POSIX shared memory."""
    return _posixshmem is not None


class Segment:
    """One POSIX shared-memory segment mapped into this process (created, or attached by name)."""

    def __init__(self, name: str, size: int = 0, create: bool = False) -> None:
        self.name, self.created = name, create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
        try:
            if create:
                os.ftruncate(fd, size)
                if hasattr(os, "posix_fallocate"):  # reserve the pages now: ENOSPC here rather than SIGBUS later
                    os.posix_fallocate(fd, 0, size)
            else:
                size = os.fstat(fd).st_size
            self.mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            if create:
                _posixshmem.shm_unlink("/" + name)
            raise
        finally:
            os.close(fd)
        self.size = size
        if create:  # if this process dies, the tracker unlinks what it still owns
            resource_tracker.register("/" + name, "shared_memory")

    def token(self) -> int:
        return struct.unpack_from("<Q", self.mmap, 0)[0]

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes when that does
            log.debug("shared-memory segment %s still has views; left to the garbage collector", self.name)

    def unlink(self) -> None:
        if self.created:
            try:
                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass
            resource_tracker.unregister("/" + self.name, "shared_memory")
            self.created = False


def frame_digest(frame) -> bytes:
    """The checksum a wire frame carries for itself (8 bytes): a header's trailing u64, a chunk's prefix u64."""
    magic = bytes(frame[:4])
    if magic == CHUNK_MAGIC:
        return bytes(frame[4 + CHUNK_FIELDS.size : CHUNK_PREFIX_SIZE])
    if magic == HEADER_MAGIC:
        return bytes(frame[-8:])
    raise ShmReferenceError(f"a shared-memory slot holds bytes beginning {magic!r}, not wire frames")


def frames_digest(frames, stream_key: int = 0) -> int:
    """xxh3_64, seeded with the stream's key, over the frames' own checksums, in order (what a reference
    carries): a reader of another stream, which holds another key, cannot verify it."""
    digest = xxhash.xxh3_64(seed=stream_key)
    for frame in frames:
        digest.update(frame_digest(frame))
    return digest.intdigest()


def is_reference(message) -> bool:
    return bytes(message[:4]) == REF_MAGIC


def pack_reference(name: str, token: int, length: int, digest: int) -> bytes:
    encoded = name.encode("ascii")
    return REF_PREFIX.pack(REF_MAGIC, REF_VERSION, len(encoded), token, length, digest) + encoded


def unpack_reference(ref) -> tuple[str, int, int, int]:
    """(segment name, token, length, digest) of a reference; ShmReferenceError when it is malformed."""
    ref = bytes(ref)
    if len(ref) < REF_PREFIX.size:
        raise ShmReferenceError(f"shared-memory reference of {len(ref)} bytes is truncated (at least {REF_PREFIX.size} expected)")
    magic, version, size, token, length, digest = REF_PREFIX.unpack_from(ref)
    if magic != REF_MAGIC or version != REF_VERSION:
        raise ShmReferenceError(f"bad shared-memory reference: magic {magic!r} version {version}, expected {REF_MAGIC!r} {REF_VERSION}")
    if len(ref) != REF_PREFIX.size + size:
        raise ShmReferenceError(f"shared-memory reference is {len(ref)} bytes, its prefix says {REF_PREFIX.size + size}")
    name = ref[REF_PREFIX.size :].decode("ascii", errors="replace")
    if not NAME_PATTERN.fullmatch(name):
        raise ShmReferenceError(f"shared-memory reference names segment {name!r}, which is not a densecomm slot")
    return name, token, length, digest


# ---- the sending end ------------------------------------------------------------------------------


class _Slot:
    def __init__(self, segment: Segment, capacity: int) -> None:
        self.segment, self.capacity = segment, capacity
        self.owner: ShmLease | None = None
        self.published = False  # its reference went out: from now on a token of 0 means released

    @property
    def name(self) -> str:
        return self.segment.name

    def released(self) -> bool:
        return self.published and self.segment.token() == 0


def raise_open_file_limit() -> tuple[int, int]:
    """Lift this process's soft limit on open files to its hard limit (the usual 1,024 soft default is far below
    most hard limits): every mapped slot holds a descriptor, on the sending and the reading end, and a service
    process serves many streams at once. Returns the (before, after) soft limits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a platform that caps it lower (macOS): keep what there is
            return soft, soft
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ShmPool:
    """Shared-memory slots of one sending process, reused across streams, at most ``max_bytes`` in all.

    A slot is free (in the pool), lent (holds a message a reader has not released) or retired (unlinked at
    the end of a stream that left it unreleased). Messages under ``min_message_bytes`` travel as bytes:
    a reference saves nothing there.
    """

    def __init__(self, max_bytes: int = 256 << 20, min_message_bytes: int = 64 << 10) -> None:
        if not available():
            raise ShmReferenceError("POSIX shared memory is not available on this platform")
        self.max_bytes, self.min_message_bytes = max_bytes, min_message_bytes
        self.lock = threading.Lock()
        self.free: dict[int, list[_Slot]] = {}
        self.lent: dict[str, _Slot] = {}
        self.total = 0  # bytes of every live segment (free and lent)
        self._token = secrets.randbits(62) | 1
        self._probe: Segment | None = None
        self._nonce = ""
        self._no_space_until = 0.0  # /dev/shm refused a segment: no new one before this (monotonic) time
        self.retiring: list[tuple[float, _Slot]] = []  # (unlink time, slot) of ended streams' unreleased slots
        self.closed = False
        self.swept = sweep_dead()  # segments that crashed processes left behind: this pool may need the room

    @property
    def no_space(self) -> bool:
        """Whether segments are not being created now, after /dev/shm refused one (until a slot of this pool is
        freed or reclaimed, or ``NO_SPACE_RETRY_S`` passed: the room may have come from another process)."""
        return time.monotonic() < self._no_space_until

    # -- the hop setup --
    def offer(self) -> ShmOffer:
        with self.lock:
            if self._probe is None:
                nonce = secrets.token_bytes(PROBE_BYTES)
                self._probe = Segment(_new_name(), PROBE_BYTES, create=True)
                self._probe.mmap[:PROBE_BYTES] = nonce
                self._nonce = nonce.hex()
            return ShmOffer(node_identity(), self._probe.name, self._nonce)

    def lease(self, stream_key: int = 0) -> ShmLease:
        return ShmLease(self, stream_key)

    # -- slots --
    def acquire(self, size: int, owner: ShmLease) -> _Slot | None:
        """A slot of at least ``size`` bytes lent to ``owner``, or None when the pool cannot hold it."""
        capacity = max(MIN_CAPACITY, 1 << (size - 1).bit_length())
        with self.lock:
            if self.closed or owner.closed or capacity + DATA_OFFSET > self.max_bytes:
                return None
            self._reap()
            if self._lent_to(owner) >= MAX_LENT_PER_STREAM:
                self._reclaim()
                if self._lent_to(owner) >= MAX_LENT_PER_STREAM:
                    return None  # its reader is that far behind: bytes until it catches up
            if not self.free.get(capacity):
                self._reclaim()
            slot = self.free[capacity].pop() if self.free.get(capacity) else self._create(capacity)
            if slot is not None:
                slot.owner, slot.published = owner, False
                self.lent[slot.name] = slot
            return slot

    def publish(self, slot: _Slot, token: int, length: int) -> bool:
        """Mark ``slot`` complete (token and length written); False when its stream ended meanwhile (the
        slot is then retired: its reference must not be sent)."""
        with self.lock:
            SLOT_HEADER.pack_into(slot.segment.mmap, 0, token, length)
            if slot.owner is None or slot.owner.closed:
                self.lent.pop(slot.name, None)
                self._retire(slot)
                return False
            slot.published = True
            return True

    def next_token(self) -> int:
        with self.lock:
            self._token = (self._token + 1) & ((1 << 64) - 1) or 1
            return self._token

    def _lent_to(self, owner: ShmLease) -> int:
        """Slots lent to ``owner`` and not yet back (lock held)."""
        return sum(1 for slot in self.lent.values() if slot.owner is owner)

    def _reclaim(self) -> None:
        """Lent slots their readers released go back to the free lists (lock held)."""
        for name in [n for n, s in self.lent.items() if s.released()]:
            slot = self.lent.pop(name)
            slot.owner = None
            self.free.setdefault(slot.capacity, []).append(slot)
            self._no_space_until = 0.0

    def _create(self, capacity: int) -> _Slot | None:
        """A new segment; free slots of other sizes are unlinked to make room under ``max_bytes`` (lock held)."""
        size = capacity + DATA_OFFSET
        for other in sorted(self.free, reverse=True):
            while self.total + size > self.max_bytes and self.free[other]:
                self._retire(self.free[other].pop())
        if self.total + size > self.max_bytes or self.no_space:
            return None
        try:
            segment = Segment(_new_name(), size, create=True)
        except OSError as exc:  # /dev/shm full (ENOSPC), too small, or no descriptor left: messages go as bytes
            log.warning("no shared memory for a %d-byte slot (%s); frames go as bytes until a slot is freed or for "
                        "%.0f s", size, exc, NO_SPACE_RETRY_S)
            self._no_space_until = time.monotonic() + NO_SPACE_RETRY_S
            return None
        self.total += size
        return _Slot(segment, capacity)

    def _retire(self, slot: _Slot) -> None:
        self.total -= slot.capacity + DATA_OFFSET
        slot.segment.unlink()
        slot.segment.close()
        self._no_space_until = 0.0  # room was freed

    def end(self, lease: ShmLease) -> tuple[int, int]:
        """A stream ended: its released slots go back to the pool, the others are retired; (freed, retired).
        A slot still being written is retired by ``publish``."""
        freed = retired = 0
        with self.lock:
            lease.closed = True
            for name in [n for n, s in self.lent.items() if s.owner is lease and s.published]:
                slot = self.lent.pop(name)
                slot.owner = None
                if slot.released() and not self.closed:
                    self.free.setdefault(slot.capacity, []).append(slot)
                    freed += 1
                else:
                    self.retiring.append((time.monotonic() + RETIRE_GRACE_S, slot))
                    retired += 1
            self._reap()
        if retired:  # unlinked after the grace even if this pool is not used again meanwhile
            timer = threading.Timer(RETIRE_GRACE_S + 0.05, self.reap)
            timer.daemon = True
            timer.start()
            log.info("a stream ended with %d shared-memory slot(s) its reader never released: unlinked after %.0f s",
                     retired, RETIRE_GRACE_S)
        return freed, retired

    def reap(self) -> None:
        """Unlink the retiring slots whose grace has passed."""
        with self.lock:
            self._reap()

    def _reap(self) -> None:
        """Unlink the retiring slots whose grace has passed (lock held)."""
        if self.retiring:
            now = time.monotonic()
            for _, slot in [entry for entry in self.retiring if entry[0] <= now]:
                self._retire(slot)
            self.retiring = [entry for entry in self.retiring if entry[0] > now]

    @property
    def lent_count(self) -> int:
        with self.lock:
            return len(self.lent)

    def close(self) -> None:
        """Unlink every segment (a reader that still maps one keeps its pages until it unmaps)."""
        with self.lock:
            self.closed = True
            for slot in [s for slots in self.free.values() for s in slots] + list(self.lent.values()) + [s for _, s in self.retiring]:
                self._retire(slot)
            self.free.clear()
            self.retiring.clear()
            self.lent.clear()
            if self._probe is not None:
                self._probe.unlink()
                self._probe.close()
                self._probe = None


def pid_namespace() -> int:
    """The inode of this process's PID namespace (0 where /proc cannot tell): PIDs are only comparable within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _new_name() -> str:
    return f"{NAME_PREFIX}{pid_namespace()}_{os.getpid()}_{secrets.token_hex(6)}"


def process_exists(pid: int) -> bool:
    """Whether a process with this PID exists in this PID namespace (a zombie or another user's counts)."""
    if pid <= 0:
        return True  # not a PID a segment of ours can name: treat as alive, never sweep on it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists and belongs to someone else
        return True
    return True


@dataclass(frozen=True)
class SweepReport:
    """What one ``sweep_dead`` unlinked."""

    segments: int = 0
    total_bytes: int = 0  # their sizes


def sweep_dead(directory: str = SHM_DIR) -> SweepReport:
    """Unlink densecomm's segments in ``directory`` whose creating process no longer exists.

    Only names matching ``NAME_PATTERN``, regular files owned by this user, created in this PID namespace,
    by a PID with no process now. A directory that cannot be listed (no /dev/shm: macOS, Windows), or a
    process that cannot see its PID namespace, sweeps nothing; a segment that vanishes meanwhile (another
    sweeper, its owner) is skipped."""
    namespace, uid = pid_namespace(), os.getuid()
    try:
        names = os.listdir(directory) if namespace else []
    except OSError:
        return SweepReport()
    segments = swept_bytes = 0
    for name in names:
        match = NAME_PATTERN.fullmatch(name)
        if match is None or int(match.group(1)) != namespace or process_exists(int(match.group(2))):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
                continue
            os.unlink(path)  # shm_unlink on Linux is exactly this
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        segments += 1
        swept_bytes += info.st_size
    if segments:
        log.warning("swept %d shared-memory segment(s) of %d bytes left in %s by densecomm processes that died "
                    "without cleaning up", segments, swept_bytes, directory)
    return SweepReport(segments, swept_bytes)


def join(message) -> bytes | bytearray | memoryview:
    """A message given as a list of buffers as one byte string (a single bytes part is not copied)."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return message
    return message[0] if len(message) == 1 and isinstance(message[0], bytes) else b"".join(message)


def _as_bytes_views(message) -> list[memoryview]:
    parts = message if isinstance(message, (list, tuple)) else [message]
    views = []
    for part in parts:
        view = memoryview(part)
        views.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
    return views


class ShmLease:
    """One stream's slots: ``carry`` each message, ``close`` when the stream ends (also as a context manager)."""

    def __init__(self, pool: ShmPool, stream_key: int = 0) -> None:
        """``stream_key``: the key the stream's setup gave its reader (``frames_digest``)."""
        self.pool, self.stream_key = pool, stream_key
        self.closed = False  # the stream ended (set by the pool under its lock)
        self.carried = 0  # messages that went by reference
        self.carried_bytes = 0  # their frames' bytes (what crossed in shared memory)
        self.spilled = 0  # messages big enough for a slot that went as bytes (pool full)

    def carry(self, message):
        """The reference to a slot now holding ``message`` (frames back to back), or ``message`` itself
        (joined into bytes when given as a list of buffers) when it goes as bytes."""
        views = _as_bytes_views(message)
        size = sum(v.nbytes for v in views)
        slot = self.pool.acquire(size, self) if size >= self.pool.min_message_bytes else None
        if slot is None:
            if size >= self.pool.min_message_bytes:
                self.spilled += 1
            return join(message)
        buffer = slot.segment.mmap
        offset = DATA_OFFSET
        for view in views:  # the only copy on this side: the encoder's buffers -> the slot
            buffer[offset : offset + view.nbytes] = view
            offset += view.nbytes
        digest = frames_digest(split_frames(memoryview(buffer)[DATA_OFFSET : DATA_OFFSET + size]), self.stream_key)
        token = self.pool.next_token()
        if not self.pool.publish(slot, token, size):  # last: the slot is complete
            return join(message)  # the stream ended while we copied: nobody will read either
        self.carried += 1
        self.carried_bytes += size
        return pack_reference(slot.name, token, size, digest)

    @property
    def transport(self) -> str:
        """What this stream's messages used: "shm", "shm+bytes" (some spilled: pool full) or "bytes"."""
        if not self.carried:
            return "bytes"
        return "shm+bytes" if self.spilled else "shm"

    def close(self) -> tuple[int, int]:
        return self.pool.end(self)

    def __enter__(self) -> ShmLease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the receiving end ----------------------------------------------------------------------------

_accepted: dict[tuple[str, str], bool] = {}  # (probe, nonce) -> verdict, so a probe segment is opened once


def accept_offer(offer: ShmOffer) -> tuple[bool, str]:
    """Whether this process can read the offering process's slots: same identity, and the probe segment
    holds the nonce. (verdict, reason when refused)."""
    if not available():
        return False, "no POSIX shared memory here"
    if offer.identity != node_identity():
        return False, "another node or IPC namespace"
    key = (offer.probe, offer.nonce)
    if key in _accepted:
        return _accepted[key], "" if _accepted[key] else "probe failed earlier"
    if not NAME_PATTERN.fullmatch(offer.probe):
        return False, f"probe {offer.probe!r} is not a densecomm segment"
    try:
        probe = Segment(offer.probe)
    except OSError as exc:
        return False, f"probe segment {offer.probe!r} cannot be opened here ({type(exc).__name__})"
    try:
        ok = probe.size >= PROBE_BYTES and bytes(probe.mmap[:PROBE_BYTES]).hex() == offer.nonce
    finally:
        probe.close()
    if len(_accepted) > 1024:
        _accepted.clear()
    _accepted[key] = ok
    return ok, "" if ok else "probe segment holds another nonce"


class ShmReader:
    """The receiving end of one stream: maps the slots its references name, releases them once decoded."""

    def __init__(self, stream_key: int = 0) -> None:
        """``stream_key``: this stream's key from its setup; references of other streams do not verify."""
        self.stream_key = stream_key
        self.segments: dict[str, Segment] = {}
        self.pending: dict[int, list] = {}  # id(mmap) -> [segment, token, frames not yet decoded]
        self.lock = threading.Lock()
        self.bytes_read = 0  # frames' bytes that arrived in shared memory (references resolved)

    def _segment(self, name: str) -> Segment:
        segment = self.segments.get(name)
        if segment is None:
            try:
                segment = Segment(name)
            except FileNotFoundError:
                raise StaleShmReferenceError(f"shared-memory segment {name!r} is gone: its sender released or lost it "
                                             "before this end read it (a stale reference)") from None
            except (OSError, ValueError) as exc:
                raise ShmReferenceError(f"shared-memory segment {name!r} cannot be mapped: {exc}") from exc
            self.segments[name] = segment
        return segment

    def open(self, ref) -> list[memoryview]:
        """The frames a reference names, as views into the slot (decode them, then ``decoded`` each)."""
        name, token, length, digest = unpack_reference(ref)
        if token == 0:
            raise ShmReferenceError(f"shared-memory reference to {name!r} names token 0, which marks a released slot")
        segment = self._segment(name)
        if segment.size <= DATA_OFFSET:
            raise ShmReferenceError(f"shared-memory segment {name!r} of {segment.size} bytes is not a slot")
        if length > segment.size - DATA_OFFSET:
            raise ShmReferenceError(f"shared-memory reference to {name!r} names {length} bytes, the slot holds at most {segment.size - DATA_OFFSET}")
        held, stored = SLOT_HEADER.unpack_from(segment.mmap, 0)
        if held != token:
            raise StaleShmReferenceError(f"shared-memory slot {name!r} holds token {held:#x}, the reference names {token:#x}: "
                                         "it was released or reused before this end read it (a stale reference)")
        if stored != length:
            raise ShmReferenceError(f"shared-memory slot {name!r} holds {stored} bytes, the reference names {length}")
        frames = list(split_frames(memoryview(segment.mmap)[DATA_OFFSET : DATA_OFFSET + length]))
        if frames_digest(frames, self.stream_key) != digest:
            raise ShmReferenceError(f"the frames in shared-memory slot {name!r} do not verify against this stream's reference: "
                                    "the reference belongs to another stream, or the frames are not those it names")
        with self.lock:
            self.pending[id(segment.mmap)] = [segment, token, len(frames)]
            self.bytes_read += length
        return frames

    def decoded(self, frame) -> None:
        """``frame`` is decoded (its tensors own their memory): when it was its slot's last, release the slot.
        Frames that did not come from a slot are ignored."""
        owner = getattr(frame, "obj", None)
        if not isinstance(owner, mmap.mmap):
            return
        with self.lock:
            entry = self.pending.get(id(owner))
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] > 0:
                return
            del self.pending[id(owner)]
        segment, token = entry[0], entry[1]
        if segment.token() == token:
            SLOT_HEADER.pack_into(segment.mmap, 0, 0, 0)  # released: the sender may reuse it

    def close(self) -> None:
        """Unmap every slot of the stream (slots not released stay with their sender, which unlinks them)."""
        with self.lock:
            self.pending.clear()
        for segment in self.segments.values():
            segment.close()
        self.segments.clear()
