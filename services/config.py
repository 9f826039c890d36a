"""The typed service configuration, read once from a TOML file (or defaults) at start-up and passed down.

Example (``densecomm serve --config serve.toml``)::

    host = "127.0.0.1"
    relay_port = 50051
    default_route = "zoo"
    default_codec = "lossless"
    default_codec_params = { level = 1 }   # optional: zstd level 1 (more ratio, more CPU) for a slow link

    [[routes]]
    name = "qwen3-14b-to-4b"
    sender = "/models/Qwen3-14B"
    receiver = "/models/Qwen3-4B"
    adapter = "/adapters/14b-to-4b"
    dtype = "bfloat16"
    device = "cuda"

    [sender]
    num_gpus = 1
    resources = {densecomm_sender = 1}   # Ray custom resource: lands on the KubeRay sender group
    [receiver]
    num_gpus = 1
    resources = {densecomm_receiver = 1}
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from densecomm_core.codec import CodecError, get_codec
from densecomm_core.errors import DenseCommError


class ConfigError(DenseCommError, ValueError):
    """The service configuration names a missing file, an unknown field or a bad value."""


@dataclass(frozen=True)
class RouteConfig:
    """A sender/receiver pair and the adapter trained for it."""

    name: str
    sender: str
    receiver: str
    adapter: str
    dtype: str = "float32"  # float32 | bfloat16 | float16: both models' weights and caches
    device: str = "cpu"
    # T_θ's weights and matmuls (RoPE is removed and restored in float32 either way). bfloat16 runs the MLPs on
    # bf16 units (tensor cores; AVX512-BF16 / AMX on a CPU) at bf16 rounding of the receiver's cache.
    adapter_dtype: str = "float32"
    # Per-route limits and policy; 0 / "" = the service-wide value of the same name (see ServeConfig).
    max_input_bytes: int = 0
    max_input_tokens: int = 0
    max_cache_bytes: int = 0
    context_window: int = 0  # tokens the receiver attends over (0 = the checkpoints' max_position_embeddings)
    on_cache_failure: str = ""  # "error" | "text"; a request's own on_cache_failure wins


@dataclass(frozen=True)
class Resources:
    """Ray resources of one service (each replica is one actor)."""

    num_cpus: float = 0.5  # logical CPUs; four services fit a 2-core laptop
    num_gpus: float = 0.0
    replicas: int = 1  # the relay ingress always runs one
    # Ray custom resources each actor asks for, e.g. {densecomm_sender = 1}: under KubeRay every pod of a
    # worker group advertises its role's resource (rayStartParams), so the actors land on that group.
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # where internal services bind: loopback unless spread over nodes;
    # "node-ip" = each Ray actor binds the IP of its own Ray node (the pod IP under KubeRay)
    relay_host: str = ""  # where the public Relay ingress binds (empty = host); 0.0.0.0 in a pod
    relay_port: int = 50051  # public Relay API; 0 = pick a free port
    metrics_port: int = 0  # relay's metrics port, then sender +1, adapter +2, receiver +3; 0 = free ports
    routes: tuple[RouteConfig, ...] = ()  # empty = the embedded zoo route
    default_route: str = "zoo"
    default_codec: str = "lossless"
    # The default codec's parameters for this deployment, e.g. {level = 1} (lossless: better ratio, more CPU) for
    # a slow link; a request's own params_json for that codec overrides them key by key. Checked at load.
    default_codec_params: dict = field(default_factory=dict)
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 4096
    chunk_tokens: int = 0  # tokens per chunk (0 = sized by frame_bytes)
    # Target bytes of one KV stream message: a layer whose chunk is bigger is split into token ranges,
    # consecutive smaller frames share a message. The default is the best message size of the bare gRPC
    # byte stream that `densecomm bench relay` measures (its "bare gRPC byte stream by message size" table).
    frame_bytes: int = 1 << 20
    # Threads that encode a big cache's chunks in parallel in the sender (zstd, xxh3 and numpy release the
    # GIL; at most 2 x this many frames ahead). 1 keeps a 2-core laptop's four services from contending; a
    # GPU node whose sender prefills in milliseconds wants several (lossless encode: ~0.6 GB/s per thread here).
    codec_workers: int = 1
    max_message_bytes: int = 64 << 20  # gRPC send/receive limit per message (one frame)
    max_cache_bytes: int = 4 << 30  # KV bytes per request: the sender's estimate before prefill, every decoder
    hop_deadline_s: float = 120.0  # deadline of every internal call (never later than the client's own)
    # How KV frames cross a hop (services/shm.py): "auto" = in shared memory when both ends are on one node
    # (same boot id and IPC namespace, proved by a probe segment in the hop setup; the gRPC stream then
    # carries references), else inside the gRPC messages; "bytes" = always inside the gRPC messages.
    hop_transport: str = "auto"
    shm_pool_bytes: int = 256 << 20  # shared memory a sending service keeps for frames in flight; beyond it, bytes
    shm_min_bytes: int = 64 << 10  # smaller messages stay bytes even on the shortcut (a reference saves nothing)
    # --- limits, checked before any model work starts (services/limits.py); routes may lower them ---
    max_input_bytes: int = 256 << 10  # UTF-8 bytes of the input X (text or messages) -> INVALID_ARGUMENT
    max_input_tokens: int = 8192  # cap on X's tokens; the limit is the smaller of this and both models' windows
    max_in_flight: int = 64  # calls a service holds at once (running + queued); one more -> RESOURCE_EXHAUSTED
    prefill_chunk_tokens: int = 512  # the sender prefills in pieces of this many tokens, checking for cancellation
    on_cache_failure: str = "error"  # "error" | "text": when the cache path fails, the receiver reads X itself
    drain_grace_s: float = 10.0  # SIGTERM: NOT_SERVING, refuse new calls, let in-flight ones finish this long
    # The receiver sends an answer's first token at once, then at most one internal message per this many ms with
    # the tokens generated meanwhile (clients still get one event per token from the Relay): each message costs
    # the receiver's event loop interpreter-lock hand-offs with its decoding thread. 0: only tokens that are
    # ready together share a message.
    token_flush_ms: float = 20.0
    # --- security, all off by default (the local quick start binds loopback only; services/security.py) ---
    tls_cert_file: str = ""  # PEM certificate of the public Relay port; with tls_key_file the Relay serves TLS
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # PEM CA: Relay clients must present a certificate it signed (mTLS)
    internal_tls_cert_file: str = ""  # PEM certificate each internal service presents as server and as client
    internal_tls_key_file: str = ""
    internal_tls_ca_file: str = ""  # the CA of the internal certificates; the three together = mTLS on every hop
    internal_tls_server_name: str = ""  # name to verify in internal certificates (empty = the address's host)
    internal_secret_file: str = ""  # shared secret on every internal call ($DENSECOMM_INTERNAL_SECRET otherwise)
    auth_tokens_file: str = ""  # Relay bearer tokens: a file, one "TOKEN [route ...]" per line, or a directory
    # (a Kubernetes secret mount: one token per file); $DENSECOMM_AUTH_TOKENS adds "TOKEN[:route+route]" items
    sender: Resources = field(default_factory=Resources)
    adapter: Resources = field(default_factory=Resources)
    receiver: Resources = field(default_factory=Resources)
    relay: Resources = field(default_factory=lambda: Resources(num_cpus=0.25))

    def route(self, name: str) -> RouteConfig:
        for route in self.all_routes():
            if route.name == name:
                return route
        raise KeyError(name)

    def all_routes(self) -> tuple[RouteConfig, ...]:
        return self.routes or (zoo_route(),)


FRAME_HEADROOM = 64 << 10  # a message's frame prefixes and codec section headers, with room to spare


def message_bytes_needed(frame_bytes: int) -> int:
    """The smallest ``max_message_bytes`` that carries any frame of ``frame_bytes`` of cache: the widest codec
    output (pca's 32-bit codes) is twice a bf16 chunk, plus its prefix and section headers."""
    return 2 * frame_bytes + FRAME_HEADROOM


def zoo_route(suite: str = "v1") -> RouteConfig:
    """The committed zoo pair of ``suite`` as a route named "zoo" (v1: the default route)."""
    from densecomm_core.zoo.pair import zoo_adapter_dir, zoo_model_dirs

    sender_dir, receiver_dir = zoo_model_dirs(suite=suite)
    return RouteConfig("zoo", str(sender_dir), str(receiver_dir), str(zoo_adapter_dir(suite=suite)))


# A scalar field's TOML types: an int where a float is asked for is fine; a bool is never a number.
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,)}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {data!r} ({type(data).__name__})")
    known = {f.name: f.type for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} in {where}; expected some of {sorted(known)}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"{where} is missing required field(s) {missing}")
    for name, value in data.items():  # a string where a number belongs would surface later, on every request
        allowed = _SCALARS.get(str(known[name]).split("[")[0])
        if allowed is not None and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            raise ConfigError(f"{name} in {where} must be {'a' if known[name] != 'int' else 'an'} {known[name]}, "
                              f"got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf; no field means them
            raise ConfigError(f"{name} in {where} must be a finite number, got {value!r}")
    return cls(**data)


def _at_least(where: str, value, low) -> None:
    if not value >= low:
        raise ConfigError(f"{where} must be >= {low}, got {value!r}")


def read_toml(path: str | Path | None, error: type[Exception] = ConfigError) -> dict:
    """The table in a TOML file ({} for None); ``error`` names a missing or malformed file."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"config file {str(path)!r} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise error(f"config file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:  # a directory, no permission
        raise error(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def check_device(device: str, where: str) -> None:
    """A device torch can name (``cpu``, ``cuda``, ``cuda:N``, ...), refused at load rather than at model load."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{where} {device!r} must be a torch device such as cpu, cuda or cuda:N") from exc


