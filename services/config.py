"""The typed service configuration, read once from a TOML file (or defaults) at start-up and passed down.

Example (``densecomm serve --config serve.toml``)::

    host = "127.0.0.1"
    relay_port = 50051
    default_route = "zoo"
    default_codec = "lossless"

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

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

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
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"


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
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 4096
    chunk_tokens: int = 0  # tokens per chunk (0 = one chunk per layer)
    max_message_bytes: int = 64 << 20  # gRPC send/receive limit per message (one frame)
    max_cache_bytes: int = 4 << 30  # decoded cache limit per request
    hop_deadline_s: float = 120.0  # deadline of every internal call
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


def zoo_route() -> RouteConfig:
    from densecomm_core.zoo.build import RECEIVER_SPEC, SENDER_SPEC
    from densecomm_core.zoo.pair import zoo_adapter_dir, zoo_root

    root = zoo_root()
    return RouteConfig("zoo", str(root / SENDER_SPEC.name), str(root / RECEIVER_SPEC.name), str(zoo_adapter_dir()))


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} in {where}; expected some of {sorted(known)}")
    return cls(**data)


def load_config(path: str | Path | None = None, **overrides) -> ServeConfig:
    """Defaults, then the TOML file, then keyword overrides (from the CLI)."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {str(path)!r} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    data |= {k: v for k, v in overrides.items() if v is not None}
    routes = tuple(_build(RouteConfig, r, f"routes[{i}]") for i, r in enumerate(data.pop("routes", [])))
    resources = {name: _build(Resources, data.pop(name, {}), f"[{name}]") for name in ("sender", "adapter", "receiver", "relay")}
    config = _build(ServeConfig, data | resources, "the top level")
    config = ServeConfig(**{**{f.name: getattr(config, f.name) for f in fields(ServeConfig)}, "routes": routes})
    names = [r.name for r in config.all_routes()]
    if config.default_route not in names:
        raise ConfigError(f"default_route {config.default_route!r} is not one of the routes {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"route names must be unique, got {names}")
    for name in ("sender", "adapter", "receiver", "relay"):
        for key, amount in getattr(config, name).resources.items():
            if not isinstance(amount, (int, float)) or amount <= 0:
                raise ConfigError(f"[{name}] resources: {key!r} = {amount!r} must be a positive number")
    for r in config.all_routes():
        if r.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"route {r.name!r}: dtype {r.dtype!r} must be float32, bfloat16 or float16")
    return config
