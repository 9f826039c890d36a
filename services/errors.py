"""The one place where exceptions become gRPC status codes: each project exception names its status.

    RequestError (bad request fields)                INVALID_ARGUMENT
    RouteNotFound                                    NOT_FOUND
    GeometryMismatchError, IncompatiblePairError     FAILED_PRECONDITION
    DataLossError (checksum, missing chunk, ...)     DATA_LOSS
    LimitExceededError                               RESOURCE_EXHAUSTED
    other CodecError, CacheLayoutError               INVALID_ARGUMENT
    a downstream call's own status                   passed through (UNAVAILABLE, DEADLINE_EXCEEDED, ...)
    anything else (an unexpected ValueError too)     INTERNAL
"""

from __future__ import annotations

import grpc

from densecomm_core.errors import DenseCommError


class RequestError(DenseCommError, ValueError):
    """A request field is missing or out of range; the message names the field and what is expected."""

    status = "INVALID_ARGUMENT"


class RouteNotFound(DenseCommError, KeyError):
    """The request names a route the service does not host."""

    status = "NOT_FOUND"

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
    if isinstance(exc, DenseCommError):
        return getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL), str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