def check_default_codec(config: ServeConfig) -> None:
    """``default_codec`` with ``default_codec_params`` must build, or the service would refuse every request."""
    if not isinstance(config.default_codec_params, dict):
        raise ConfigError(f"default_codec_params must be a table, got {config.default_codec_params!r}")
    try:
        get_codec(config.default_codec, **config.default_codec_params)
    except (CodecError, TypeError) as exc:
        raise ConfigError(f"default_codec {config.default_codec!r} with default_codec_params "
                          f"{config.default_codec_params!r}: {exc}") from exc


def load_config(path: str | Path | None = None, **overrides) -> ServeConfig:
    """Defaults, then the TOML file, then keyword overrides (from the CLI)."""
    data = read_toml(path)
    data |= {k: v for k, v in overrides.items() if v is not None}
    listed = data.pop("routes", [])
    if not isinstance(listed, (list, tuple)):
        raise ConfigError(f"routes must be an array of tables ([[routes]] in TOML), got {type(listed).__name__}")
    routes = tuple(_build(RouteConfig, r, f"routes[{i}]") for i, r in enumerate(listed))
    resources = {name: _build(Resources, data.pop(name, {}), f"[{name}]") for name in ("sender", "adapter", "receiver", "relay")}
    config = _build(ServeConfig, data | resources, "the top level")
    config = ServeConfig(**{**{f.name: getattr(config, f.name) for f in fields(ServeConfig)}, "routes": routes})
    names = [r.name for r in config.all_routes()]
    if config.default_route not in names:
        raise ConfigError(f"default_route {config.default_route!r} is not one of the routes {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"route names must be unique, got {names}")
    for name in ("sender", "adapter", "receiver", "relay"):
        res = getattr(config, name)
        _at_least(f"[{name}] num_cpus", res.num_cpus, 0)
        _at_least(f"[{name}] num_gpus", res.num_gpus, 0)
        _at_least(f"[{name}] replicas", res.replicas, 1)
        for key, amount in res.resources.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 < amount < math.inf:
                raise ConfigError(f"[{name}] resources: {key!r} = {amount!r} must be a positive number")
    for r in config.all_routes():
        if not r.name:
            raise ConfigError("a route's name must not be empty")
        for key in ("dtype", "adapter_dtype"):
            if getattr(r, key) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"route {r.name!r}: {key} {getattr(r, key)!r} must be float32, bfloat16 or float16")
        check_device(r.device, f"route {r.name!r}: device")
        for limit in ("max_input_bytes", "max_input_tokens", "max_cache_bytes", "context_window"):
            _at_least(f"route {r.name!r}: {limit} (0 = the service's)", getattr(r, limit), 0)
        if r.on_cache_failure not in ("", "error", "text"):
            raise ConfigError(f"route {r.name!r}: on_cache_failure {r.on_cache_failure!r} must be 'error' or 'text'")
    check_default_codec(config)
    if not config.host:
        raise ConfigError("host must be an address to bind (or 'node-ip'), got ''")
    for port, span in (("relay_port", 0), ("metrics_port", 3)):  # metrics: the relay's, then +1, +2, +3
        if not 0 <= getattr(config, port) <= 65535 - span:
            raise ConfigError(f"{port} must be in [0, {65535 - span}] (0 = a free port), got {getattr(config, port)}")
    _at_least("chunk_tokens (0 = sized by frame_bytes)", config.chunk_tokens, 0)
    _at_least("drain_grace_s", config.drain_grace_s, 0)
    if config.hop_transport not in ("auto", "bytes"):
        raise ConfigError(f"hop_transport {config.hop_transport!r} must be 'auto' or 'bytes'")
    if config.shm_pool_bytes < 0:
        raise ConfigError(f"shm_pool_bytes must be >= 0, got {config.shm_pool_bytes}")
    if config.shm_min_bytes < 0:
        raise ConfigError(f"shm_min_bytes must be >= 0, got {config.shm_min_bytes}")
    if config.on_cache_failure not in ("error", "text"):
        raise ConfigError(f"on_cache_failure {config.on_cache_failure!r} must be 'error' or 'text'")
    if config.max_message_bytes < message_bytes_needed(config.frame_bytes):
        raise ConfigError(f"max_message_bytes {config.max_message_bytes} must be at least 2 x frame_bytes + 64 KiB = "
                          f"{message_bytes_needed(config.frame_bytes)} (frame_bytes {config.frame_bytes}): a frame carries up to "
                          f"frame_bytes of cache, a pca chunk with 32-bit codes twice that, plus prefixes and section headers")
    for name in ("max_input_bytes", "max_input_tokens", "max_in_flight", "max_cache_bytes", "frame_bytes", "codec_workers",
                 "default_max_new_tokens", "prefill_chunk_tokens"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.token_flush_ms >= 0:
        raise ConfigError(f"token_flush_ms must be >= 0, got {config.token_flush_ms}")
    if not config.hop_deadline_s > 0:
        raise ConfigError(f"hop_deadline_s must be > 0 seconds, got {config.hop_deadline_s}")
    if config.default_max_new_tokens > config.max_new_tokens_limit:
        raise ConfigError(f"default_max_new_tokens {config.default_max_new_tokens} must be <= max_new_tokens_limit "
                          f"{config.max_new_tokens_limit} (a request that sets none gets the default)")
    return config
