"""Prometheus metrics, one registry and one HTTP endpoint per service process.

Series (every one carries ``service``):
    densecomm_requests_total{route, code}            requests finished, by gRPC status code
    densecomm_errors_total{code}                     requests that ended in an error status
    densecomm_in_flight_requests                     requests being served now
    densecomm_hop_raw_bytes{hop}                     histogram: KV bytes per request before the codec
    densecomm_hop_wire_bytes{hop}                    histogram: bytes on the wire per request
    densecomm_hop_bytes_total{hop, kind}             counter: raw / wire bytes
    densecomm_compression_ratio{hop}                 histogram: raw / wire per request
    densecomm_chunks_total{hop}                      KV chunks sent
    densecomm_hop_transport_bytes_total{hop, transport}
                                                     counter: wire bytes by how they crossed: "bytes" (in the
                                                     gRPC messages) or "shm" (the same-node shortcut)
    densecomm_hop_transport_total{hop, transport}    counter: hops by the transport their stats report
                                                     ("bytes", "shm", "shm+bytes" = a full pool spilled some)
    densecomm_stage_seconds{stage}                   histogram: admit (sender: checks and tokenizing before
                                                     the prefill), prefill, encode, transfer, transform,
                                                     decode, prompt (receiver: its prompt, once it holds the
                                                     cache), first_token, generate, end_to_end,
                                                     time_to_first_token (relay: request in -> first token out)
    densecomm_hop_transfer_seconds{hop}              histogram: first frame to end of stream of one hop,
                                                     measured by the hop's receiving side
    densecomm_tokens_total{side, phase}              sender/receiver x prefill/decode
    densecomm_flops_total{side}                      2·N·tokens per side (sender, adapter, receiver)
    densecomm_t2t_flops_total                        FLOPs the same requests would cost as text-to-text
                                                     (sender decodes a message, receiver re-reads it)
Byte histograms have buckets from 1 KiB to 1 GiB (factor 4).
Hop series are counted once per hop: sender->adapter by the sender, adapter->receiver by the receiver.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

BYTE_BUCKETS = tuple(1024 * 4**i for i in range(11))  # 1 KiB ... 1 GiB
SECOND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATIO_BUCKETS = (1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 12, 16, 32)


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        labels = dict(registry=self.registry)
        self.requests = Counter("densecomm_requests_total", "Requests finished, by status", ["service", "route", "code"], **labels)
        self.errors = Counter("densecomm_errors_total", "Requests that ended in an error status", ["service", "code"], **labels)
        self.in_flight = Gauge("densecomm_in_flight_requests", "Requests being served", ["service"], **labels)
        self.raw_bytes = Histogram("densecomm_hop_raw_bytes", "KV bytes per request before the codec", ["service", "hop"], buckets=BYTE_BUCKETS, **labels)
        self.wire_bytes = Histogram("densecomm_hop_wire_bytes", "KV bytes per request on the wire", ["service", "hop"], buckets=BYTE_BUCKETS, **labels)
        self.bytes_total = Counter("densecomm_hop_bytes_total", "KV bytes moved", ["service", "hop", "kind"], **labels)
        self.ratio = Histogram("densecomm_compression_ratio", "raw / wire bytes per request", ["service", "hop"], buckets=RATIO_BUCKETS, **labels)
        self.chunks = Counter("densecomm_chunks_total", "KV chunks sent", ["service", "hop"], **labels)
        self.transport_bytes = Counter("densecomm_hop_transport_bytes_total", "KV wire bytes by transport (bytes: in the gRPC "
                                       "messages, shm: same-node shared memory)", ["service", "hop", "transport"], **labels)
        self.transports = Counter("densecomm_hop_transport_total", "KV hops by the transport they used (bytes, shm, shm+bytes)",
                                  ["service", "hop", "transport"], **labels)
        self.stage = Histogram("densecomm_stage_seconds", "Latency of one stage", ["service", "stage"], buckets=SECOND_BUCKETS, **labels)
        self.tokens = Counter("densecomm_tokens_total", "Tokens processed", ["service", "side", "phase"], **labels)
        self.flops = Counter("densecomm_flops_total", "Estimated FLOPs (2 x params x tokens)", ["service", "side"], **labels)
        self.hop_transfer = Histogram("densecomm_hop_transfer_seconds", "First frame to end of stream of one KV hop",
                                      ["service", "hop"], buckets=SECOND_BUCKETS, **labels)
        self.t2t_flops = Counter("densecomm_t2t_flops_total", "Estimated FLOPs of the same requests as text-to-text", ["service"], **labels)
        self.in_flight.labels(service).set(0)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port."""
        self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.http.server_address[1]

    def close(self) -> None:
        http = getattr(self, "http", None)
        if http is not None:
            http.shutdown()
            http.server_close()

    def observe_hop(self, hop: str, raw: int, wire: int, chunks: int, transport: str = "bytes", shm_bytes: int = 0) -> None:
        """One hop's bytes; ``transport`` as its stats report it, ``shm_bytes`` of ``wire`` crossed in shared memory."""
        s = self.service
        self.raw_bytes.labels(s, hop).observe(raw)
        self.wire_bytes.labels(s, hop).observe(wire)
        self.bytes_total.labels(s, hop, "raw").inc(raw)
        self.bytes_total.labels(s, hop, "wire").inc(wire)
        if wire:
            self.ratio.labels(s, hop).observe(raw / wire)
        self.chunks.labels(s, hop).inc(chunks)
        shm_bytes = min(max(shm_bytes, 0), wire)
        self.transport_bytes.labels(s, hop, "bytes").inc(wire - shm_bytes)
        if shm_bytes:
            self.transport_bytes.labels(s, hop, "shm").inc(shm_bytes)
        self.transports.labels(s, hop, transport).inc()

    def observe_hop_transfer(self, hop: str, seconds: float) -> None:
        self.hop_transfer.labels(self.service, hop).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(self.service, stage).observe(seconds)

    def finished(self, route: str, code: str) -> None:
        self.requests.labels(self.service, route, code).inc()
        if code != "OK":
            self.errors.labels(self.service, code).inc()
