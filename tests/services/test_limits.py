"""Limits checked before any model work: each one's status and a message naming the limit and the value."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from densecomm_core.zoo import tasks
from services.client import build_request, relay_pb2_grpc
from services.config import ConfigError, load_config, zoo_route
from services.limits import RouteLimits, check_window
from services.stack import LocalStack
from tests.services.conftest import collect, run

TEXT = tasks.make_split("test", 1)[0].context


@pytest.fixture(scope="module")
def stack(random_route):
    zoo = {**zoo_route().__dict__, "max_input_bytes": 2000}  # a route's own limit wins over the service's
    small = {**random_route, "name": "small-cache", "max_cache_bytes": 4096}
    config = load_config(None, relay_port=0, routes=[zoo, random_route, small], max_input_tokens=64, max_in_flight=2)
    with LocalStack(config) as stack:
        yield stack


def refusal(stack, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(collect(stack.relay_address, request, timeout=30))
    return info.value.code(), info.value.details()


def test_input_bytes(stack):
    code, details = refusal(stack, build_request("a" * 2001))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "2001 bytes" in details and "max_input_bytes of route 'zoo' is 2000" in details


def test_input_tokens_capped_by_config_and_windows(stack, random_route):
    code, details = refusal(stack, build_request("ann 3 , " * 40, route="random"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_input_tokens of route 'random' is 64" in details
    config = load_config(None, routes=[zoo_route().__dict__, random_route])
    assert RouteLimits.for_route(config, "zoo").max_input_tokens == 256  # the zoo models' window < the 8192 cap
    assert RouteLimits.for_route(config, "random").max_input_tokens == 8192


def test_prompt_plus_max_new_tokens_within_the_receivers_window(stack):
    code, details = refusal(stack, build_request(TEXT, max_new_tokens=250))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceed the receiver's context window of 256" in details and "250 max_new_tokens" in details
    with pytest.raises(Exception, match="context window of 10"):
        check_window(4, 3, 4, 10, "r")


def test_cache_bytes_per_request(stack):
    code, details = refusal(stack, build_request(TEXT, route="small-cache"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_cache_bytes of route 'small-cache' is 4096" in details


def test_in_flight_beyond_the_limit_is_refused_at_once_and_the_slots_come_back(stack):
    async def scenario():
        async with grpc.aio.insecure_channel(stack.relay_address) as channel:
            stub = relay_pb2_grpc.RelayStub(channel)
            long = [stub.Relay(build_request(TEXT, route="random", max_new_tokens=4000), timeout=60) for _ in range(2)]
            for call in long:
                await anext(call.__aiter__())  # both are being served
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                [e async for e in stub.Relay(build_request(TEXT, max_new_tokens=4), timeout=30)]
                refused = None
            except grpc.aio.AioRpcError as exc:
                refused = (exc.code(), exc.details(), loop.time() - started)
            for call in long:
                call.cancel()
            await asyncio.sleep(0.5)
            after = [e async for e in stub.Relay(build_request(TEXT, max_new_tokens=4), timeout=30)]
            return refused, after

    (code, details, seconds), after = run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_in_flight=2" in details and seconds < 1.0
    assert after[-1].HasField("stats") and after[-1].stats.text  # the cancelled calls gave their slots back
    refused = stack.hosts["relay"].metrics.errors.labels("relay", "RESOURCE_EXHAUSTED")._value.get()
    assert refused >= 1  # refusals are counted in densecomm_errors_total like any other status


def test_the_deployments_default_codec_params_apply_under_a_requests_own():
    from densecomm_core.codec import get_codec
    from services.client import relay_pb2
    from services.runtime import codec_for

    config = load_config(None, default_codec_params={"level": 1})
    spec = relay_pb2.CodecSpec
    assert codec_for(spec(), config).params == {"level": 1}  # no codec named: the default, with its params
    assert codec_for(spec(name="lossless"), config).params == {"level": 1}  # named, no params: the same
    assert codec_for(spec(name="lossless", params_json='{"level": -4}'), config).params == {"level": -4}  # the request's win
    assert codec_for(spec(name="quantized"), config).params == get_codec("quantized").params  # another codec: its own
    assert codec_for(spec(), load_config(None)).params == {"level": -16}  # unconfigured: the codec's own default
    with pytest.raises(ConfigError, match=r"default_codec 'lossless' with default_codec_params \{'level': 99\}: lossless level "
                                          r"must be an integer in \[-64, 19\], got 99"):
        load_config(None, default_codec_params={"level": 99})
    with pytest.raises(ConfigError, match=r"default_codec 'zip' with default_codec_params \{\}: unknown codec 'zip'"):
        load_config(None, default_codec="zip")
    with pytest.raises(ConfigError, match="default_codec_params must be a table, got 1"):
        load_config(None, default_codec_params=1)


def test_config_checks_policy_and_limits():
    with pytest.raises(ConfigError, match="on_cache_failure"):
        load_config(None, on_cache_failure="maybe")
    with pytest.raises(ConfigError, match="max_in_flight"):
        load_config(None, max_in_flight=0)
    with pytest.raises(ConfigError, match="codec_workers must be >= 1, got 0"):
        load_config(None, codec_workers=0)
    # a message must hold any frame of frame_bytes: prefixes, headers and the widest codec output (pca int32)
    with pytest.raises(ConfigError, match=r"max_message_bytes 1048576 must be at least 2 x frame_bytes \+ 64 KiB = 2162688"):
        load_config(None, max_message_bytes=1 << 20)
    assert load_config(None, max_message_bytes=2162688).max_message_bytes == 2162688
    with pytest.raises(ConfigError, match="frame_bytes 4194304"):
        load_config(None, frame_bytes=4 << 20, max_message_bytes=8 << 20)
