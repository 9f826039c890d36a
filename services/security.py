"""Who may call the services: TLS on the public Relay, mTLS and a shared secret on internal hops, bearer tokens.

    server_credentials(kind, config)     TLS credentials of one service's port (None = plaintext)
    server_interceptors(kind, config)    RelayAuth on the Relay ingress, InternalAuth on sender/adapter/receiver
    internal_channel(address, ...)       a channel to the next service: mTLS when configured, secret attached
    load_tokens(config)                  Relay bearer tokens from a file, a secret mount and/or the environment
    client_channel(address, ...)         a client's channel to Relay (TLS / mTLS when given)
    write_test_pki(directory)            a CA and certificates for 127.0.0.1 (tests and `bench load` only)

Everything here is off by default (the local quick start binds loopback only). Tokens and the secret are
compared in constant time (``hmac.compare_digest``); health checking and reflection stay open so probes
work without credentials. A missing or unknown token is UNAUTHENTICATED, a known token used on a route it
is not allowed is PERMISSION_DENIED, an internal call without the stack's secret is UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.config import ConfigError, ServeConfig

log = logging.getLogger(__name__)
TOKENS_ENV = "DENSECOMM_AUTH_TOKENS"  # comma-separated Relay tokens (each "TOKEN" or "TOKEN:route1+route2")
SECRET_ENV = "DENSECOMM_INTERNAL_SECRET"  # the internal hops' shared secret
SECRET_HEADER = "x-densecomm-internal"
GUARDED_PREFIX = "/densecomm.v1."  # our RPCs; grpc.health and reflection are not guarded

# A check runs before a handler: it gets the call's context and (for unary requests) the request, and
# returns None to let the call through or (status, details) to refuse it.
Check = Callable[[grpc.aio.ServicerContext, object], Awaitable[tuple[grpc.StatusCode, str] | None]]


def guard_handler(handler: grpc.RpcMethodHandler, check: Check, after: Callable[[], None] | None = None,
                  refused: Callable[[grpc.StatusCode], None] | None = None) -> grpc.RpcMethodHandler:
    """The same handler with ``check`` run first (refusals abort with its status, reported to
    ``refused``); ``after`` runs when an admitted call ends, however it ends. Works for the
    streaming-response methods our services have."""
    if handler.unary_stream is not None:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_stream is not None:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    else:
        return handler

    async def guarded(request, context):
        refusal = await check(context, request if handler.request_streaming is False else None)
        if refusal is not None:
            if refused is not None:
                refused(refusal[0])
            await context.abort(*refusal)
        try:
            async for response in behavior(request, context):
                yield response
        finally:
            if after is not None:
                after()

    return make(guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path!r} cannot be read: {exc.strerror}") from exc


def _pem(path: str, what: str, kind: str) -> bytes:
    """A PEM file's bytes, refused here when it holds no ``kind`` block ("CERTIFICATE" or "PRIVATE KEY"): gRPC
    itself would only fail to bind, naming neither the field nor the file."""
    data = _read(path, what)
    if b"-----BEGIN " not in data or f"{kind}-----".encode() not in data:
        raise ConfigError(f"{what} {path!r} holds no PEM {kind.lower()} (expected a '-----BEGIN ...{kind}-----' block)")
    return data


def _certificates(path: str, what: str) -> list:
    """The PEM certificates of a file, parsed: a block whose body is not a certificate is named here."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(_pem(path, what, "CERTIFICATE"))
    except ValueError as exc:
        raise ConfigError(f"{what} {path!r} holds a PEM block that is not a valid certificate: {exc}") from exc


