"""Limits checked before any model work: each one's status and a message naming the limit and the value."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch

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


def test_the_receiver_prompt_counts_toward_the_input_bytes(stack):
    code, details = refusal(stack, build_request("a" * 1000, mode="aware", receiver_prompt="b" * 1001))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input + receiver_prompt is 2001 bytes" in details


@pytest.mark.parametrize("fields, fragment", [
    ({"route": "r" * 20000}, "route must be at most 128 characters, got 'rrrr"),
    ({"codec": "c" * 20000}, "codec.name must be at most 128 characters"),
    ({"codec": "quantized", "codec_params": " " * (65 << 10)}, "codec.params_json must be at most 65536 bytes, got 66560"),
    ({"route": "nope" * 30}, "unknown route 'nopenope"),  # NOT_FOUND, its name cut short in the message
])
def test_client_strings_are_bounded_and_never_echoed_whole(stack, fields, fragment):
    code, details = refusal(stack, build_request(TEXT, **fields))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and fragment in details and len(details) < 1000


def test_an_unknown_on_cache_failure_value_is_refused_and_tiny_temperatures_sample(stack):
    request = build_request(TEXT, max_new_tokens=2)
    request.on_cache_failure = 7
    code, details = refusal(stack, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "on_cache_failure" in details and "got 7" in details
    stats = run(collect(stack.relay_address, build_request(TEXT, max_new_tokens=3, temperature=1e-40), timeout=30))[-1].stats
    greedy = run(collect(stack.relay_address, build_request(TEXT, max_new_tokens=3), timeout=30))[-1].stats
    assert stats.text == greedy.text  # a vanishing temperature is greedy, not NaN probabilities


def test_metrics_label_only_configured_routes(stack):
    import urllib.request

    for i in range(3):
        refusal(stack, build_request(TEXT, route=f"made-up-{i}"))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['relay']}/metrics", timeout=10).read().decode()
    assert "made-up" not in metrics and 'route="unknown",service="relay"' in metrics.replace('code="NOT_FOUND",', "")


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


def test_the_input_is_tokenized_off_the_event_loop(stack, monkeypatch):
    """Rendering and tokenizing X (tens of ms for a large input) run in a worker thread, not on the sender's
    event loop, which the other requests' streams share; the limits still refuse what breaks them."""
    import threading

    from services.servicers import SenderServicer

    threads = []
    check = SenderServicer.check_limits

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return check(self, *args, **kwargs)

    monkeypatch.setattr(SenderServicer, "check_limits", recording)
    run(collect(stack.relay_address, build_request(TEXT, max_new_tokens=2), timeout=30))
    code, details = refusal(stack, build_request("ann 3 , " * 40, route="random"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_input_tokens" in details
    assert len(threads) == 2 and not any(name.startswith("densecomm-sender") for name in threads), threads


def test_each_service_tokenizes_what_it_reads_once(stack, monkeypatch):
    """The sender counts X's tokens against its limits and prefills those same ids; the receiver counts its
    prompt's tokens against its window and generates from those ids (each tokenized X twice before)."""
    from densecomm_core.models import load_tokenizer
    from densecomm_core.relay import PromptFormat

    tokenizer_class = type(load_tokenizer(zoo_route().sender))  # every service runs in this process
    calls = []
    original = tokenizer_class.__call__

    def recording(self, text, *args, **kwargs):
        calls.append(text if isinstance(text, str) else " | ".join(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", recording)
    events = run(collect(stack.relay_address, build_request(TEXT, mode="unaware", max_new_tokens=2), timeout=30))
    assert any(e.HasField("stats") for e in events)
    assert sum(TEXT in text for text in calls) == 1, calls  # the sender's X
    prompt = PromptFormat().unaware
    assert calls.count(prompt) == 2, calls  # the sender's early window check, the receiver's own


def test_chat_messages_become_the_templates_own_ids(stack):
    """Messages go through the sender's chat template, which writes its own special tokens: one BOS, not the
    template's and the tokenizer's; without a template the contents are joined as plain text, and the Relay
    answers them as it answers that text."""
    import copy

    from densecomm_core.models import load_tokenizer
    from densecomm_core.relay import PromptFormat
    from services.client import relay_pb2
    from services.runtime import input_ids

    words = TEXT.split(" , ")
    request = relay_pb2.RelayRequest(messages=relay_pb2.ChatMessages(
        messages=[relay_pb2.ChatMessage(role="user", content=words[0]), relay_pb2.ChatMessage(role="user", content=" , ".join(words[1:]))]))
    tokenizer = copy.deepcopy(load_tokenizer(zoo_route().sender))
    joined = " ".join(m.content for m in request.messages.messages)
    assert input_ids(request, tokenizer, PromptFormat()) == tokenizer(PromptFormat().sender.format(context=joined))["input_ids"]
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    ids = input_ids(request, tokenizer, PromptFormat())
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, ids
    assert ids == tokenizer(f"{joined} ", add_special_tokens=True)["input_ids"]

    request.mode = relay_pb2.CONTEXT_MODE_UNAWARE
    request.generation.max_new_tokens = 8
    by_messages = run(collect(stack.relay_address, request, timeout=30))
    by_text = run(collect(stack.relay_address, build_request(joined, max_new_tokens=8), timeout=30))
    assert by_messages[-1].stats.text == by_text[-1].stats.text and by_messages[-1].stats.sender_prefill_tokens == len(
        tokenizer(joined)["input_ids"])


def blank_messages():
    from services.client import relay_pb2

    return relay_pb2.RelayRequest(mode=relay_pb2.CONTEXT_MODE_UNAWARE, messages=relay_pb2.ChatMessages(
        messages=[relay_pb2.ChatMessage(role="user", content=""), relay_pb2.ChatMessage(role="user", content="  ")]))


@pytest.mark.parametrize("request_of, message", [
    # each got INTERNAL (or, with on_cache_failure = text, a silent text answer) or named another field before
    (lambda: build_request(TEXT, mode="aware", receiver_prompt="   ", on_cache_failure="text"),
     "receiver_prompt has no tokens for the receiver's tokenizer"),
    (lambda: build_request(TEXT, codec="quantized", codec_params='{"key_bits": 4.0}', on_cache_failure="text"),
     "codec: key_bits must be one of"),
    (lambda: build_request(TEXT, receiver_codec="quantized", receiver_codec_params="{bad"), "receiver_codec.params_json is not valid JSON"),
    (lambda: build_request(TEXT, receiver_codec="q" * 200), "receiver_codec.name must be at most"),
    (blank_messages, "input is empty"),
    # the unaware receiver never read it (it was carried through every hop and ignored)
    (lambda: build_request(TEXT, mode="unaware", receiver_prompt="Answer:"), "receiver_prompt is read only in CONTEXT_MODE_AWARE"),
    (lambda: build_request(TEXT, codec="pca", codec_params='{"strip_rope": false}'), "codec: no KV basis is loaded for cache space"),
], ids=["blank receiver_prompt", "float bits", "receiver_codec json", "receiver_codec name", "blank messages", "unaware receiver_prompt", "pca basis"])
def test_bad_fields_are_invalid_argument_naming_the_field(stack, request_of, message):
    code, details = refusal(stack, request_of())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, (code, details)


def test_a_codec_basis_the_route_lacks_is_refused_before_the_prefill(stack, monkeypatch):
    from services import servicers

    prefills = []
    monkeypatch.setattr(servicers, "sender_prefill", lambda *args, **kwargs: prefills.append(1))
    code, details = refusal(stack, build_request(TEXT, codec="pca", codec_params='{"strip_rope": false}'))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "with RoPE applied" in details and prefills == []


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
    with pytest.raises(ConfigError, match="default_codec_params in the top level must be a dict, got 1"):
        load_config(None, default_codec_params=1)


@pytest.mark.parametrize("toml, message", [
    # each was a bare TypeError, a list read as keys, or a value the services met later (fuzzing the config)
    ('[[routes]]\nname = "r"\nreceiver = "a"\nadapter = "b"', r"routes\[0\] is missing required field\(s\) \['sender'\]"),
    ("routes = [1, 2]", r"routes\[0\] must be a table, got 1"),
    ('[routes]\nname = "a"', r"routes must be an array of tables \(\[\[routes\]\] in TOML\)"),
    ("sender = [1]", r"\[sender\] must be a table"),
    ("relay_port = 70000", r"relay_port must be in \[0, 65535\]"),
    ("metrics_port = 65535", r"metrics_port must be in \[0, 65532\]"),
    ("chunk_tokens = -3", "chunk_tokens .* must be >= 0, got -3"),
    ("drain_grace_s = nan", "drain_grace_s in the top level must be a finite number, got nan"),
    ("token_flush_ms = inf", "token_flush_ms in the top level must be a finite number, got inf"),
    ('host = ""', "host must be an address to bind"),
    ("[sender]\nreplicas = 0", r"\[sender\] replicas must be >= 1, got 0"),
    ("[receiver]\nnum_cpus = -1", r"\[receiver\] num_cpus must be >= 0"),
    ("[sender]\nresources = {x = true}", r"resources: 'x' = True must be a positive number"),
    ('default_route = "r"\n[[routes]]\nname = "r"\nsender = "a"\nreceiver = "b"\nadapter = "c"\ndevice = "cuda:x"',
     "route 'r': device 'cuda:x' must be a torch device"),
    ('default_route = "r"\n[[routes]]\nname = "r"\nsender = "a"\nreceiver = "b"\nadapter = "c"\ncontext_window = -1',
     "route 'r': context_window .* must be >= 0"),
    ('default_route = "r"\n[[routes]]\nname = "r"\nsender = "a"\nreceiver = "b"\nadapter = "c"\nadapter_dtype = "bf16"',
     "route 'r': adapter_dtype 'bf16' must be float32, bfloat16 or float16"),
])
def test_config_refuses_bad_shapes_and_ranges_naming_the_field(tmp_path, toml, message):
    path = tmp_path / "serve.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_config_files_that_cannot_be_read_are_named(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b'host = "\xff"')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "latin1.toml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)


def test_config_checks_policy_and_limits():
    with pytest.raises(ConfigError, match="on_cache_failure"):
        load_config(None, on_cache_failure="maybe")
    with pytest.raises(ConfigError, match="max_in_flight"):
        load_config(None, max_in_flight=0)
    with pytest.raises(ConfigError, match="codec_workers must be >= 1, got 0"):
        load_config(None, codec_workers=0)
    # a value of the wrong type is named at load, not met on every request
    with pytest.raises(ConfigError, match=r"max_in_flight in the top level must be an int, got '64' \(str\)"):
        load_config(None, max_in_flight="64")
    with pytest.raises(ConfigError, match=r"hop_deadline_s in the top level must be a float, got '120'"):
        load_config(None, hop_deadline_s="120")
    with pytest.raises(ConfigError, match=r"relay_port in the top level must be an int, got True \(bool\)"):
        load_config(None, relay_port=True)
    with pytest.raises(ConfigError, match=r"max_input_bytes in routes\[0\] must be an int"):
        load_config(None, routes=[{**zoo_route().__dict__, "max_input_bytes": "3"}])
    assert load_config(None, hop_deadline_s=5).hop_deadline_s == 5  # an int where a float is asked for
    with pytest.raises(ConfigError, match="hop_deadline_s must be > 0 seconds, got 0"):
        load_config(None, hop_deadline_s=0)
    with pytest.raises(ConfigError, match="default_max_new_tokens 100000 must be <= max_new_tokens_limit 4096"):
        load_config(None, default_max_new_tokens=100000)
    # a message must hold any frame of frame_bytes: prefixes, headers and the widest codec output (pca int32)
    with pytest.raises(ConfigError, match=r"max_message_bytes 1048576 must be at least 2 x frame_bytes \+ 64 KiB = 2162688"):
        load_config(None, max_message_bytes=1 << 20)
    assert load_config(None, max_message_bytes=2162688).max_message_bytes == 2162688
    with pytest.raises(ConfigError, match="frame_bytes 4194304"):
        load_config(None, frame_bytes=4 << 20, max_message_bytes=8 << 20)


def test_a_route_whose_models_tokenize_differently_is_refused_at_start(tmp_path):
    """The adapter service maps caches token by token: a route pairing models that cut text differently is a
    ConfigError naming the route when the adapter starts (the serve stack never checked it)."""
    import shutil

    from services.runtime import load_adapter_route

    route = zoo_route()
    other = tmp_path / "receiver"
    shutil.copytree(route.receiver, other)
    config = json.loads((other / "tokenizer.json").read_text())
    config["pre_tokenizer"] = {"type": "Split", "pattern": {"String": ","}, "behavior": "Removed", "invert": False}
    (other / "tokenizer.json").write_text(json.dumps(config))
    bad = load_config(None, routes=[route.__dict__, route.__dict__ | {"name": "mixed", "receiver": str(other)}]).route("mixed")
    with pytest.raises(ConfigError, match="route 'mixed': .* tokenize text differently"):
        load_adapter_route(bad)
    load_adapter_route(load_config(None).route("zoo"))  # the zoo's pair shares its tokenizer


def test_a_route_runs_its_adapter_in_its_adapter_dtype():
    """``adapter_dtype`` casts T_θ (float32 unless a route asks), whatever the models' dtype."""
    from services.runtime import load_adapter_route

    route = zoo_route()
    assert load_adapter_route(route).adapter.gate_logit.dtype == torch.float32
    bf16 = load_config(None, routes=[route.__dict__ | {"adapter_dtype": "bfloat16"}]).route("zoo")
    loaded = load_adapter_route(bf16)
    assert {p.dtype for p in loaded.adapter.parameters()} == {torch.bfloat16}
    assert loaded.sender.dtype == torch.float32  # the models keep the route's dtype
