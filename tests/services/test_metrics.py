"""services.metrics: the per-transport hop series (wire bytes by bytes/shm, hops by the transport they used)."""

from __future__ import annotations

from services.metrics import ServiceMetrics


def sample(metrics: ServiceMetrics, name: str, hop: str, transport: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"service": metrics.service, "hop": hop, "transport": transport})


def test_observe_hop_splits_wire_bytes_by_transport_and_counts_hops_by_what_the_stats_say():
    metrics = ServiceMetrics("sender")
    metrics.observe_hop("sender->adapter", raw=4000, wire=1000, chunks=3)  # bytes path (the default)
    metrics.observe_hop("sender->adapter", raw=4000, wire=1000, chunks=3, transport="shm", shm_bytes=1000)
    metrics.observe_hop("sender->adapter", raw=4000, wire=1000, chunks=3, transport="shm+bytes", shm_bytes=600)  # pool full
    metrics.observe_hop("sender->adapter", raw=10, wire=10, chunks=1, transport="shm", shm_bytes=25)  # never more than wire
    assert sample(metrics, "densecomm_hop_transport_bytes_total", "sender->adapter", "bytes") == 1000 + 0 + 400 + 0
    assert sample(metrics, "densecomm_hop_transport_bytes_total", "sender->adapter", "shm") == 1000 + 600 + 10
    hops = {t: sample(metrics, "densecomm_hop_transport_total", "sender->adapter", t) for t in ("bytes", "shm", "shm+bytes")}
    assert hops == {"bytes": 1, "shm": 2, "shm+bytes": 1}
    assert metrics.registry.get_sample_value("densecomm_hop_bytes_total", {"service": "sender", "hop": "sender->adapter", "kind": "wire"}) == 3010
