"""Bounded work per request: limits checked before any model work starts, and bounded admission per service.

    RouteLimits.for_route(config, name)    the effective limits of one route (route values, else service-wide)
    check_input_bytes(request, limits)     X's UTF-8 size                       -> INVALID_ARGUMENT (Relay, sender)
    check_tokens(...)                      X's tokens; prompt + max_new_tokens
                                           within the receiver's window          -> INVALID_ARGUMENT (sender)
    check_cache_bytes(tokens, per_token)   the KV cache the prefill would make   -> RESOURCE_EXHAUSTED (sender)
    check_window(...)                      the receiver's exact total            -> INVALID_ARGUMENT (receiver)
    Admission                              server interceptor: at most max_in_flight calls held (running or
                                           queued); one more is RESOURCE_EXHAUSTED at once; while draining,
                                           every new call is UNAVAILABLE
Every message names the limit and the value that broke it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc

from densecomm_core.codec.base import DecodeLimits, LimitExceededError
from services.config import ServeConfig
from services.errors import RequestError
from services.security import GUARDED_PREFIX, guard_handler


class InputTooLarge(RequestError):
    """The input, its tokens or the answer it asks for exceed a configured limit (INVALID_ARGUMENT)."""


class CacheTooLarge(LimitExceededError):
    """The KV cache a request would create exceeds max_cache_bytes (RESOURCE_EXHAUSTED)."""


@cache
def context_window(model_dir: str) -> int:
    """``max_position_embeddings`` from a checkpoint's config.json (0 when it does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    config = config.get("text_config", config)
    return int(config.get("max_position_embeddings") or 0)


@dataclass(frozen=True)
class RouteLimits:
    route: str
    max_input_bytes: int
    max_input_tokens: int  # the smaller of the configured cap and both models' windows
    receiver_window: int  # prompt tokens (transferred cache + receiver prompt) + max_new_tokens fit in it
    max_cache_bytes: int

    @classmethod
    def for_route(cls, config: ServeConfig, name: str) -> RouteLimits:
        route = config.route(name)
        if route.context_window:
            windows = [route.context_window]
        else:
            windows = [w for w in (context_window(route.sender), context_window(route.receiver)) if w]
        receiver_window = route.context_window or context_window(route.receiver) or config.max_input_tokens + config.max_new_tokens_limit
        cap = route.max_input_tokens or config.max_input_tokens
        return cls(name, route.max_input_bytes or config.max_input_bytes, min([cap, *windows]), receiver_window,
                   route.max_cache_bytes or config.max_cache_bytes)

    def decode_limits(self) -> DecodeLimits:
        """What a cache arriving for this route may hold, checked at its header before anything is allocated:
        one request's row, at least one token and no more than the route's input tokens (its models' windows),
        the route's cache bytes."""
        return DecodeLimits(max_raw_bytes=self.max_cache_bytes, max_batch=1, min_tokens=1, max_tokens=self.max_input_tokens)


def input_bytes(request) -> int:
    """UTF-8 bytes of what the models will read from the request: X (text or messages) and the receiver's
    own prompt (context-aware), which crosses every hop and is tokenized too."""
    prompt = len(request.receiver_prompt.encode())
    if request.WhichOneof("input") == "messages":
        return prompt + sum(len(m.content.encode()) + len(m.role.encode()) for m in request.messages.messages)
    return prompt + len(request.text.encode())


def check_input_bytes(request, limits: RouteLimits) -> None:
    size = input_bytes(request)
    if size > limits.max_input_bytes:
        what = "input + receiver_prompt" if request.receiver_prompt else "input"
        raise InputTooLarge(f"{what} is {size} bytes; max_input_bytes of route {limits.route!r} is {limits.max_input_bytes}")


def check_tokens(input_tokens: int, prompt_tokens: int, max_new_tokens: int, limits: RouteLimits) -> None:
    """``input_tokens`` of X (the transferred cache's length), ``prompt_tokens`` of the receiver's prompt."""
    if input_tokens > limits.max_input_tokens:
        raise InputTooLarge(f"input is {input_tokens} tokens; max_input_tokens of route {limits.route!r} is "
                            f"{limits.max_input_tokens} (the smaller of the configured cap and the models' context windows)")
    check_window(input_tokens, prompt_tokens, max_new_tokens, limits.receiver_window, limits.route)


def check_window(cache_tokens: int, prompt_tokens: int, max_new_tokens: int, window: int, route: str) -> None:
    total = cache_tokens + prompt_tokens + max_new_tokens
    if window and total > window:
        raise InputTooLarge(f"{cache_tokens} cache + {prompt_tokens} prompt + {max_new_tokens} max_new_tokens = {total} tokens "
                            f"exceed the receiver's context window of {window} on route {route!r}")


def check_cache_bytes(tokens: int, bytes_per_token: int, limits: RouteLimits) -> None:
    size = tokens * bytes_per_token
    if size > limits.max_cache_bytes:
        raise CacheTooLarge(f"the KV cache of {tokens} tokens would be {size} bytes; max_cache_bytes of route "
                            f"{limits.route!r} is {limits.max_cache_bytes}")


class Admission(grpc.aio.ServerInterceptor):
    """At most ``max_in_flight`` of this service's calls at once, refused at once beyond that (no
    unbounded waiting); health and reflection are always answered. ``drain()`` refuses new calls."""

    def __init__(self, service: str, max_in_flight: int, refused=None) -> None:
        self.service, self.max_in_flight, self.refused = service, max_in_flight, refused
        self.in_flight = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    async def check(self, context, request):
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, f"{self.service} is draining (shutting down); retry on another replica"
        if self.in_flight >= self.max_in_flight:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (f"{self.service} already holds max_in_flight={self.max_in_flight} "
                                                        "calls; retry later")
        self.in_flight += 1
        return None

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_PREFIX):
            return handler
        return guard_handler(handler, self.check, self.release, self.refused)

    async def drain(self, grace: float) -> int:
        """Refuse new calls, wait up to ``grace`` s for the admitted ones; returns how many are left."""
        self.draining = True
        self._idle = asyncio.Event()
        if self.in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                pass
        return self.in_flight
