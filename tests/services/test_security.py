"""TLS on the Relay, mTLS + shared secret on internal hops, bearer tokens: who gets in, with which status."""

from __future__ import annotations

import grpc
import pytest

from densecomm_core.zoo import tasks
from services import security
from services.client import TLSOptions, build_request, relay_once
from services.config import ConfigError, load_config, zoo_route
from services.stack import LocalStack, ServiceHost
from tests.services.conftest import run

TEXT = tasks.make_split("test", 1)[0].context
GOOD, ZOO_ONLY, SECRET = "good-token-0123456789abcdef", "zoo-only-token-0123456789", "internal-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return security.write_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_stack(pki, random_route, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets")
    (folder / "tokens").write_text(f"# comment\n{GOOD}\n{ZOO_ONLY} zoo\n")
    (folder / "internal").write_text(SECRET + "\n")
    config = load_config(None, relay_port=0, routes=[zoo_route().__dict__, random_route],
                         tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                         internal_tls_cert_file=pki["server_cert"], internal_tls_key_file=pki["server_key"],
                         internal_tls_ca_file=pki["ca"], internal_secret_file=str(folder / "internal"),
                         auth_tokens_file=str(folder / "tokens"))
    with LocalStack(config) as stack:
        yield stack


def relay_status(address, token=None, tls=None, route="") -> grpc.StatusCode:
    try:
        run(relay_once(address, TEXT, timeout=30, token=token, tls=tls, route=route, max_new_tokens=4))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_good_token_over_tls_passes_every_hop(secure_stack, pki):
    stats = run(relay_once(secure_stack.relay_address, TEXT, timeout=30, token=GOOD, tls=TLSOptions(ca_file=pki["ca"]), max_new_tokens=8))
    assert stats.text and [h.hop for h in stats.hops] == ["sender->adapter", "adapter->receiver"]  # mTLS + secret inside


def test_missing_wrong_or_out_of_scope_token_is_refused(secure_stack, pki):
    tls = TLSOptions(ca_file=pki["ca"])
    assert relay_status(secure_stack.relay_address, None, tls) == grpc.StatusCode.UNAUTHENTICATED
    assert relay_status(secure_stack.relay_address, GOOD[:-1] + "X", tls) == grpc.StatusCode.UNAUTHENTICATED
    assert relay_status(secure_stack.relay_address, ZOO_ONLY, tls, route="random") == grpc.StatusCode.PERMISSION_DENIED
    assert relay_status(secure_stack.relay_address, ZOO_ONLY, tls, route="zoo") == grpc.StatusCode.OK


def test_plaintext_client_is_refused_by_the_tls_relay(secure_stack):
    assert relay_status(secure_stack.relay_address, GOOD) == grpc.StatusCode.UNAVAILABLE


def test_internal_services_refuse_strangers(secure_stack, pki, tmp_path):
    from services.servicers import kv_pb2, kv_pb2_grpc

    setup = kv_pb2.HopSetup(request_id="stranger", request=build_request(TEXT))

    async def prefill(make_channel, metadata=()) -> grpc.StatusCode:
        try:
            async with make_channel() as channel:
                [e async for e in kv_pb2_grpc.SenderStub(channel).Prefill(setup, timeout=10, metadata=metadata)]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    sender = secure_stack.hosts["sender"].address
    assert run(prefill(lambda: grpc.aio.insecure_channel(sender))) == grpc.StatusCode.UNAVAILABLE  # no TLS at all
    other = security.write_test_pki(tmp_path / "other")  # a certificate from another CA: handshake fails
    assert run(prefill(lambda: security.client_channel(sender, pki["ca"], other["client_cert"], other["client_key"]))) == grpc.StatusCode.UNAVAILABLE
    # the stack's certificate but not its secret (e.g. a leaked cert): still refused
    good_cert = lambda: security.client_channel(sender, pki["ca"], pki["client_cert"], pki["client_key"])  # noqa: E731
    assert run(prefill(good_cert)) == grpc.StatusCode.UNAUTHENTICATED
    assert run(prefill(good_cert, ((security.SECRET_HEADER, SECRET[:-1] + "X"),))) == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_without_credentials(secure_stack, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def check():
        async with security.client_channel(secure_stack.relay_address, pki["ca"]) as channel:
            return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)).status

    assert run(check()) == health_pb2.HealthCheckResponse.SERVING


