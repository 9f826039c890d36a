"""Cancellation frees every hop in time; on_cache_failure = text; graceful drain in the right order."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

from densecomm_core.generation import GenerationConfig, GenerationStopped, generate, prefill
from densecomm_core.relay import sender_prefill
from densecomm_core.zoo import tasks
from services.client import build_request, relay_pb2_grpc
from services.stack import LocalStack
from tests.services.conftest import collect, run, stack_config, status_of

TEXT = tasks.make_split("test", 1)[0].context


def test_chunked_prefill_equals_one_piece_and_stops_between_pieces(zoo_pair):
    sender, _ = zoo_pair
    texts = [TEXT, TEXT[: len(TEXT) // 2]]  # right padding in the second row
    whole, pieces = sender_prefill(sender, texts), sender_prefill(sender, texts, chunk_tokens=3)
    assert torch.equal(whole.mask, pieces.mask) and torch.equal(whole.positions, pieces.positions)
    m = whole.mask[:, None, :, None]  # (B, 1, T, 1): padded slots may differ, valid ones may not
    for a, b in zip(whole.keys + whole.values, pieces.keys + pieces.values):  # (B, H_kv, T, D) each
        torch.testing.assert_close(a * m, b * m, rtol=1e-4, atol=1e-5)
    calls = []
    ids = torch.ones(1, 10, dtype=torch.long)
    with pytest.raises(GenerationStopped, match="after 3 of 10 tokens"):
        prefill(sender.model, ids, torch.ones_like(ids), torch.arange(10)[None], 3, lambda: calls.append(1) or len(calls) > 1)


def test_generation_checks_should_stop_every_step(zoo_pair):
    _, receiver = zoo_pair
    ids = torch.tensor([[receiver.tokenizer.bos_token_id]])
    steps = []
    with pytest.raises(GenerationStopped, match="after 5 tokens"):
        generate(receiver.model, ids, torch.ones_like(ids), GenerationConfig(max_new_tokens=50), eos_token_id=-1,
                 on_token=lambda step, _: steps.append(step), should_stop=lambda: len(steps) >= 5)


@pytest.fixture(scope="module")
def stack(random_route):
    with LocalStack(stack_config(random_route, drain_grace_s=10.0)) as stack:
        yield stack


def in_flight(stack, kind: str) -> float:
    host = stack.hosts[kind]
    return host.metrics.in_flight.labels(kind)._value.get() + host.admission.in_flight


def busy_cpu_seconds(window: float) -> float:
    """CPU seconds this process (all four services) burns over ``window`` wall seconds."""
    before = time.process_time()
    time.sleep(window)
    return time.process_time() - before


@pytest.mark.parametrize("how", ["client cancel", "deadline"])
def test_cancelled_long_request_frees_every_hop_within_2s(stack, how):
    short = build_request(TEXT, max_new_tokens=8)
    started = time.perf_counter()
    run(collect(stack.relay_address, short))
    baseline = time.perf_counter() - started

    async def long_call() -> grpc.StatusCode:
        request = build_request(TEXT * 6, route="random", max_new_tokens=4000)  # a minute of work if never stopped
        async with grpc.aio.insecure_channel(stack.relay_address) as channel:
            call = relay_pb2_grpc.RelayStub(channel).Relay(request, timeout=1.5 if how == "deadline" else 60)
            try:
                tokens = 0
                async for event in call:
                    tokens += event.HasField("token")
                    if how == "client cancel" and tokens == 20:
                        call.cancel()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            except asyncio.CancelledError:
                return grpc.StatusCode.CANCELLED
            return grpc.StatusCode.OK

    code = run(long_call())
    assert code == (grpc.StatusCode.CANCELLED if how == "client cancel" else grpc.StatusCode.DEADLINE_EXCEEDED)
    gone = time.perf_counter()
    while any(in_flight(stack, kind) for kind in ("relay", "sender", "adapter", "receiver")):
        assert time.perf_counter() - gone < 2.0, {k: in_flight(stack, k) for k in stack.hosts}
        time.sleep(0.05)
    time.sleep(max(0.0, 2.0 - (time.perf_counter() - gone) - 0.5))
    assert busy_cpu_seconds(0.5) < 0.15  # idle: no thread kept generating for the departed client
    started = time.perf_counter()
    assert run(collect(stack.relay_address, short))[-1].stats.text
    assert time.perf_counter() - started < 3 * baseline + 0.5  # the next request is not slowed down


def test_on_cache_failure_text_serves_from_the_input_and_says_so(stack):
    stack.stop("adapter")
    try:
        assert status_of(stack.relay_address, build_request(TEXT)) == grpc.StatusCode.UNAVAILABLE  # default: error
        stats = run(collect(stack.relay_address, build_request(TEXT, on_cache_failure="text", max_new_tokens=24)))[-1].stats
        assert stats.served_by == "text" and stats.fallback_reason.startswith("UNAVAILABLE")
        assert stats.receiver_prefill_tokens > len(TEXT.split()) and not stats.hops and stats.sender_prefill_tokens == 0
        assert tasks.extract_answer(stats.text) is not None  # the receiver read X itself and answered
    finally:
        stack.restart("adapter")
    deadline = time.time() + 30
    while (code := status_of(stack.relay_address, build_request(TEXT, on_cache_failure="text"))) != grpc.StatusCode.OK:
        assert time.time() < deadline, code
        time.sleep(0.5)
    stats = run(collect(stack.relay_address, build_request(TEXT, on_cache_failure="text")))[-1].stats
    deadline = time.time() + 30
    while stats.served_by != "cache":  # the adapter is back: the dense path serves again
        assert time.time() < deadline
        time.sleep(0.5)
        stats = run(collect(stack.relay_address, build_request(TEXT, on_cache_failure="text")))[-1].stats
    assert stats.fallback_reason == "" and len(stats.hops) == 2


def test_graceful_drain_order(random_route):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with LocalStack(stack_config(random_route)) as stack:
        relay = stack.hosts["relay"]
        first_token = threading.Event()

        async def long_call():
            async with grpc.aio.insecure_channel(stack.relay_address) as channel:
                events = []
                async for event in relay_pb2_grpc.RelayStub(channel).Relay(
                        build_request(TEXT, route="random", max_new_tokens=150), timeout=60):
                    events.append(event)
                    first_token.set()
                return events

        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(events=run(long_call())))
        worker.start()
        assert first_token.wait(30)
        drained = relay.run(asyncio.sleep(0), timeout=5) or asyncio.run_coroutine_threadsafe(relay.drain(30), relay.loop)

        async def probe():
            async with grpc.aio.insecure_channel(stack.relay_address) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                try:
                    [e async for e in relay_pb2_grpc.RelayStub(channel).Relay(build_request(TEXT), timeout=5)]
                    refused = None
                except grpc.aio.AioRpcError as exc:
                    refused = (exc.code(), exc.details())
                return health.status, refused

        health, refused = run(probe())
        assert health == health_pb2.HealthCheckResponse.NOT_SERVING  # probes see it first
        assert refused[0] == grpc.StatusCode.UNAVAILABLE and "draining" in refused[1]  # new calls refused
        assert not drained.done()  # still waiting for the call in flight
        assert drained.result(timeout=60) == 0  # which finished within the grace period
        worker.join(60)
        assert result["events"][-1].HasField("stats") and len(result["events"]) > 100  # completely
