"""How one hop's frames cross: bytes inside the gRPC messages, or the same-node shortcut (``services.shm``).

    HopLink(pool)                           the sending end of one KV stream
      .setup(setup) -> HopSetup             the setup message, with the shared-memory offer when there is a pool
      await .negotiate(call)                the receiving end's verdict, from the call's initial metadata
      .carry(message) -> bytes              a message to send: a slot reference on the shortcut, else the bytes
      .shortcut                             whether the verdict put this stream on the shortcut
      .transport                            what the stream used: "bytes", "shm", or "shm+bytes" (a full pool)
      .shm_bytes                            of its frames' bytes, those that crossed in shared memory
      .close()                              end of the stream: its slots back to the pool (or unlinked)
    await accept(setup, context, config)    the receiving end: test the offer, send the verdict as initial
                                            metadata; a ShmReader when the shortcut is on, else None

The offer travels in the setup (identity, probe segment, nonce, and the stream's key, which seeds its
references' digests so that a reference replayed into another stream does not verify); the verdict comes back as initial metadata
``densecomm-hop-transport: shm | bytes`` before any frame is sent, so frames never go by reference to an
end that cannot map them. Either end set to ``hop_transport = "bytes"`` keeps the hop on bytes; so does a
receiving end that sends no verdict in time (an older build), and one on another node or IPC namespace.
References and frames travel in the same stream in order, so ordering, checksums and DATA_LOSS are those
of the bytes path; a reference the reader cannot resolve is DATA_LOSS naming the segment (``services.shm``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from services import protos, shm
from services.config import ServeConfig

relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()
log = logging.getLogger(__name__)
VERDICT_KEY = "densecomm-hop-transport"
VERDICT_TIMEOUT_S = 5.0  # a receiving end that never answers the offer (an older build) gets bytes after this
# Frames that share one slot on the shortcut (a message there is a reference, so gRPC's best message size
# does not apply): bigger slots mean fewer references and messages per stream, much bigger ones less overlap
# between the two ends; chosen on the bench's shm hop of the 26.5 MB cache (slots of 1, 4 and 16 MiB).
SLOT_MESSAGE_BYTES = 4 << 20


def make_pool(config: ServeConfig) -> shm.ShmPool | None:
    """The shared-memory pool of a sending service, or None when its hops stay on bytes."""
    if config.hop_transport != "auto" or config.shm_pool_bytes <= 0 or not shm.available():
        return None
    return shm.ShmPool(config.shm_pool_bytes, config.shm_min_bytes)


class HopLink:
    """The sending end of one KV stream."""

    def __init__(self, pool: shm.ShmPool | None) -> None:
        self.pool = pool
        self.lease: shm.ShmLease | None = None
        self.offered = False  # the setup offered the shortcut (a verdict will come back)
        self.reason = "" if pool is not None else "hop_transport = bytes here"
        self.stream_key = secrets.randbits(64)  # binds this stream's references to its reader (shm.frames_digest)

    def setup(self, setup) -> object:
        """A copy of ``setup`` that offers the shortcut when this end has a pool."""
        message = kv_pb2.HopSetup()
        message.CopyFrom(setup)
        if self.pool is not None and not message.text_only:
            try:
                offer = self.pool.offer()
            except OSError as exc:  # no room for the probe segment (/dev/shm full): this stream goes as bytes
                self.reason = f"no shared-memory offer ({exc})"
                log.warning("hop stays on bytes: %s", self.reason)
                return message
            message.shm.CopyFrom(kv_pb2.ShmOffer(identity=offer.identity, probe=offer.probe, nonce=offer.nonce,
                                                 stream_key=self.stream_key))
            self.offered = True
        return message

    async def negotiate(self, call, timeout: float = VERDICT_TIMEOUT_S) -> str:
        """Wait for the receiving end's verdict (only when an offer went out); "shm" or "bytes"."""
        if not self.offered:
            return "bytes"
        try:
            metadata = await asyncio.wait_for(call.initial_metadata(), timeout)
        except asyncio.TimeoutError:
            metadata, self.reason = (), f"no transport verdict within {timeout:.0f} s"
        except Exception as exc:  # the call failed: its status surfaces where its events are read
            metadata, self.reason = (), f"{type(exc).__name__}"
        verdict = dict(metadata or ()).get(VERDICT_KEY, "bytes")
        if verdict.startswith("shm"):
            self.lease = self.pool.lease(self.stream_key)
            return "shm"
        self.reason = self.reason or verdict.partition(":")[2].strip() or "refused"
        log.debug("hop stays on bytes: %s", self.reason)
        return "bytes"

    def carry(self, message):
        """What to send for ``message`` (frames back to back, bytes or a list of buffers): its slot reference
        on the shortcut, else the bytes (safe to call from a worker thread)."""
        if self.lease is None:
            return shm.join(message)
        return self.lease.carry(message)

    @property
    def shortcut(self) -> bool:
        """Whether the receiving end accepted the shortcut: frames go to slots (``carry``)."""
        return self.lease is not None

    @property
    def transport(self) -> str:
        return self.lease.transport if self.lease is not None else "bytes"

    @property
    def shm_bytes(self) -> int:
        return self.lease.carried_bytes if self.lease is not None else 0

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()


async def accept(setup, context, config: ServeConfig) -> shm.ShmReader | None:
    """The receiving end of a KV stream: when the setup offers the shortcut, test it and answer the verdict
    (initial metadata, before anything else is sent); a reader when the shortcut is on."""
    if not setup.HasField("shm"):
        return None
    if config.hop_transport != "auto":
        ok, reason = False, "hop_transport = bytes here"
    else:
        ok, reason = shm.accept_offer(shm.ShmOffer(setup.shm.identity, setup.shm.probe, setup.shm.nonce))
    if context is not None:
        await context.send_initial_metadata(((VERDICT_KEY, "shm" if ok else f"bytes: {reason}"),))
    return shm.ShmReader(setup.shm.stream_key) if ok else None