def _check_pair(cert_field: str, key_field: str, config: ServeConfig) -> None:
    """The certificate (its first, the leaf) and the private key parse and belong together: gRPC takes any
    pair when the server is built and fails only when it binds, after the models have loaded."""
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = getattr(config, cert_field), getattr(config, key_field)
    leaf = _certificates(cert_path, cert_field)[0]
    try:
        key = serialization.load_pem_private_key(_pem(key_path, key_field, "PRIVATE KEY"), password=None)
    except (ValueError, TypeError) as exc:  # TypeError: a key that needs a password
        raise ConfigError(f"{key_field} {key_path!r} is not an unencrypted PEM private key: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(f"{key_field} {key_path!r} is not the key of the certificate in {cert_field} {cert_path!r}")


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    secret: bytes
    routes: frozenset[str] = frozenset()  # empty = every route


MAX_SECRET_CHARS = 4096  # a bearer token or the internal secret travels in a header (gRPC's metadata limit: 8 KiB)


def check_header_secret(secret: str, where: str, what: str) -> None:
    """A token or secret a client can send as it is: printable ASCII without spaces, 16 to 4096 characters."""
    if len(secret) < 16:
        raise ConfigError(f"{where}: {what} must be at least 16 characters, got {len(secret)}")
    if len(secret) > MAX_SECRET_CHARS:
        raise ConfigError(f"{where}: {what} must be at most {MAX_SECRET_CHARS} characters (it travels in a header), got {len(secret)}")
    if not all("!" <= c <= "~" for c in secret):
        raise ConfigError(f"{where}: {what} must be printable ASCII without spaces (it travels in a header)")


def parse_token(text: str, where: str, routes_known: tuple[str, ...] | None = None, environment: bool = False) -> Token:
    """``TOKEN`` or ``TOKEN route1 route2`` (a file's line, split on whitespace) / ``TOKEN`` or
    ``TOKEN:route1+route2`` (an item of the environment variable). A scope names at least one route, each one
    of ``routes_known`` (None: not checked): an empty scope would mean every route, a misspelt one none."""
    if environment:
        secret, colon, rest = text.strip().partition(":")
        scope = rest.replace("+", " ").split()
        if colon and not scope:
            raise ConfigError(f"{where}: 'TOKEN:' names no route; give TOKEN alone for every route, or TOKEN:route1+route2")
    else:
        secret, *scope = text.split()
    check_header_secret(secret, where, "a Relay token")
    unknown = sorted(set(scope) - set(routes_known)) if routes_known is not None else []
    if unknown:
        raise ConfigError(f"{where}: the token's scope names unknown route(s) {unknown}; the routes are {sorted(routes_known)}")
    return Token(secret.encode(), frozenset(scope))


def load_tokens(config: ServeConfig) -> tuple[Token, ...]:
    """Tokens from ``auth_tokens_file`` (a file with one per line, or a directory such as a Kubernetes
    secret mount where every file holds one) and from $DENSECOMM_AUTH_TOKENS. Empty = auth off. A token given
    twice is refused (which scope would hold?), as is a scope naming a route the config does not have."""
    routes = tuple(r.name for r in config.all_routes())
    found: list[tuple[Token, str]] = []
    if config.auth_tokens_file:
        path = Path(config.auth_tokens_file)
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
        for file in files:
            try:
                text = _read(str(file), "auth_tokens_file").decode("utf-8-sig")  # a BOM is not part of a token
            except UnicodeDecodeError as exc:
                raise ConfigError(f"auth_tokens_file {str(file)!r} is not UTF-8 text: {exc}") from exc
            for n, line in enumerate(text.splitlines()):
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append((parse_token(line, f"{file}:{n + 1}", routes), f"{file}:{n + 1}"))
        if not found:
            raise ConfigError(f"auth_tokens_file {config.auth_tokens_file!r} holds no token (auth would refuse every call)")
    for i, item in enumerate(t for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip()):
        found.append((parse_token(item, f"${TOKENS_ENV}[{i}]", routes, environment=True), f"${TOKENS_ENV}[{i}]"))
    seen: dict[bytes, str] = {}
    for token, where in found:
        if token.secret in seen:
            raise ConfigError(f"{where}: this token is also given at {seen[token.secret]}; give each token once, with one scope")
        seen[token.secret] = where
    return tuple(token for token, _ in found)


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, credential = str(value).partition(" ")
            return credential.strip() if scheme.lower() == "bearer" and credential.strip() else ""
    return None


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs ``self.check(request, context)`` before each of our RPCs (not health or
    reflection); a subclass supplies ``check`` and sets ``self.refused``."""

    refused: Callable[[grpc.StatusCode], None] | None = None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_PREFIX):
            return handler
        return guard_handler(handler, self.check, refused=self.refused)


class RelayAuth(GuardInterceptor):
    """Bearer-token auth on the public Relay API (the ``authorization: Bearer <token>`` metadata)."""

    def __init__(self, tokens: tuple[Token, ...], default_route: str, refused=None) -> None:
        self.tokens, self.default_route, self.refused = tokens, default_route, refused

    def match(self, credential: str) -> Token | None:
        found = None
        for token in self.tokens:  # no early exit: the time taken does not say which token matched
            if hmac.compare_digest(token.secret, credential.encode()):
                found = token
        return found

    async def check(self, context, request):
        credential = bearer(context.invocation_metadata())
        if credential is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
        token = self.match(credential)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid"
        route = getattr(request, "route", "") or self.default_route
        if token.routes and route not in token.routes:
            return grpc.StatusCode.PERMISSION_DENIED, f"this token may not use route {route!r} (allowed: {sorted(token.routes)})"
        return None


# ---------------------------------------------------------------- internal hops


def internal_secret(config: ServeConfig) -> bytes | None:
    """The shared secret of the internal hops: ``internal_secret_file`` or $DENSECOMM_INTERNAL_SECRET."""
    if config.internal_secret_file:
        where = f"internal_secret_file {config.internal_secret_file!r}"
        try:
            secret = _read(config.internal_secret_file, "internal_secret_file").decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where} is not UTF-8 text: {exc}") from exc
        if not secret:  # a configured secret that is empty must not turn the internal auth off
            raise ConfigError(f"{where} is empty: the internal hops would take any caller")
    else:
        where, secret = f"${SECRET_ENV}", os.environ.get(SECRET_ENV, "").strip()
    if secret:
        check_header_secret(secret, where, "the internal secret")
    return secret.encode() or None


class InternalAuth(GuardInterceptor):
    """Internal services answer only callers that present the stack's shared secret."""

    def __init__(self, secret: bytes, refused=None) -> None:
        self.secret, self.refused = secret, refused

    async def check(self, context, request):
        presented = next((str(v) for k, v in context.invocation_metadata() or () if k == SECRET_HEADER), "")
        if not hmac.compare_digest(self.secret, presented.encode()):
            return grpc.StatusCode.UNAUTHENTICATED, "internal service: the caller is not part of this stack (no or wrong internal secret)"
        return None


def _with_secret(details, secret: bytes):
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()), (SECRET_HEADER, secret.decode()))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# One class per call shape: a grpc.aio channel files each interceptor under the first shape it matches.
class _SecretUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_secret(details, self.secret), request)


