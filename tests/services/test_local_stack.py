"""The four services over real gRPC on loopback (hosted in this process): answers, streaming, errors, metrics."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest
import torch

from densecomm_core.codec import iter_encode
from densecomm_core.codec.base import get_codec
from densecomm_core.generation import GenerationConfig
from densecomm_core.relay import ContextMode, DenseRelay, sender_prefill
from densecomm_core.zoo import tasks
from services.client import build_request
from services.stack import LocalStack
from tests.services.conftest import collect, run, stack_config, status_of

EXAMPLES = tasks.make_split("test", 2)


@pytest.fixture(scope="module")
def stack(random_route):
    with LocalStack(stack_config(random_route, chunk_tokens=4)) as stack:
        yield stack


@pytest.mark.parametrize("mode", ["aware", "unaware"])
def test_answers_equal_the_in_process_relay(stack, zoo_pair, zoo_adapter, mode):
    relay = DenseRelay(*zoo_pair, zoo_adapter)
    expected = relay.run([e.context for e in EXAMPLES], ContextMode(mode), GenerationConfig(max_new_tokens=24)).texts
    for example, want in zip(EXAMPLES, expected):
        events = run(collect(stack.relay_address, build_request(example.context, mode=mode, max_new_tokens=24)))
        assert events[-1].stats.text == want


def test_default_framing_packs_a_zoo_cache_in_one_chunk_per_hop_and_answers_the_same(random_route, zoo_pair, zoo_adapter):
    """With the default frame sizing a zoo cache (a few KB) crosses each hop as one packed chunk (wire version 2),
    the adapter's output included, and the answers are still the in-process relay's."""
    relay = DenseRelay(*zoo_pair, zoo_adapter)
    contexts = [e.context for e in EXAMPLES[:2]]
    expected = relay.run(contexts, ContextMode.UNAWARE, GenerationConfig(max_new_tokens=24)).texts
    with LocalStack(stack_config(random_route)) as default:
        for codec in ("lossless", "raw"):
            for context, want in zip(contexts, expected):
                stats = run(collect(default.relay_address, build_request(context, codec=codec, max_new_tokens=24)))[-1].stats
                assert [h.chunks for h in stats.hops] == [1, 1] and stats.text == want


def test_tokens_stream_in_order_then_one_stats_event(stack):
    events = run(collect(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=24)))
    tokens, final = events[:-1], events[-1]
    assert all(e.HasField("token") for e in tokens) and final.HasField("stats")
    assert [e.token.index for e in tokens] == list(range(len(tokens)))
    assert "".join(e.token.text for e in tokens).strip() == final.stats.text.strip()
    assert tasks.extract_answer(final.stats.text) is not None  # a complete answer in the canonical format


def test_final_stats_account_for_bytes_tokens_flops_and_stages(stack, zoo_pair):
    stats = run(collect(stack.relay_address, build_request(EXAMPLES[1].context, codec="lossless")))[-1].stats
    sender, receiver = zoo_pair
    n_tokens = len(sender.tokenizer(EXAMPLES[1].context)["input_ids"])
    assert stats.sender_prefill_tokens == n_tokens and stats.sender_decode_tokens == 0
    assert stats.raw_bytes == sender_prefill(sender, [EXAMPLES[1].context]).nbytes
    assert 0 < stats.wire_bytes < stats.raw_bytes and stats.compression_ratio == pytest.approx(stats.raw_bytes / stats.wire_bytes)
    assert [h.hop for h in stats.hops] == ["sender->adapter", "adapter->receiver"] and all(h.chunks > 0 for h in stats.hops)
    assert stats.sender_flops == pytest.approx(2 * sender.non_embedding_params * n_tokens)
    assert stats.receiver_flops == pytest.approx(2 * receiver.non_embedding_params * (stats.receiver_prefill_tokens + stats.receiver_decode_tokens))
    assert stats.adapter_flops > 0 and stats.t2t_flops > stats.sender_flops + stats.receiver_flops
    stages = {l.stage for l in stats.latencies}
    assert stages >= {"admit", "prefill", "encode", "transfer", "transform", "decode", "prompt", "first_token", "generate", "end_to_end"}


def test_receiver_holds_layer_0_before_the_sender_sent_its_last_chunk(stack, monkeypatch):
    """Layers stream: while the sender is still encoding later chunks, the receiver already holds layer 0.
    The zoo's whole cache (~50 KB) fits in gRPC's flow-control window, so an overlapped sender would hand
    it all over at once; each chunk costs 5 ms of encoding here, as a large cache's chunks do."""
    from densecomm_core.hop import HopEncoder

    encode = HopEncoder.chunk_parts

    def slow_chunk_parts(self):
        for parts in encode(self):
            time.sleep(0.005)
            yield parts

    monkeypatch.setattr(HopEncoder, "chunk_parts", slow_chunk_parts)
    stats = run(collect(stack.relay_address, build_request(EXAMPLES[2].context, max_new_tokens=4)))[-1].stats
    assert stats.hops[0].chunks > 8  # chunk_tokens=4: many chunks per request
    assert 0 < stats.receiver_layer0_unix < stats.sender_last_chunk_unix


