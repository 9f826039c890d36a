"""A small async client for the public Relay API (the `densecomm relay` command and the benchmarks use it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services import protos
from services.security import client_channel, token_metadata

relay_pb2, relay_pb2_grpc, _, _ = protos.load()


@dataclass(frozen=True)
class TLSOptions:
    """How a client reaches a TLS Relay: the CA to trust (empty = system roots), an optional client
    certificate for mTLS, and the name to verify when it differs from the address's host."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    enabled: bool = False  # TLS with the system roots even when no file is given


def build_request(
    text: str, mode: str = "unaware", route: str = "", codec: str = "", codec_params: str = "", max_new_tokens: int = 0,
    temperature: float = 0.0, top_p: float = 0.0, seed: int = 0, receiver_prompt: str = "",
    receiver_codec: str = "", receiver_codec_params: str = "", on_cache_failure: str = "",
):
    modes = {"aware": relay_pb2.CONTEXT_MODE_AWARE, "unaware": relay_pb2.CONTEXT_MODE_UNAWARE}
    if mode not in modes:
        raise ValueError(f"mode must be 'aware' or 'unaware', got {mode!r}")
    request = relay_pb2.RelayRequest(
        text=text, mode=modes[mode], route=route, receiver_prompt=receiver_prompt,
        codec=relay_pb2.CodecSpec(name=codec, params_json=codec_params),
        generation=relay_pb2.GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
    )
    policies = {"": relay_pb2.CACHE_FAILURE_POLICY_UNSPECIFIED, "error": relay_pb2.CACHE_FAILURE_POLICY_ERROR,
                "text": relay_pb2.CACHE_FAILURE_POLICY_TEXT}
    if on_cache_failure not in policies:
        raise ValueError(f"on_cache_failure must be 'error' or 'text', got {on_cache_failure!r}")
    request.on_cache_failure = policies[on_cache_failure]
    if receiver_codec or receiver_codec_params:  # unset = the first hop's codec forwards
        request.receiver_codec.CopyFrom(relay_pb2.CodecSpec(name=receiver_codec, params_json=receiver_codec_params))
    return request


async def relay_stream(stub, request, timeout: float, on_text: Callable[[str], None] | None = None, token: str | None = None):
    """Run one Relay call; returns the final RelayStats (tokens go to ``on_text`` as they arrive).
    ``token`` is sent as ``authorization: Bearer <token>``."""
    stats = None
    async for event in stub.Relay(request, timeout=timeout, metadata=token_metadata(token)):
        if event.HasField("token") and on_text is not None:
            on_text(event.token.text)
        elif event.HasField("stats"):
            stats = event.stats
    if stats is None:
        raise RuntimeError("the Relay stream ended without its final stats event")
    return stats


async def relay_once(address: str, text: str, timeout: float = 60.0, on_text=None, token: str | None = None,
                     tls: TLSOptions | None = None, **fields):
    """One Relay call on a fresh channel: plaintext, or TLS / mTLS with ``tls``; ``token`` for auth."""
    tls = tls or TLSOptions()
    async with client_channel(address, tls.ca_file, tls.cert_file, tls.key_file, tls.server_name, tls=tls.enabled) as channel:
        return await relay_stream(relay_pb2_grpc.RelayStub(channel), build_request(text, **fields), timeout, on_text, token)
