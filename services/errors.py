"""The one place where exceptions become gRPC status codes.

    RequestError (bad request fields)            INVALID_ARGUMENT
    RouteNotFound                                NOT_FOUND
    GeometryMismatchError, IncompatiblePair      FAILED_PRECONDITION
    ChecksumError, MissingChunk, Truncated, ...  DATA_LOSS
    LimitExceededError                           RESOURCE_EXHAUSTED
    other CodecError, CacheLayoutError           INVALID_ARGUMENT
    a downstream call's own status               passed through (UNAVAILABLE, DEADLINE_EXCEEDED, ...)
    anything else                                INTERNAL
"""

from __future__ import annotations

import grpc

from densecomm_core.codec.base import (
    ChecksumError,
    CodecError,
    DuplicateChunkError,
    LimitExceededError,
    MissingChunkError,
    OutOfOrderChunkError,
    TruncatedError,
)
from densecomm_core.errors import (
    CacheLayoutError,
    DenseCommError,
    GeometryMismatchError,
    IncompatiblePairError,
)


class RequestError(DenseCommError, ValueError):
    """A request field is missing or out of range; the message names the field and what is expected."""


class RouteNotFound(DenseCommError, KeyError):
    """The request names a route the service does not host."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DownstreamError(DenseCommError):
    """A call to the next service failed; carries that call's status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DownstreamError):
        return exc.code, exc.details
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or str(exc.code())
    if isinstance(exc, RouteNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (GeometryMismatchError, IncompatiblePairError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (ChecksumError, MissingChunkError, TruncatedError, DuplicateChunkError, OutOfOrderChunkError)):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, LimitExceededError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (RequestError, CodecError, CacheLayoutError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