@pytest.mark.parametrize("codec, params", [("raw", ""), ("quantized", '{"key_bits": 8, "value_bits": 8}'),
                                            ("ecsq", '{"key_step": 0.35, "value_step": 0.35}'),
                                            ("eviction", '{"keep": 0.75, "inner": "quantized"}')])
def test_every_codec_serves(stack, codec, params):
    stats = run(collect(stack.relay_address, build_request(EXAMPLES[0].context, codec=codec, codec_params=params)))[-1].stats
    assert stats.codec == codec and stats.text


def test_pca_ships_stripped_keys_and_answers_like_the_in_process_relay(stack, zoo_pair, zoo_adapter):
    """Both hops through the transform codec: the sender strips its RoPE, the adapter reads and writes
    stripped keys, the receiver restores its own; answers equal the in-process relay through the same codec."""
    import torch

    from densecomm_core.codec import round_trip
    from services.config import zoo_route
    from services.runtime import route_bases

    sender, receiver = zoo_pair
    codec = get_codec("pca")
    bases = route_bases(zoo_route())  # the zoo's committed bases, as the services load them with the route

    def channel(cache, hop):
        return round_trip(cache, codec, dtype=torch.float32, model=sender if hop == 0 else receiver, bases=bases)

    relay = DenseRelay(sender, receiver, zoo_adapter, channel=channel)
    expected = relay.run([e.context for e in EXAMPLES], ContextMode.UNAWARE, GenerationConfig(max_new_tokens=24)).texts
    for example, want in zip(EXAMPLES, expected):
        stats = run(collect(stack.relay_address, build_request(example.context, codec="pca", max_new_tokens=24)))[-1].stats
        assert stats.text == want
        assert [hop.codec for hop in stats.hops] == ["pca", "pca"]
        assert all(hop.wire_bytes * 3 < hop.raw_bytes for hop in stats.hops)


def zoo_sender_basis(zoo_pair) -> str:
    from services.config import zoo_route
    from services.runtime import route_bases

    sender, _ = zoo_pair
    return route_bases(zoo_route()).for_space(sender.geometry.fingerprint(), False).fingerprint


