"""Service fixtures: a random-weight route (never says EOS: long, slow generations on demand) next to the zoo route."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.models import geometry_of
from densecomm_core.zoo.build import RECEIVER_SPEC, SENDER_SPEC, build_model
from densecomm_core.zoo.tokenizer import build_tokenizer
from services.config import load_config, zoo_route


@pytest.fixture(scope="session")
def random_route(tmp_path_factory) -> dict:
    """Untrained models of the zoo geometries and an untrained adapter, saved like real checkpoints."""
    root = tmp_path_factory.mktemp("random-route")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    geometries = []
    for spec in (SENDER_SPEC, RECEIVER_SPEC):
        model = build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        model.config.max_position_embeddings = 8192  # RoPE runs past the zoo's 256: long generations on demand
        model.save_pretrained(root / spec.name)
        tokenizer.save_pretrained(root / spec.name)
        geometries.append(geometry_of(model))
    DenseAdapter(AdapterConfig(*geometries, expansion=2)).save(root / "adapter")
    return {"name": "random", "sender": str(root / SENDER_SPEC.name), "receiver": str(root / RECEIVER_SPEC.name), "adapter": str(root / "adapter")}


def stack_config(random_route: dict, **overrides):
    return load_config(None, relay_port=0, routes=[zoo_route().__dict__, random_route], **overrides)


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(address: str, request, timeout: float = 60.0):
    """All events of one Relay call (raises grpc.aio.AioRpcError on a status)."""
    from services.client import relay_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return [event async for event in relay_pb2_grpc.RelayStub(channel).Relay(request, timeout=timeout)]


def status_of(address: str, request, timeout: float = 60.0) -> grpc.StatusCode:
    try:
        run(collect(address, request, timeout))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