class _SecretStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_secret(details, self.secret), request_iterator)


def internal_tls(config: ServeConfig) -> bool:
    fields = (config.internal_tls_cert_file, config.internal_tls_key_file, config.internal_tls_ca_file)
    if any(fields) and not all(fields):
        raise ConfigError("internal mTLS needs internal_tls_cert_file, internal_tls_key_file and internal_tls_ca_file together")
    if config.internal_tls_server_name and not all(fields):
        raise ConfigError("internal_tls_server_name is set but internal mTLS is not (it names the certificates' host)")
    return all(fields)


def internal_channel(address: str, options: list, config: ServeConfig) -> grpc.aio.Channel:
    """A channel to the next service of the stack: mTLS when configured, the secret on every call."""
    secret = internal_secret(config)
    interceptors = [_SecretUnaryStream(secret), _SecretStreamStream(secret)] if secret else None
    if internal_tls(config):
        credentials = grpc.ssl_channel_credentials(
            _pem(config.internal_tls_ca_file, "internal_tls_ca_file", "CERTIFICATE"),
            _pem(config.internal_tls_key_file, "internal_tls_key_file", "PRIVATE KEY"),
            _pem(config.internal_tls_cert_file, "internal_tls_cert_file", "CERTIFICATE"))
        if config.internal_tls_server_name:
            options = [*options, ("grpc.ssl_target_name_override", config.internal_tls_server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


# ---------------------------------------------------------------- servers


def server_credentials(kind: str, config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS of the Relay port (``tls_*``; mTLS with ``tls_client_ca_file``) or of an internal port
    (``internal_tls_*``: always mutual). None = plaintext."""
    if kind == "relay":
        if bool(config.tls_cert_file) != bool(config.tls_key_file):
            raise ConfigError("Relay TLS needs tls_cert_file and tls_key_file together")
        if config.tls_client_ca_file and not config.tls_cert_file:
            raise ConfigError("tls_client_ca_file (client certificates) needs tls_cert_file and tls_key_file")
        if not config.tls_cert_file:
            return None
        ca = _pem(config.tls_client_ca_file, "tls_client_ca_file", "CERTIFICATE") if config.tls_client_ca_file else None
        pair = (_pem(config.tls_key_file, "tls_key_file", "PRIVATE KEY"), _pem(config.tls_cert_file, "tls_cert_file", "CERTIFICATE"))
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
    if not internal_tls(config):
        return None
    pair = (_pem(config.internal_tls_key_file, "internal_tls_key_file", "PRIVATE KEY"),
            _pem(config.internal_tls_cert_file, "internal_tls_cert_file", "CERTIFICATE"))
    return grpc.ssl_server_credentials([pair], root_certificates=_pem(config.internal_tls_ca_file, "internal_tls_ca_file", "CERTIFICATE"),
                                       require_client_auth=True)


def server_interceptors(kind: str, config: ServeConfig, refused=None) -> list[grpc.aio.ServerInterceptor]:
    """Auth of one service's port; ``refused(status)`` hears of every call it turns away (metrics)."""
    if kind == "relay":
        tokens = load_tokens(config)
        return [RelayAuth(tokens, config.default_route, refused)] if tokens else []
    secret = internal_secret(config)
    return [InternalAuth(secret, refused)] if secret else []


def add_port(server: grpc.aio.Server, address: str, kind: str, config: ServeConfig) -> int:
    credentials = server_credentials(kind, config)
    if credentials is None:
        return server.add_insecure_port(address)
    try:
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # gRPC's "Failed to bind": a certificate it cannot parse, or a key of another certificate
        files = ("tls_cert_file", "tls_key_file") if kind == "relay" else ("internal_tls_cert_file", "internal_tls_key_file")
        raise ConfigError(f"{kind}: cannot serve TLS on {address} with {files[0]} {getattr(config, files[0])!r} and {files[1]} "
                          f"{getattr(config, files[1])!r}: the certificate and the key must be valid PEM and belong together, "
                          f"or the address is taken (gRPC: {exc})") from exc


def check_files(kind: str, config: ServeConfig) -> None:
    """Read and check every security file and variable a ``kind`` service reads when it starts (the Relay's
    tokens and TLS files, the internal secret, the internal mTLS files), raising the ``ConfigError`` its start
    would raise: the stacks call it for every service before any of them loads a model."""
    server_credentials(kind, config)
    server_interceptors(kind, config)
    if kind == "relay" and config.tls_cert_file:
        _check_pair("tls_cert_file", "tls_key_file", config)
        if config.tls_client_ca_file:
            _certificates(config.tls_client_ca_file, "tls_client_ca_file")
    internal_secret(config)  # the secret and mTLS files of the channel to the next service
    if internal_tls(config):
        _check_pair("internal_tls_cert_file", "internal_tls_key_file", config)
        _certificates(config.internal_tls_ca_file, "internal_tls_ca_file")


# ---------------------------------------------------------------- clients


def client_channel(address: str, ca_file: str = "", cert_file: str = "", key_file: str = "", server_name: str = "",
                   options: list | None = None, tls: bool = False) -> grpc.aio.Channel:
    """A Relay client's channel: plaintext unless ``tls`` or any TLS file / name is given; then TLS
    trusting ``ca_file`` (empty = the system roots), mTLS with ``cert_file`` + ``key_file``."""
    options = list(options or [])
    if not (tls or ca_file or cert_file or server_name):
        return grpc.aio.insecure_channel(address, options=options)
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    credentials = grpc.ssl_channel_credentials(
        Path(ca_file).read_bytes() if ca_file else None,
        Path(key_file).read_bytes() if key_file else None,
        Path(cert_file).read_bytes() if cert_file else None)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def write_test_pki(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, str]:
    """A throw-away CA plus a server and a client certificate it signed, valid for ``hosts``, as PEM
    files in ``directory``: {ca, server_cert, server_key, client_cert, client_key} -> path. For tests
    and benchmarks on loopback, never for a deployment."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, usage=None) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer)).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            sans = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h) for h in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, certificate, key) -> tuple[str, str]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("densecomm test CA", ca_key, "densecomm test CA", ca_key, ca=True)
    paths = {"ca": write("ca", ca_cert, ca_key)[0]}
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # internal services are both
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{stem}_cert"], paths[f"{stem}_key"] = write(stem, cert(f"densecomm {stem}", key, "densecomm test CA", ca_key, False, both), key)
    return paths