def test_a_named_pca_basis_codes_its_own_hop_only(stack, zoo_pair):
    """Naming the sender's basis: valid at the ingress (which holds no bases), used on the first hop; the
    second hop needs its own (receiver_codec), else the adapter names both cache spaces."""
    params = json.dumps({"basis": zoo_sender_basis(zoo_pair)})
    request = build_request(EXAMPLES[0].context, codec="pca", codec_params=params, receiver_codec="pca", max_new_tokens=8)
    stats = run(collect(stack.relay_address, request))[-1].stats
    assert [hop.codec for hop in stats.hops] == ["pca", "pca"] and stats.text
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(collect(stack.relay_address, build_request(EXAMPLES[0].context, codec="pca", codec_params=params)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name each hop's own basis" in info.value.details()


def test_receiver_codec_compresses_only_the_second_hop(stack):
    request = build_request(EXAMPLES[0].context, codec="lossless", receiver_codec="quantized",
                            receiver_codec_params='{"key_bits": 4, "value_bits": 3}')
    stats = run(collect(stack.relay_address, request))[-1].stats
    first, second = stats.hops
    assert (first.hop, first.codec, second.hop, second.codec) == ("sender->adapter", "lossless", "adapter->receiver", "quantized")
    assert first.raw_bytes / first.wire_bytes < 2 < second.raw_bytes / second.wire_bytes
    forwarded = run(collect(stack.relay_address, build_request(EXAMPLES[0].context, codec="quantized")))[-1].stats
    assert [hop.codec for hop in forwarded.hops] == ["quantized", "quantized"]  # unset: the first hop's codec forwards


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"text": ""}, "input is empty"),
        ({"mode": "aware", "max_new_tokens": 10**6}, "max_new_tokens"),
        ({"codec": "gzip"}, "unknown codec"),
        ({"codec": "quantized", "codec_params": "{bad json"}, "params_json"),
        ({"codec": "quantized", "codec_params": '{"key_bits": 5}'}, "key_bits"),
        ({"top_p": 2.0}, "top_p"),
        ({"receiver_codec": "eviction"}, "receiver_codec"),
        ({"receiver_codec": "quantized", "receiver_codec_params": '{"key_bits": 5}'}, "receiver_codec"),
        ({"route": "random", "codec": "pca"}, "no KV basis is loaded"),  # that route ships no kv_basis.safetensors
        ({"codec": "pca", "codec_params": '{"basis": "0123abcd"}'}, "not loaded here"),
    ],
)
def test_invalid_arguments_name_the_field(stack, fields, fragment):
    request = build_request(fields.pop("text", EXAMPLES[0].context), **fields)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(collect(stack.relay_address, request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()


def test_unspecified_mode_and_unknown_route(stack):
    request = build_request(EXAMPLES[0].context)
    request.mode = 0
    assert status_of(stack.relay_address, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(stack.relay_address, build_request(EXAMPLES[0].context, route="nope")) == grpc.StatusCode.NOT_FOUND
    assert status_of(stack.relay_address, build_request(EXAMPLES[0].context)) == grpc.StatusCode.OK  # still serving


def kv_stream(frames, request, raw=False):
    """The setup, then each frame in a KVMessage (the generated stubs' framing) or as the message itself (raw)."""
    from services.servicers import kv_pb2

    yield kv_pb2.KVMessage(setup=kv_pb2.HopSetup(request_id="t", request=request))
    for frame in frames:
        yield frame if raw else kv_pb2.KVMessage(frame=kv_pb2.KVFrame(frame=frame))


async def call_direct(address, method, messages, raw=False):
    from services import kvstream
    from services.servicers import kv_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        if raw:
            stub = (kvstream.ADAPTER if method == "Transform" else kvstream.RECEIVER).stub(channel)
        else:
            stub = (kv_pb2_grpc.AdapterStub if method == "Transform" else kv_pb2_grpc.ReceiverStub)(channel)
        return [e async for e in getattr(stub, method)(messages, timeout=30)]


def direct_status(address, method, frames, request, raw=False) -> tuple[grpc.StatusCode, str]:
    try:
        run(call_direct(address, method, kv_stream(frames, request, raw), raw))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def blank_cache(model, tokens: int, batch: int = 1, positions=None):
    """A cache of ``model``'s geometry (zeros): compresses to almost nothing, whatever its size."""
    from densecomm_core.cache import KVCache

    g = model.geometry
    keys = [torch.zeros(batch, g.num_kv_heads, tokens, g.head_dim) for _ in range(g.num_layers)]
    positions = torch.arange(tokens).expand(batch, tokens) if positions is None else positions
    return KVCache(keys, [k.clone() for k in keys], torch.ones(batch, tokens, dtype=torch.bool), positions, True,
                   g.fingerprint())


@pytest.mark.parametrize("service", ["adapter", "receiver"])
def test_a_peers_stream_is_bounded_at_its_header(stack, zoo_pair, service):
    """Fuzzing the internal streams: 0.5 MB of zstd'd zeros declaring 200k tokens (positions all 0, so the window
    check on positions passed) took the adapter 6.4 GB and 29 s and then answered; a 0-token or 2-row cache was
    INTERNAL. The header is now checked against the route's input tokens and one request's row first."""
    sender, receiver = zoo_pair
    model, method = (sender, "Transform") if service == "adapter" else (receiver, "Generate")
    address = stack.hosts[service].address
    request = build_request(EXAMPLES[0].context, max_new_tokens=2)
    huge = blank_cache(model, 200_000, positions=torch.zeros(1, 200_000, dtype=torch.long))
    code, details = direct_status(address, method, list(iter_encode(huge, get_codec("lossless"))), request, raw=True)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "200000 tokens exceed the limit of" in details
    code, details = direct_status(address, method, list(iter_encode(blank_cache(model, 0), get_codec("raw"))), request, raw=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "a cache of 0 tokens; at least 1 expected" in details
    code, details = direct_status(address, method, list(iter_encode(blank_cache(model, 5, 2), get_codec("raw"))), request, raw=True)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "batch 2 exceeds the limit of 1" in details
    bad = build_request(EXAMPLES[0].context)
    bad.generation.top_p = 5.0  # the sender refuses it; a peer feeding this service directly gets the same
    code, details = direct_status(address, method, list(iter_encode(blank_cache(model, 5), get_codec("raw"))), bad, raw=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "generation.top_p must be in [0, 1]" in details
    assert direct_status(address, method, list(iter_encode(blank_cache(model, 5), get_codec("raw"))), request, raw=True)[0] == grpc.StatusCode.OK


def test_a_frame_after_the_done_note_loses_the_answer(stack, zoo_pair, zoo_adapter):
    """The adapter forwards every frame, the receiver holds a whole cache and answers, and only then does the
    adapter read a repeated chunk after its sender's done note: DATA_LOSS, and none of the answer goes out (it
    sent the tokens and the stats first before)."""
    from services.servicers import kv_pb2

    sender, _ = zoo_pair
    frames = list(iter_encode(sender_prefill(sender, [EXAMPLES[0].context]), get_codec("raw")))

    async def messages():
        yield kv_pb2.KVMessage(setup=kv_pb2.HopSetup(request_id="t", request=build_request(EXAMPLES[0].context, max_new_tokens=4)))
        for frame in frames:
            yield frame
        yield kv_pb2.KVMessage(done=kv_pb2.StreamDone(prefill_tokens=1))
        yield frames[-1]

    events = []

    async def collect_events():
        from services import kvstream

        async with grpc.aio.insecure_channel(stack.hosts["adapter"].address) as channel:
            async for event in kvstream.ADAPTER.stub(channel).Transform(messages(), timeout=30):
                events.append(event)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(collect_events())
    assert info.value.code() == grpc.StatusCode.DATA_LOSS and "twice" in info.value.details() and events == []


def test_the_adapter_refuses_a_text_only_setup(stack):
    from services.servicers import kv_pb2

    async def messages():
        yield kv_pb2.KVMessage(setup=kv_pb2.HopSetup(request_id="t", request=build_request(EXAMPLES[0].context), text_only=True))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(call_direct(stack.hosts["adapter"].address, "Transform", messages()))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_only" in info.value.details()


def test_cache_from_another_model_is_a_failed_precondition(stack, zoo_pair, tiny_pair):
    sender, receiver = zoo_pair
    wrong = sender_prefill(receiver, [EXAMPLES[0].context])  # a receiver-space cache sent to the adapter
    code, details = direct_status(stack.hosts["adapter"].address, "Transform", list(iter_encode(wrong, get_codec("raw"))),
                                  build_request(EXAMPLES[0].context))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and sender.geometry.fingerprint() in details
    unnamed = sender_prefill(sender, [EXAMPLES[0].context])
    unnamed.fingerprint = ""  # a cache of unknown origin: the adapter let it through, the receiver refused it
    for service, method in (("adapter", "Transform"), ("receiver", "Generate")):
        code, details = direct_status(stack.hosts[service].address, method, list(iter_encode(unnamed, get_codec("raw"))),
                                      build_request(EXAMPLES[0].context))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (service, details)


@pytest.mark.parametrize("raw", [False, True], ids=["protobuf-framing", "raw-framing"])
def test_corrupted_or_missing_chunks_are_data_loss(stack, zoo_pair, zoo_adapter, raw):
    relay = DenseRelay(*zoo_pair, zoo_adapter)
    frames = list(iter_encode(relay.transfer([EXAMPLES[0].context]), get_codec("lossless"), chunk_tokens=4))
    request = build_request(EXAMPLES[0].context)
    receiver = stack.hosts["receiver"].address
    flipped = bytearray(frames[3])
    flipped[-1] ^= 0x40
    assert direct_status(receiver, "Generate", frames[:3] + [bytes(flipped)] + frames[4:], request, raw)[0] == grpc.StatusCode.DATA_LOSS
    code, details = direct_status(receiver, "Generate", frames[:-2], request, raw)
    assert code == grpc.StatusCode.DATA_LOSS and "missing" in details
    assert direct_status(receiver, "Generate", frames[:1] + frames[2:], request, raw)[0] == grpc.StatusCode.DATA_LOSS  # out of order
    if raw:  # a frame whose first byte went wrong is no longer recognisable as a frame
        lead = bytearray(frames[3])
        lead[0] ^= 0xFF
        code, details = direct_status(receiver, "Generate", frames[:3] + [bytes(lead)] + frames[4:], request, raw)
        assert code == grpc.StatusCode.DATA_LOSS and "neither wire frames nor a KVMessage" in details
        joined = [frames[0], b"".join(frames[1:4]), *frames[4:]]  # several frames in one message
        assert direct_status(receiver, "Generate", joined, request, raw)[0] == grpc.StatusCode.OK
    assert direct_status(receiver, "Generate", frames, request, raw)[0] == grpc.StatusCode.OK  # and it still serves
    packed = list(iter_encode(relay.transfer([EXAMPLES[0].context]), get_codec("lossless"), layers_per_chunk=2))  # version 2
    flipped = bytearray(packed[2])
    flipped[-1] ^= 0x40
    assert direct_status(receiver, "Generate", packed[:2] + [bytes(flipped)], request, raw)[0] == grpc.StatusCode.DATA_LOSS
    code, details = direct_status(receiver, "Generate", packed[:2], request, raw)
    assert code == grpc.StatusCode.DATA_LOSS and "missing" in details
    assert direct_status(receiver, "Generate", packed, request, raw)[0] == grpc.StatusCode.OK


def test_payload_over_the_limit_is_resource_exhausted(random_route):
    with LocalStack(stack_config(random_route, max_cache_bytes=4096)) as small:
        code = status_of(small.relay_address, build_request(EXAMPLES[0].context))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadlines(stack, random_route):
    long = build_request(EXAMPLES[0].context, route="random", max_new_tokens=4000)
    assert status_of(stack.relay_address, long, timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
    with LocalStack(stack_config(random_route, hop_deadline_s=0.5)) as strict:
        assert status_of(strict.relay_address, long, timeout=30) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert status_of(strict.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=4), timeout=30) == grpc.StatusCode.OK


def test_downstream_down_is_unavailable_and_the_stack_recovers(random_route):
    with LocalStack(stack_config(random_route)) as stack:
        stack.stop("receiver")
        assert status_of(stack.relay_address, build_request(EXAMPLES[0].context)) == grpc.StatusCode.UNAVAILABLE
        stack.restart("receiver")
        deadline = time.time() + 30
        while (code := status_of(stack.relay_address, build_request(EXAMPLES[0].context))) != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.UNAVAILABLE and time.time() < deadline  # reconnect back-off, then OK
            time.sleep(0.5)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_endpoints_expose_the_documented_series(stack):
    run(collect(stack.relay_address, build_request(EXAMPLES[0].context)))
    assert status_of(stack.relay_address, build_request("")) == grpc.StatusCode.INVALID_ARGUMENT
    samples = {kind: scrape(port) for kind, port in stack.metrics_ports.items()}

    def value(kind, prefix):
        return sum(v for k, v in samples[kind].items() if k.startswith(prefix))

    assert value("relay", 'densecomm_requests_total{code="OK"') >= 1
    assert value("sender", 'densecomm_hop_bytes_total{hop="sender->adapter",kind="raw"') > value("sender", 'densecomm_hop_bytes_total{hop="sender->adapter",kind="wire"') > 0
    assert value("sender", 'densecomm_hop_raw_bytes_bucket{hop="sender->adapter",le="1024.0"') < value("sender", 'densecomm_hop_raw_bytes_bucket{hop="sender->adapter",le="1.073741824e+09"')
    assert value("receiver", 'densecomm_hop_wire_bytes_count{hop="adapter->receiver"') >= 1
    assert value("sender", 'densecomm_compression_ratio_count') >= 1
    assert value("sender", 'densecomm_chunks_total') > 0
    for kind, stage in (("sender", "admit"), ("sender", "prefill"), ("sender", "encode"), ("receiver", "prompt"), ("adapter", "transform"), ("receiver", "first_token"), ("relay", "end_to_end"), ("relay", "time_to_first_token")):
        assert value(kind, f'densecomm_stage_seconds_count{{service="{kind}",stage="{stage}"') >= 1, (kind, stage)
    assert value("receiver", 'densecomm_tokens_total{phase="decode",service="receiver",side="receiver"}') > 0
    assert value("sender", 'densecomm_flops_total') > 0 and value("adapter", "densecomm_flops_total") > 0
    assert "densecomm_in_flight_requests{service=\"relay\"}" in samples["relay"]
    assert value("relay", 'densecomm_errors_total{code="INVALID_ARGUMENT",service="relay"}') >= 1


def test_health_and_reflection(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def check():
        async with grpc.aio.insecure_channel(stack.relay_address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="densecomm.v1.Relay"), timeout=10)
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            listed = [s.name async for r in stream for s in r.list_services_response.service]
            return health.status, listed

    status, services = run(check())
    assert status == 1 and "densecomm.v1.Relay" in services  # SERVING


def test_a_sender_that_fails_mid_stream_reports_its_own_error_at_once(stack, monkeypatch):
    """An error while the sender streams frames (after the adapter call began) comes back as that error's
    status within seconds, not as a cancelled call left to run into the deadline."""
    from densecomm_core.codec.base import CodecError
    from services import servicers

    def failing(*args, **kwargs):
        async def messages():  # the stream ends after its setup: the adapter reports the missing frames
            raise CodecError("pca cannot code non-finite values (test)")
            yield
        return messages()

    monkeypatch.setattr(servicers, "encoded_messages", failing)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(collect(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=4), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite values (test)" in info.value.details()
    assert time.perf_counter() - started < 10
    monkeypatch.undo()
    assert status_of(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=4)) == grpc.StatusCode.OK


def test_the_adapter_call_is_set_up_while_the_sender_prefills_and_ends_with_its_failure(stack, monkeypatch):
    """The sender opens its call to the adapter before it prefills (and the adapter its own to the receiver),
    so both hops are set up by the time the cache is ready; a prefill that fails ends both calls with it."""
    from services import servicers

    def in_flight(kind: str) -> float:
        return scrape(stack.metrics_ports[kind])[f'densecomm_in_flight_requests{{service="{kind}"}}']

    def wait_for(condition, seconds: float = 10.0) -> bool:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        return condition()

    seen = {}

    def failing_prefill(*args, should_stop=None, **kwargs):  # in the sender's worker thread
        wait_for(lambda: in_flight("adapter") and in_flight("receiver"))
        seen.update(adapter=in_flight("adapter"), receiver=in_flight("receiver"))
        raise RuntimeError("the prefill failed (test)")

    monkeypatch.setattr(servicers, "sender_prefill", failing_prefill)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(collect(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=4), timeout=60))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "the prefill failed (test)" in info.value.details()
    assert seen == {"adapter": 1.0, "receiver": 1.0}  # both downstream calls were open during the prefill
    assert wait_for(lambda: in_flight("adapter") == 0 and in_flight("receiver") == 0)  # and ended with it
    monkeypatch.undo()
    assert status_of(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=4)) == grpc.StatusCode.OK


def test_a_hops_transfer_is_timed_from_its_first_frame_not_from_the_setup(stack, monkeypatch):
    """The calls open before the sender's prefill; the stages that time a hop start at its first frame."""
    from services import servicers

    prefill = servicers.sender_prefill

    def slow_prefill(*args, **kwargs):
        time.sleep(1.0)
        return prefill(*args, **kwargs)

    monkeypatch.setattr(servicers, "sender_prefill", slow_prefill)
    final = run(collect(stack.relay_address, build_request(EXAMPLES[0].context, max_new_tokens=2), timeout=60))[-1]
    stages = {s.stage: s.seconds for s in final.stats.latencies}
    assert stages["prefill"] >= 1.0 and stages["end_to_end"] >= 1.0
    assert stages["transfer"] < 0.5 and stages["kv_handoff"] < 0.5, stages
    assert stages["admit"] < 0.5 and stages["prompt"] < 0.5, stages  # the stages around the prefill keep out of it