def test_relay_mtls_needs_a_client_certificate(pki):
    config = load_config(None, relay_port=0, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"])
    host = ServiceHost("relay", config, ["127.0.0.1:9"])  # no downstream: a call that gets in ends UNAVAILABLE downstream
    try:
        with_cert = TLSOptions(pki["ca"], pki["client_cert"], pki["client_key"])
        assert relay_status(host.address, tls=TLSOptions(ca_file=pki["ca"])) == grpc.StatusCode.UNAVAILABLE  # handshake refused
        try:
            run(relay_once(host.address, TEXT, timeout=10, tls=with_cert))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "downstream" in exc.details()  # got in; the sender is absent
    finally:
        host.stop(grace=0)


def test_tokens_from_a_secret_mount_and_the_environment(tmp_path, monkeypatch):
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "alice").write_text("alice-token-0123456789\n")
    (mount / "bob").write_text("bob-token-0123456789 zoo other\n")
    (mount / "..data").write_text("ignored: Kubernetes' own bookkeeping entries start with a dot\n")
    monkeypatch.setenv(security.TOKENS_ENV, "carol-token-0123456789:zoo+x")
    zoo = zoo_route().__dict__
    routes = [zoo, {**zoo, "name": "other"}, {**zoo, "name": "x"}]
    tokens = security.load_tokens(load_config(None, auth_tokens_file=str(mount), routes=routes))
    assert [(t.secret.decode(), sorted(t.routes)) for t in tokens] == [
        ("alice-token-0123456789", []), ("bob-token-0123456789", ["other", "zoo"]), ("carol-token-0123456789", ["x", "zoo"])]
    monkeypatch.setenv(security.TOKENS_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        security.load_tokens(load_config(None))
    (tmp_path / "empty").write_text("# nothing\n")
    monkeypatch.delenv(security.TOKENS_ENV)
    with pytest.raises(ConfigError, match="holds no token"):
        security.load_tokens(load_config(None, auth_tokens_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="together"):
        security.server_credentials("relay", load_config(None, tls_cert_file="x.pem"))


GOOD = "alice-token-0123456789"


@pytest.mark.parametrize("lines, env, message", [
    # fuzzing the token config: each loaded before, and two of them widened a token to every route
    ([f"{GOOD} zoo", GOOD], "", "this token is also given at"),  # the last scope won: every route
    ([f"{GOOD} zoo"], f"{GOOD}", "this token is also given at"),
    ([], f"{GOOD}:", "'TOKEN:' names no route"),  # an empty scope meant every route
    ([], f"{GOOD}:+", "'TOKEN:' names no route"),
    ([f"{GOOD} zo0"], "", r"scope names unknown route\(s\) \['zo0'\]"),  # a typo: the token could use nothing
    ([f"{GOOD} zoo # only zoo"], "", r"unknown route\(s\) \['#', 'only'\]"),
    (["tökentökentöken-0123"], "", "printable ASCII"),  # no client can send it in a header
    (["t" * 5000], "", "at most 4096 characters"),
])
def test_token_configs_that_would_widen_or_break_access_are_refused(tmp_path, monkeypatch, lines, env, message):
    path = tmp_path / "tokens"
    path.write_text("\n".join(lines) + "\n" if lines else "")
    monkeypatch.setenv(security.TOKENS_ENV, env)
    config = load_config(None, auth_tokens_file=str(path) if lines else "")
    with pytest.raises(ConfigError, match=message):
        security.load_tokens(config)


def test_token_files_split_on_any_whitespace_and_drop_a_bom(tmp_path, monkeypatch):
    monkeypatch.delenv(security.TOKENS_ENV, raising=False)
    path = tmp_path / "tokens"
    path.write_bytes(b"\xef\xbb\xbf" + f"{GOOD}\tzoo\n".encode())  # the tab was part of the token, the BOM too
    (token,) = security.load_tokens(load_config(None, auth_tokens_file=str(path)))
    assert token.secret == GOOD.encode() and token.routes == {"zoo"}
    path.write_bytes(b"\xff" * 20)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        security.load_tokens(load_config(None, auth_tokens_file=str(path)))


def test_an_empty_internal_secret_file_does_not_turn_the_internal_auth_off(tmp_path, monkeypatch):
    monkeypatch.delenv(security.SECRET_ENV, raising=False)
    path = tmp_path / "secret"
    for content in ("", "  \n\t\n"):
        path.write_text(content)
        with pytest.raises(ConfigError, match="is empty: the internal hops would take any caller"):
            security.internal_secret(load_config(None, internal_secret_file=str(path)))
    path.write_text("secret with a space inside-0123456789")
    with pytest.raises(ConfigError, match="printable ASCII"):
        security.internal_secret(load_config(None, internal_secret_file=str(path)))
    path.write_text("internal-secret-0123456789\n")
    assert security.internal_secret(load_config(None, internal_secret_file=str(path))) == b"internal-secret-0123456789"


def test_tls_files_that_hold_no_pem_or_do_not_match_name_the_field(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_cert_file .* holds no PEM certificate"):
        security.server_credentials("relay", load_config(None, tls_cert_file=str(garbage), tls_key_file=pki["server_key"]))
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ConfigError, match="tls_client_ca_file .* holds no PEM certificate"):  # refused every client, silently
        security.server_credentials("relay", load_config(None, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                                                         tls_client_ca_file=str(empty)))
    with pytest.raises(ConfigError, match="internal_tls_server_name is set but internal mTLS is not"):  # was ignored
        security.internal_tls(load_config(None, internal_tls_server_name="densecomm"))
    config = load_config(None, relay_port=0, tls_cert_file=pki["server_cert"], tls_key_file=pki["client_key"])  # another cert's key
    import threading

    before = set(threading.enumerate())
    with pytest.raises(ConfigError, match="tls_key_file .* is not the key of the certificate in tls_cert_file"):
        ServiceHost("relay", config, ["127.0.0.1:9"])
    assert not [t for t in set(threading.enumerate()) - before if t.name == "densecomm-relay"]  # its loop thread stopped


def test_a_bad_security_file_is_named_before_any_service_loads_a_model(tmp_path, monkeypatch):
    """The Relay starts last (its downstream first): a bad token file used to surface only after the receiver,
    adapter and sender had loaded their models."""
    from services import stack as stack_module

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{GOOD} no-such-route\n")
    built = []
    monkeypatch.setattr(stack_module, "make_servicer", lambda kind, *args, **kwargs: built.append(kind))
    with pytest.raises(ConfigError, match="no-such-route"):
        LocalStack(load_config(None, relay_port=0, auth_tokens_file=str(tokens)))
    assert built == []
    key = tmp_path / "internal.key"
    key.write_text("no key here")
    pki_files = security.write_test_pki(tmp_path / "pki")
    with pytest.raises(ConfigError, match="internal_tls_key_file"):
        LocalStack(load_config(None, relay_port=0, internal_tls_cert_file=pki_files["server_cert"],
                               internal_tls_key_file=str(key), internal_tls_ca_file=pki_files["ca"]))
    # a key of another certificate, and a certificate block whose body is not one (gRPC found both only when it
    # bound the port, after the models had loaded)
    with pytest.raises(ConfigError, match="tls_key_file .* is not the key of the certificate in tls_cert_file"):
        LocalStack(load_config(None, relay_port=0, tls_cert_file=pki_files["server_cert"], tls_key_file=pki_files["client_key"]))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="internal_tls_ca_file .* not a valid certificate"):
        LocalStack(load_config(None, relay_port=0, internal_tls_cert_file=pki_files["server_cert"],
                               internal_tls_key_file=pki_files["server_key"], internal_tls_ca_file=str(garbage)))
    assert built == []
