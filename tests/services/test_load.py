"""A short `bench load` on Ray-hosted services, with the receiver SIGKILLed in the middle."""

from __future__ import annotations

import asyncio

import pytest

from densecomm_core.zoo import tasks
from services.bench import load
from tests.services.conftest import stack_config

TEXTS = [e.context for e in tasks.make_split("test", 10)]


@pytest.fixture(scope="module")
def ray_stack(random_route):
    from services.stack import RayStack

    with RayStack(stack_config(random_route)) as stack:
        yield stack


def test_mixed_load_counts_every_status_and_reports_rss(ray_stack):
    pids = load.stack_pids(ray_stack)
    before = load.rss_of(pids)
    plan = load.LoadPlan(requests=40, concurrency=4, timeout_s=20, bad_share=0.25, cancel_share=0.25, long_share=0.1, seed=3)
    results, seconds = asyncio.run(load.run_load(ray_stack.relay_address, plan, TEXTS))
    summary = load.summarize(results, seconds, plan)
    assert summary["calls"] == 40 and summary["unexpected"] == 0 and summary["past_deadline"] == 0, summary
    kinds = {key.split(":")[0] for key in summary["counts"]}
    assert kinds == {"good", "bad", "cancel", "long"} and summary["p50_ms"] <= summary["p99_ms"]
    assert any(k in summary["counts"] for k in ("bad:INVALID_ARGUMENT", "bad:NOT_FOUND"))
    after = load.rss_of(pids)
    assert set(after) == {"relay", "sender", "adapter", "receiver"} and all(v > 50 for v in before.values())
    assert "good OK/s" in load.render("t", summary)


def test_killing_the_receiver_under_load_fails_fast_and_recovers(ray_stack):
    plan = load.LoadPlan(requests=400, concurrency=4, timeout_s=10, max_seconds=60, bad_share=0.0, cancel_share=0.0, long_share=0.0, seed=4)
    old = ray_stack.pids("receiver")
    row = asyncio.run(load.fault_run(ray_stack, plan, TEXTS, "receiver", kill_after_s=1.0, settle=10))
    assert ray_stack.pids("receiver") != old  # Ray started a new process
    assert set(row["in_flight_at_kill"]) <= {"OK", "UNAVAILABLE"}, row  # never DEADLINE_EXCEEDED, never a hang
    assert row["past_deadline"] == 0 and row["recovery_s"] is not None and row["recovery_s"] < 30, row
