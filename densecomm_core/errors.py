"""The project's exceptions. Each names the offending value and what was expected.

Each class names the gRPC status a service answers it with (``status``, a ``grpc.StatusCode`` name);
``services.errors`` reads it in exactly one place, so the core never imports gRPC.
"""

from __future__ import annotations


class DenseCommError(Exception):
    """Base class of every densecomm error."""

    status = "INTERNAL"


class ModelLoadError(DenseCommError, ValueError):
    """A model directory is missing, is not a causal LM, or lacks a rotary embedding."""


class CacheLayoutError(DenseCommError, ValueError):
    """A KV cache's tensors disagree with each other or with the model that should consume them."""

    status = "INVALID_ARGUMENT"


class GeometryMismatchError(DenseCommError, ValueError):
    """An adapter (or cache) was built for a different sender/receiver geometry than the one given."""

    status = "FAILED_PRECONDITION"


class IncompatiblePairError(DenseCommError, ValueError):
    """Sender and receiver cannot be paired (e.g. they do not share a tokenizer)."""

    status = "FAILED_PRECONDITION"


class CheckpointError(DenseCommError, ValueError):
    """An adapter or training checkpoint is missing, unreadable or incomplete."""
