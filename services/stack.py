"""Building and running the services: one gRPC server per service, health checking and reflection on each.

    ServiceHost(kind, config, downstream)   one service in its own thread + event loop (a Ray actor
                                            holds one; LocalStack holds four)
    LocalStack(config)                      receiver, adapter, sender and relay in this process
    RayStack(config)                        the same four as Ray actors with their own resources
Both stacks expose ``relay_address`` and ``metrics_ports`` and shut down cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services import protos
from services.config import ConfigError, ServeConfig
from services.metrics import ServiceMetrics

log = logging.getLogger(__name__)
KINDS = ("receiver", "adapter", "sender", "relay")  # start order: downstream first
NODE_IP = "node-ip"  # ServeConfig.host value: each Ray actor binds the IP of its own node (the pod IP)
relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc = protos.load()
SERVICE_NAMES = {
    "relay": relay_pb2.DESCRIPTOR.services_by_name["Relay"].full_name,
    "sender": kv_pb2.DESCRIPTOR.services_by_name["Sender"].full_name,
    "adapter": kv_pb2.DESCRIPTOR.services_by_name["Adapter"].full_name,
    "receiver": kv_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name,
}


def make_servicer(kind: str, config: ServeConfig, metrics: ServiceMetrics, downstream: list[str]):
    from services import runtime, servicers

    if kind == "receiver":
        return servicers.ReceiverServicer(config, metrics, runtime.load_receiver_routes(config))
    if kind == "adapter":
        return servicers.AdapterServicer(config, metrics, runtime.load_adapter_routes(config),
                                         servicers.Downstream(downstream, kv_pb2_grpc.ReceiverStub, config))
    if kind == "sender":
        return servicers.SenderServicer(config, metrics, runtime.load_sender_routes(config),
                                        servicers.Downstream(downstream, kv_pb2_grpc.AdapterStub, config))
    if kind == "relay":
        return servicers.RelayServicer(config, metrics, servicers.Downstream(downstream, kv_pb2_grpc.SenderStub, config))
    raise ValueError(f"unknown service kind {kind!r}; expected one of {KINDS}")


ADD_SERVICER = {
    "relay": lambda s, srv: relay_pb2_grpc.add_RelayServicer_to_server(s, srv),
    "sender": lambda s, srv: kv_pb2_grpc.add_SenderServicer_to_server(s, srv),
    "adapter": lambda s, srv: kv_pb2_grpc.add_AdapterServicer_to_server(s, srv),
    "receiver": lambda s, srv: kv_pb2_grpc.add_ReceiverServicer_to_server(s, srv),
}


def metrics_port_for(config: ServeConfig, kind: str, replica: int) -> int:
    """relay at metrics_port, then sender, adapter, receiver; replicas after them; 0 = a free port."""
    if not config.metrics_port:
        return 0
    order = ("relay", "sender", "adapter", "receiver")
    return config.metrics_port + order.index(kind) + 4 * replica


class ServiceHost:
    """One service: its own asyncio loop in a daemon thread, a grpc.aio server, a metrics endpoint."""

    def __init__(self, kind: str, config: ServeConfig, downstream: list[str], port: int = 0, replica: int = 0) -> None:
        self.kind, self.config, self.downstream = kind, config, downstream
        self.metrics = ServiceMetrics(kind)
        self.port = port
        self.bind_host = (config.relay_host or config.host) if kind == "relay" else config.host
        self.metrics_port = self.metrics.serve(self.bind_host, metrics_port_for(config, kind, replica))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"densecomm-{kind}", daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server | None = None
        self.run(self._start())

    def run(self, coroutine, timeout: float | None = 600):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        servicer = make_servicer(self.kind, self.config, self.metrics, self.downstream)
        options = [("grpc.max_send_message_length", self.config.max_message_bytes),
                   ("grpc.max_receive_message_length", self.config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        ADD_SERVICER[self.kind](servicer, server)
        health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAMES[self.kind], health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(f"{self.bind_host}:{self.port}")
        await server.start()
        for name in ("", SERVICE_NAMES[self.kind]):
            result = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            if asyncio.iscoroutine(result):
                await result
        self.server, self.servicer = server, servicer
        log.info("%s listening on %s:%d (metrics %d)", self.kind, self.config.host, self.port, self.metrics_port)

    @property
    def address(self) -> str:
        host = self.config.host if self.bind_host in ("0.0.0.0", "::", "[::]") else self.bind_host
        return f"{host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        async def _stop() -> None:
            if self.server is not None:
                await self.server.stop(grace)
            downstream = getattr(getattr(self, "servicer", None), "receivers", None) or getattr(getattr(self, "servicer", None), "adapters", None) \
                or getattr(getattr(self, "servicer", None), "senders", None)
            if downstream is not None:
                await downstream.close()

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
        self.config = config
        self.hosts: dict[str, ServiceHost] = {}
        downstream: list[str] = []
        try:
            for kind in KINDS:
                port = config.relay_port if kind == "relay" else 0
                self.hosts[kind] = ServiceHost(kind, config, downstream, port=port)
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
        self.hosts[kind] = ServiceHost(kind, self.config, old.downstream, port=old.port)

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
            for kind in KINDS:
                res = getattr(config, kind)
                replicas = 1 if kind == "relay" else res.replicas
                # "node-ip": the actor binds its own node's IP; the port is probed here (another pod's netns)
                probe_host = "0.0.0.0" if config.host == NODE_IP else config.host
                ports = [config.relay_port if kind == "relay" and config.relay_port else free_port(probe_host) for _ in range(replicas)]
                actors = [actor_class.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=dict(res.resources) or None).remote(
                    kind, config, downstream, port, replica) for replica, port in enumerate(ports)]
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
                    ray.get(actor.stop.remote(), timeout=30)
                except Exception:
                    pass
                ray.kill(actor, no_restart=True)
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ServiceActor:
    """Body of a Ray actor hosting one service (wrapped with ray.remote by RayStack)."""

    def __init__(self, kind: str, config: ServeConfig, downstream: list[str], port: int, replica: int = 0) -> None:
        logging.basicConfig(level=logging.WARNING)
        if config.host == NODE_IP:  # one actor of a role per node (KubeRay: one unit of its resource per pod)
            import dataclasses

            import ray

            config, replica = dataclasses.replace(config, host=ray.util.get_node_ip_address()), 0
        self.host = ServiceHost(kind, config, downstream, port=port, replica=replica)

    def info(self) -> tuple[str, int]:
        return self.host.address, self.host.metrics_port

    def stop(self) -> None:
        self.host.stop()
