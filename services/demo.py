"""The demo's dense rows through the real service stack: every test input is one Relay call over gRPC."""

from __future__ import annotations

import asyncio

import grpc

from densecomm_core.evaluation.accuracy import accuracy_by_family
from densecomm_core.zoo import tasks
from densecomm_core.zoo.pair import TableRow
from services.client import build_request, relay_pb2_grpc, relay_stream


async def relay_all(address: str, contexts: list[str], mode: str, concurrency: int = 8, max_new_tokens: int = 24, timeout: float = 120.0):
    """Relay every context (bounded concurrency); returns the final stats of each, in order."""
    semaphore = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)

        async def one(context: str):
            async with semaphore:
                return await relay_stream(stub, build_request(context, mode=mode, max_new_tokens=max_new_tokens), timeout)

        return await asyncio.gather(*(one(c) for c in contexts))


def service_rows(address: str, examples: list[tasks.Example], concurrency: int = 8) -> list[TableRow]:
    rows = []
    contexts = [e.context for e in examples]
    for mode in ("aware", "unaware"):
        stats = asyncio.run(relay_all(address, contexts, mode, concurrency))
        n = len(stats)
        texts = [s.text for s in stats]
        rows.append(TableRow(
            f"dense context-{mode}", accuracy_by_family(examples, texts),
            payload_bytes_per_request=sum(s.hops[-1].raw_bytes for s in stats) / n,
            flops_per_request=sum(s.sender_flops + s.adapter_flops + s.receiver_flops for s in stats) / n,
            texts=texts, wire_bytes_per_request=sum(s.hops[-1].wire_bytes for s in stats) / n,  # same hop as the raw column
        ))
    return rows
