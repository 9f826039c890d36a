"""Building and running the services: one gRPC server per service, health checking and reflection on each.

    ServiceHost(kind, config, downstream)   one service in its own thread + event loop (a Ray actor
                                            holds one; LocalStack holds four)
    LocalStack(config)                      receiver, adapter, sender and relay in this process
    RayStack(config)                        the same four as Ray actors with their own resources
    SERVICE_KINDS                           the one table of service kinds (proto service, servicer, downstream)
Both stacks expose ``relay_address`` and ``metrics_ports`` and shut down cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services import kvstream, protos, security
from services.config import ConfigError, ServeConfig
from services.limits import Admission
from services.metrics import ServiceMetrics

log = logging.getLogger(__name__)
NODE_IP = "node-ip"  # ServeConfig.host value: each Ray actor binds the IP of its own node (the pod IP)
relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()


@dataclass(frozen=True)
class ServiceKind:
    """One kind of service: its gRPC service, how to add a servicer to a server, how to call it, which
    servicer class implements it (``services.servicers``) and which kind it calls next."""

    name: str
    proto_service: str  # full name, for health checking and reflection
    add_to_server: Callable  # (servicer, server) -> None
    stub: Callable  # channel -> a client stub of this service
    servicer: str  # class name in services.servicers
    downstream: str | None  # the kind this one calls, None for the last


SERVICE_KINDS: dict[str, ServiceKind] = {kind.name: kind for kind in (  # start order: downstream first
    # the KV streams carry frames as the gRPC messages themselves (services.kvstream's raw framing)
    ServiceKind("receiver", kvstream.RECEIVER.service, kvstream.RECEIVER.add_to_server, kvstream.RECEIVER.stub,
                "ReceiverServicer", None),
    ServiceKind("adapter", kvstream.ADAPTER.service, kvstream.ADAPTER.add_to_server, kvstream.ADAPTER.stub,
                "AdapterServicer", "receiver"),
    ServiceKind("sender", kv_pb2.DESCRIPTOR.services_by_name["Sender"].full_name, kv_pb2_grpc.add_SenderServicer_to_server,
                kv_pb2_grpc.SenderStub, "SenderServicer", "adapter"),
    ServiceKind("relay", relay_pb2.DESCRIPTOR.services_by_name["Relay"].full_name, relay_pb2_grpc.add_RelayServicer_to_server,
                relay_pb2_grpc.RelayStub, "RelayServicer", "sender"),
)}
KINDS = tuple(SERVICE_KINDS)


def make_servicer(kind: str, config: ServeConfig, metrics: ServiceMetrics, downstream: list[str], receivers: list[str] = ()):
    """The servicer of ``kind`` with what it loads (routes, bases) and a channel to each downstream replica
    (``receivers``: the relay's direct line to the receivers, for on_cache_failure = text)."""
    from services import servicers

    if kind not in SERVICE_KINDS:
        raise ValueError(f"unknown service kind {kind!r}; expected one of {KINDS}")
    spec = SERVICE_KINDS[kind]
    channels = servicers.Downstream(downstream, SERVICE_KINDS[spec.downstream].stub, config) if spec.downstream else None
    if kind == "relay" and receivers:
        return servicers.RelayServicer.build(config, metrics, channels, servicers.Downstream(receivers, SERVICE_KINDS["receiver"].stub, config))
    return getattr(servicers, spec.servicer).build(config, metrics, channels)


def metrics_port_for(config: ServeConfig, kind: str, replica: int) -> int:
    """relay at metrics_port, then sender, adapter, receiver; replicas after them; 0 = a free port."""
    if not config.metrics_port:
        return 0
    order = ("relay", "sender", "adapter", "receiver")
    return config.metrics_port + order.index(kind) + 4 * replica


class ServiceHost:
    """One service: its own asyncio loop in a daemon thread, a grpc.aio server, a metrics endpoint."""

    def __init__(self, kind: str, config: ServeConfig, downstream: list[str], port: int = 0, replica: int = 0,
                 receivers: list[str] = ()) -> None:
        """``receivers``: the relay's direct line to the receivers (on_cache_failure = text)."""
        self.kind, self.config, self.downstream, self.receivers = kind, config, downstream, list(receivers)
        if config.hop_transport == "auto":  # shared-memory slots hold descriptors on both ends of a hop
            from services.shm import raise_open_file_limit

            raise_open_file_limit()
        self.metrics = ServiceMetrics(kind)
        self.port = port
        self.bind_host = (config.relay_host or config.host) if kind == "relay" else config.host
        self.metrics_port = self.metrics.serve(self.bind_host, metrics_port_for(config, kind, replica))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"densecomm-{kind}", daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server | None = None
        self.servicer = None
        try:
            self.run(self._start())
        except BaseException:  # a bad config (a TLS key of another certificate, say): no loop thread or metrics port left behind
            self.stop(grace=0)
            raise

    def run(self, coroutine, timeout: float | None = 600):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        security.check_files(self.kind, self.config)  # before the models load
        servicer = make_servicer(self.kind, self.config, self.metrics, self.downstream, self.receivers)
        options = [("grpc.max_send_message_length", self.config.max_message_bytes),
                   ("grpc.max_receive_message_length", self.config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        # auth first (strangers never hold a slot), then bounded admission (and refusal while draining)
        refused = lambda code: self.metrics.finished("-", code.name)  # noqa: E731  (counted like any other status)
        self.admission = Admission(self.kind, self.config.max_in_flight, refused)
        interceptors = [*security.server_interceptors(self.kind, self.config, refused), self.admission]
        server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=4), options=options, interceptors=interceptors)
        spec = SERVICE_KINDS[self.kind]
        spec.add_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((spec.proto_service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = security.add_port(server, f"{self.bind_host}:{self.port}", self.kind, self.config)
        await server.start()
        for name in ("", spec.proto_service):
            result = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            if asyncio.iscoroutine(result):
                await result
        self.server, self.servicer, self.health = server, servicer, health_servicer
        log.info("%s listening on %s:%d (metrics %d)", self.kind, self.config.host, self.port, self.metrics_port)

    @property
    def address(self) -> str:
        host = self.config.host if self.bind_host in ("0.0.0.0", "::", "[::]") else self.bind_host
        return f"{host}:{self.port}"

    async def drain(self, grace: float) -> int:
        """Graceful drain: health NOT_SERVING first, new calls UNAVAILABLE, admitted calls get up to
        ``grace`` s to finish; returns how many were still running (they are cancelled by the stop)."""
        for name in ("", SERVICE_KINDS[self.kind].proto_service):
            result = self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if asyncio.iscoroutine(result):
                await result
        left = await self.admission.drain(grace)
        if left:
            log.warning("%s: %d call(s) still running after the %.1f s drain grace; cancelling them", self.kind, left, grace)
        return left

    def stop(self, grace: float | None = None) -> None:
        """Drain (``grace`` s, default the config's drain_grace_s; 0 = stop at once), then stop."""
        grace = self.config.drain_grace_s if grace is None else grace

        async def _stop() -> None:
            if self.server is not None:
                if grace > 0:
                    await self.drain(grace)
                await self.server.stop(0)
            if self.servicer is not None:
                await self.servicer.close()

        try:
            self.run(_stop(), timeout=grace + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
            self.metrics.close()


def free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LocalStack:
    """The four services in this process, each on its own loopback port."""

    def __init__(self, config: ServeConfig) -> None:
        if config.host == NODE_IP:
            raise ConfigError(f"host = {NODE_IP!r} needs Ray actors (densecomm serve without --no-ray); give an IP here")
        for kind in KINDS:  # a bad token or TLS file is named before the first model loads
            security.check_files(kind, config)
        self.config = config
        self.hosts: dict[str, ServiceHost] = {}
        downstream: list[str] = []
        try:
            for kind in KINDS:
                port = config.relay_port if kind == "relay" else 0
                receivers = [self.hosts["receiver"].address] if kind == "relay" else []
                self.hosts[kind] = ServiceHost(kind, config, downstream, port=port, receivers=receivers)
                downstream = [self.hosts[kind].address]
        except BaseException:
            self.close()
            raise

    @property
    def relay_address(self) -> str:
        return self.hosts["relay"].address

    @property
    def metrics_ports(self) -> dict[str, int]:
        return {kind: host.metrics_port for kind, host in self.hosts.items()}

    def stop(self, kind: str) -> None:
        """Stop one service (failure tests); ``restart`` brings it back at the same address."""
        self.hosts[kind].stop(grace=0)

    def restart(self, kind: str) -> None:
        old = self.hosts[kind]
        self.hosts[kind] = ServiceHost(kind, self.config, old.downstream, port=old.port, receivers=old.receivers)

    def close(self) -> None:
        for kind in reversed(KINDS):
            if kind in self.hosts:
                self.hosts.pop(kind).stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayStack:
    """The four services as Ray actors, each with the resources its config asks for.

    Starts a local Ray (node IP 127.0.0.1, no dashboard) unless ``RAY_ADDRESS`` names a cluster.
    A service's ``resources`` (Ray custom resources) place its actors on the nodes that advertise them.
    """

    def __init__(self, config: ServeConfig, ray_address: str | None = None) -> None:
        import os

        import ray

        self.config = config
        self.started_ray = False
        if not ray.is_initialized():
            address = ray_address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                needed = sum(getattr(config, k).num_cpus * getattr(config, k).replicas for k in KINDS)
                custom: dict[str, float] = {}  # one node offers every custom resource the services ask for
                for k in KINDS:
                    for name, amount in getattr(config, k).resources.items():
                        custom[name] = custom.get(name, 0) + amount * (1 if k == "relay" else getattr(config, k).replicas)
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                         num_cpus=max(os.cpu_count() or 1, int(needed + 1)), resources=custom or None, configure_logging=False)
                self.started_ray = True
        # Fixed ports chosen here, so an actor that Ray restarts after a crash comes back at the same address.
        actor_class = ray.remote(max_restarts=-1, max_task_retries=0)(ServiceActor)
        self.actors: dict[str, list] = {}
        self.addresses: dict[str, list[str]] = {}
        self.ports: dict[str, list[int]] = {}
        downstream: list[str] = []
        try:
            if self.started_ray:  # every actor runs on this machine: its files are this machine's
                for kind in KINDS:
                    security.check_files(kind, config)
            else:
                check_files_on_nodes(config)
            for kind in KINDS:
                res = getattr(config, kind)
                replicas = 1 if kind == "relay" else res.replicas
                # "node-ip": the actor binds its own node's IP; the port is probed here (another pod's netns)
                probe_host = "0.0.0.0" if config.host == NODE_IP else config.host
                ports = [config.relay_port if kind == "relay" and config.relay_port else free_port(probe_host) for _ in range(replicas)]
                receivers = self.addresses["receiver"] if kind == "relay" else []
                actors = [actor_class.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=dict(res.resources) or None).remote(
                    kind, config, downstream, port, replica, receivers) for replica, port in enumerate(ports)]
                info = ray.get([a.info.remote() for a in actors], timeout=900)
                self.actors[kind] = actors
                self.addresses[kind] = [i[0] for i in info]
                self.ports[kind] = [i[1] for i in info]
                downstream = self.addresses[kind]
        except BaseException:
            self.close()
            raise

    @property
    def relay_address(self) -> str:
        return self.addresses["relay"][0]

    @property
    def metrics_ports(self) -> dict[str, int]:
        return {kind: ports[0] for kind, ports in self.ports.items()}

    def pids(self, kind: str) -> list[int]:
        """Process ids of one service's actors (fault injection and RSS in `bench load`)."""
        import ray

        return ray.get([a.pid.remote() for a in self.actors[kind]], timeout=60)

    def crash(self, kind: str) -> None:
        """Kill one service's actors as a crash would; Ray restarts them at the same address."""
        import ray

        for actor in self.actors[kind]:
            ray.kill(actor, no_restart=False)

    def wait_ready(self, kind: str, timeout: float = 300) -> None:
        """Block until every actor of ``kind`` answers again (after a restart)."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.get([a.info.remote() for a in self.actors[kind]], timeout=max(1.0, deadline - time.monotonic()))
                return
            except (ActorUnavailableError, RayActorError, GetTimeoutError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        import ray

        for kind in reversed(KINDS):
            for actor in self.actors.pop(kind, []):
                try:
                    ray.get(actor.stop.remote(), timeout=30 + self.config.drain_grace_s)
                except Exception:
                    pass
                ray.kill(actor, no_restart=True)
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_files_on_nodes(config: ServeConfig) -> None:
    """``security.check_files`` of every service on a cluster, each run as a Ray task placed as the service's
    actors are (its custom resources; no CPU held), before any actor starts: a bad token or TLS file is named
    at once, not after the other services have loaded their models, and on a node of the service's kind, where
    its files are mounted (the Helm chart mounts the Relay's only in the Relay's pod). A Ray this stack started
    on this machine checks them here instead (the tasks' worker processes cost seconds)."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(security.check_files)
    checks = {kind: task.options(num_gpus=getattr(config, kind).num_gpus, resources=dict(getattr(config, kind).resources) or None)
              .remote(kind, config) for kind in KINDS}
    for kind, check in checks.items():
        try:
            ray.get(check, timeout=900)  # the actors' own wait: a node of the role may still be coming up
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"{kind}: no node with the resources of [{kind}] took its security check within 900 s") from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise ConfigError(str(cause) if isinstance(cause, ConfigError) else f"{kind}: checking its security files "
                              f"failed: {type(cause).__name__}: {cause}") from None


class ServiceActor:
    """Body of a Ray actor hosting one service (wrapped with ray.remote by RayStack)."""

    def __init__(self, kind: str, config: ServeConfig, downstream: list[str], port: int, replica: int = 0,
                 receivers: list[str] = ()) -> None:
        logging.basicConfig(level=logging.WARNING)
        if config.host == NODE_IP:  # one actor of a role per node (KubeRay: one unit of its resource per pod)
            import dataclasses

            import ray

            config, replica = dataclasses.replace(config, host=ray.util.get_node_ip_address()), 0
        self.host = ServiceHost(kind, config, downstream, port=port, replica=replica, receivers=receivers)

    def info(self) -> tuple[str, int]:
        return self.host.address, self.host.metrics_port

    def pid(self) -> int:
        import os

        return os.getpid()

    def stop(self) -> None:
        self.host.stop()
