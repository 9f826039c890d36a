"""The services as Ray actors on a local Ray (node IP 127.0.0.1): same answers, crash -> UNAVAILABLE -> recovery."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from densecomm_core.generation import GenerationConfig
from densecomm_core.relay import ContextMode, DenseRelay
from densecomm_core.zoo import tasks
from services.client import build_request, relay_pb2_grpc
from tests.services.conftest import collect, run, stack_config, status_of

EXAMPLES = tasks.make_split("test", 1)


@pytest.fixture(scope="module")
def ray_stack(random_route):
    from services.stack import RayStack

    with RayStack(stack_config(random_route, shm_min_bytes=1)) as stack:  # every KV message by shared memory
        yield stack


@pytest.mark.parametrize("mode", ["aware", "unaware"])
def test_ray_hosted_answers_equal_the_in_process_relay(ray_stack, zoo_pair, zoo_adapter, mode):
    relay = DenseRelay(*zoo_pair, zoo_adapter)
    expected = relay.run([e.context for e in EXAMPLES], ContextMode(mode), GenerationConfig(max_new_tokens=24)).texts
    stats = [run(collect(ray_stack.relay_address, build_request(e.context, mode=mode, max_new_tokens=24)))[-1].stats for e in EXAMPLES]
    assert [s.text for s in stats] == expected
    assert all([h.transport for h in s.hops] == ["shm", "shm"] for s in stats)  # actors on one node: the shortcut


def test_a_named_pca_basis_is_valid_at_the_ingress_actor_that_loads_no_bases(ray_stack, zoo_pair):
    """The relay actor holds no bases; a request naming the sender's basis by fingerprint passes its
    validation there and is coded with the sender's and adapter's own (it used to be INVALID_ARGUMENT
    here and OK in the in-process stack, whose services shared one process-wide registry)."""
    import json

    from tests.services.test_local_stack import zoo_sender_basis

    params = json.dumps({"basis": zoo_sender_basis(zoo_pair)})
    request = build_request(EXAMPLES[0].context, codec="pca", codec_params=params, receiver_codec="pca", max_new_tokens=8)
    stats = run(collect(ray_stack.relay_address, request))[-1].stats
    assert [hop.codec for hop in stats.hops] == ["pca", "pca"] and stats.text


def test_receiver_crash_mid_stream_is_unavailable_then_the_stack_serves_again(ray_stack):
    async def long_relay_then_crash() -> grpc.StatusCode:
        request = build_request(EXAMPLES[0].context, route="random", max_new_tokens=4000)
        async with grpc.aio.insecure_channel(ray_stack.relay_address) as channel:
            tokens = 0
            try:
                async for event in relay_pb2_grpc.RelayStub(channel).Relay(request, timeout=120):
                    tokens += event.HasField("token")
                    if tokens == 5:
                        await asyncio.to_thread(ray_stack.crash, "receiver")
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert run(long_relay_then_crash()) == grpc.StatusCode.UNAVAILABLE
    ray_stack.wait_ready("receiver")
    deadline = time.time() + 60
    while (code := status_of(ray_stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=8))) != grpc.StatusCode.OK:
        assert code == grpc.StatusCode.UNAVAILABLE and time.time() < deadline  # reconnect back-off, then OK
        time.sleep(1)
