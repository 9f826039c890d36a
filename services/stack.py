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
from services.config import ServeConfig
from services.metrics import ServiceMetrics

log = logging.getLogger(__name__)
KINDS = ("receiver", "adapter", "sender", "relay")  # start order: downstream first
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


class ServiceHost:
    """One service: its own asyncio loop in a daemon thread, a grpc.aio server, a metrics endpoint."""

    def __init__(self, kind: str, config: ServeConfig, downstream: list[str], port: int = 0, metrics_port: int = 0) -> None:
        self.kind, self.config, self.downstream = kind, config, downstream
        self.metrics = ServiceMetrics(kind)
        self.port = port
        self.metrics_port = self.metrics.serve(config.host, metrics_port)
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
        self.port = server.add_insecure_port(f"{self.config.host}:{self.port}")
        await server.start()
        for name in ("", SERVICE_NAMES[self.kind]):
            result = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            if asyncio.iscoroutine(result):
                await result
        self.server, self.servicer = server, servicer
        log.info("%s listening on %s:%d (metrics %d)", self.kind, self.config.host, self.port, self.metrics_port)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

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


class LocalStack:
    """The four services in this process, each on its own loopback port."""

    def __init__(self, config: ServeConfig) -> None:
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

    def close(self) -> None:
        for kind in reversed(KINDS):
            if kind in self.hosts:
                self.hosts.pop(kind).stop()

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
