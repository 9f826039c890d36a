"""The KV stream's framing on gRPC: wire frames travel as the gRPC messages themselves, with no protobuf around them.

Adapter.Transform and Receiver.Generate (``proto/densecomm/v1/kv.proto``) take a client stream whose
messages are each one of

    frames      one or more wire frames (``densecomm_core.codec.wire``) back to back: the message begins
                with a frame magic (b"DCKV" header, b"DCCH" chunk) and every frame carries its own length,
                so ``wire.split_frames`` cuts the message into memoryviews without copying
    KVMessage   a serialized ``densecomm.v1.KVMessage`` (the setup first, the done note last; a client may
                also wrap a frame in one, as the generated stubs do)

A protobuf message never begins with b"D" (0x44 = field 8, wire type 4, which proto3 does not use), so
the first byte tells the two apart. Compared with ``KVMessage{frame: KVFrame{bytes}}`` this saves the
copy into the protobuf on the sending side and the two copies out of it on the receiving side; the
only copies left are gRPC's own (bytes -> its send buffer, its receive buffer -> bytes).

    serialize(message) -> bytes        request serializer: frames pass through, a KVMessage is serialized
    deserialize(data) -> bytes | KVMessage | Unreadable   request deserializer: frames pass through as bytes
    ADAPTER / RECEIVER                 the two services as ``RawKVService``: add_to_server(servicer, server),
                                       stub(channel)
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services import protos

relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()
FRAME_LEAD = b"D"  # the first byte of both frame magics (b"DCKV", b"DCCH"); never the first byte of a protobuf


def serialize(message) -> bytes:
    """A KV stream message on the wire: frames (bytes) as they are, a KVMessage serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


@dataclass(frozen=True)
class Unreadable:
    """A message that is neither frames nor a KVMessage (the bytes went wrong on the way): the servicer
    reports it as DATA_LOSS, in its own context, instead of gRPC failing the call in the deserializer."""

    size: int
    lead: bytes  # its first bytes, for the error message
    reason: str


def deserialize(data: bytes):
    """The bytes of a message that carries frames, the parsed KVMessage (setup, done, or a wrapped frame),
    or ``Unreadable``."""
    if data[:1] == FRAME_LEAD:
        return data
    try:
        message = kv_pb2.KVMessage.FromString(data)
    except Exception as exc:  # protobuf's DecodeError: garbage where a KVMessage was expected
        return Unreadable(len(data), data[:8], f"{type(exc).__name__}: {exc}")
    if message.WhichOneof("message") is None:
        return Unreadable(len(data), data[:8], "no setup, frame or done in it")
    return message


@dataclass(frozen=True)
class RawKVService:
    """One client-streaming KV service of kv.proto with the raw framing on both ends."""

    service: str  # full proto name, e.g. densecomm.v1.Receiver
    method: str  # its one KV stream method

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    def handlers(self, servicer) -> dict[str, grpc.RpcMethodHandler]:
        return {self.method: grpc.stream_stream_rpc_method_handler(
            getattr(servicer, self.method), request_deserializer=deserialize,
            response_serializer=relay_pb2.RelayEvent.SerializeToString)}

    def add_to_server(self, servicer, server) -> None:
        """Like the generated ``add_<Service>Servicer_to_server``, with the raw request framing."""
        handlers = self.handlers(servicer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.service, handlers),))
        server.add_registered_method_handlers(self.service, handlers)

    def stub(self, channel) -> RawStub:
        return RawStub(self, channel)


class RawStub:
    """A client stub whose KV method takes frames (bytes) and KVMessages in one stream."""

    def __init__(self, spec: RawKVService, channel) -> None:
        call = channel.stream_stream(spec.path, request_serializer=serialize,
                                     response_deserializer=relay_pb2.RelayEvent.FromString, _registered_method=True)
        setattr(self, spec.method, call)


ADAPTER = RawKVService(kv_pb2.DESCRIPTOR.services_by_name["Adapter"].full_name, "Transform")
RECEIVER = RawKVService(kv_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name, "Generate")
