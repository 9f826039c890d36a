"""`densecomm bench load`: Relay under load on loopback: throughput, latency percentiles, statuses, RSS, faults.

    run_load(address, plan)            N calls at concurrency C, stops by itself (count and wall-clock bounds):
                                       good requests, bad ones (empty input, oversized input, unknown route)
                                       and a share the client cancels mid-call
    summarize(results)                 throughput, p50/p95/p99 of good calls, counts by kind and status,
                                       unexpected outcomes, calls that outlived their deadline
    fault_run(stack, plan, kind)       the same load while one service is killed (SIGKILL to its Ray actor's
                                       process; Ray restarts it): statuses of the calls in flight at the kill,
                                       and the recovery time (kill -> every later good call succeeds)
    rss_of(pids)                       resident memory of each service process (psutil)
Every loop is bounded in count and time and targets loopback only.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from services.client import build_request, relay_pb2_grpc
from services.security import client_channel, token_metadata

# What each kind of request may end with; anything else counts as unexpected.
EXPECTED = {
    "good": {"OK"},
    "bad": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "cancel": {"CANCELLED", "OK"},  # OK: it finished before the client's cancel came
    "long": {"OK"},  # a valid input near the zoo's token limit
}


@dataclass(frozen=True)
class LoadPlan:
    requests: int = 200
    concurrency: int = 16
    timeout_s: float = 20.0  # every call's deadline
    max_seconds: float = 300.0  # no new call starts after this
    bad_share: float = 0.1
    cancel_share: float = 0.1
    long_share: float = 0.05
    max_new_tokens: int = 8
    seed: int = 0
    oversize_bytes: int = 300 << 10  # an input above the default max_input_bytes (256 KiB)


@dataclass
class CallResult:
    kind: str
    code: str
    started: float  # time.monotonic()
    seconds: float


@dataclass
class TLSClient:
    """How the load client reaches the Relay (empty = plaintext, no token)."""

    ca_file: str = ""
    token: str = ""
    extra: dict = field(default_factory=dict)


def make_request(kind: str, rng: random.Random, texts: list[str], plan: LoadPlan):
    text = rng.choice(texts)
    if kind == "bad":
        return rng.choice([build_request(""), build_request("x" * plan.oversize_bytes),
                           build_request(text, route="no-such-route")])
    if kind == "long":  # ~190 tokens: with the prompt and the answer just inside the zoo's 256-token window
        facts = " , ".join(f"{name}{i} {i % 10}" for i in range(60) for name in ("ann",))
        return build_request(f"recall {facts} . ann7 ?", max_new_tokens=plan.max_new_tokens)
    return build_request(text, max_new_tokens=plan.max_new_tokens)


async def one_call(stub, kind: str, request, plan: LoadPlan, rng: random.Random, metadata) -> CallResult:
    started = time.monotonic()
    call = stub.Relay(request, timeout=plan.timeout_s, metadata=metadata)
    cancel_after = rng.uniform(0.005, 0.15) if kind == "cancel" else None
    code = "OK"
    try:
        async def consume():
            async for _ in call:
                pass

        if cancel_after is None:
            await consume()
        else:
            try:
                await asyncio.wait_for(asyncio.shield(consume()), cancel_after)
            except asyncio.TimeoutError:
                call.cancel()
                code = "CANCELLED"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    except asyncio.CancelledError:
        code = "CANCELLED"
    return CallResult(kind, code, started, time.monotonic() - started)


async def run_load(address: str, plan: LoadPlan, texts: list[str], client: TLSClient | None = None,
                   on_result=None, until=None) -> tuple[list[CallResult], float]:
    """Runs ``plan`` (no new call once ``until()`` is true); returns every call's result and the wall-clock seconds."""
    client = client or TLSClient()
    rng = random.Random(plan.seed)
    edges = (("bad", plan.bad_share), ("cancel", plan.bad_share + plan.cancel_share),
             ("long", plan.bad_share + plan.cancel_share + plan.long_share))
    kinds = [next((kind for kind, edge in edges if u < edge), "good") for u in (rng.random() for _ in range(plan.requests))]
    metadata = token_metadata(client.token or None)
    results: list[CallResult] = []
    started = time.monotonic()
    async with client_channel(address, client.ca_file, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)
        queue: asyncio.Queue = asyncio.Queue()
        for kind in kinds:
            queue.put_nowait(kind)

        async def worker(index: int) -> None:
            local = random.Random(plan.seed * 1000 + index)
            while time.monotonic() - started < plan.max_seconds and not (until is not None and until()):
                try:
                    kind = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = await one_call(stub, kind, make_request(kind, local, texts, plan), plan, local, metadata)
                results.append(result)
                if on_result is not None:
                    on_result(result)

        await asyncio.gather(*(worker(i) for i in range(plan.concurrency)))
    return results, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(results: list[CallResult], seconds: float, plan: LoadPlan) -> dict:
    good = [r.seconds for r in results if r.kind == "good" and r.code == "OK"]
    counts = Counter(f"{r.kind}:{r.code}" for r in results)
    unexpected = sum(1 for r in results if r.code not in EXPECTED[r.kind])
    return {
        "calls": len(results), "seconds": round(seconds, 2),
        "calls_per_s": round(len(results) / seconds, 2) if seconds else 0.0,
        "good_ok_per_s": round(len(good) / seconds, 2) if seconds else 0.0,
        "p50_ms": round(1e3 * percentile(good, 50), 1), "p95_ms": round(1e3 * percentile(good, 95), 1),
        "p99_ms": round(1e3 * percentile(good, 99), 1),
        "mean_ms": round(1e3 * statistics.fmean(good), 1) if good else float("nan"),
        "counts": dict(sorted(counts.items())), "unexpected": unexpected,
        "past_deadline": sum(1 for r in results if r.seconds > plan.timeout_s + 1.0),
    }


def rss_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """MB resident per service (summed over its replicas' processes)."""
    import psutil

    out = {}
    for kind, ids in pids.items():
        total = 0
        for pid in ids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        out[kind] = round(total / 2**20, 1)
    return out


def stack_pids(stack) -> dict[str, list[int]]:
    if hasattr(stack, "pids"):
        return {kind: stack.pids(kind) for kind in ("relay", "sender", "adapter", "receiver")}
    return {"all (one process)": [os.getpid()]}


def kill(stack, kind: str) -> None:
    """SIGKILL the processes of one service's Ray actors (a crash, as the kernel's OOM killer would);
    on a LocalStack, stop the service and bring it back a second later."""
    if hasattr(stack, "pids"):
        for pid in stack.pids(kind):
            os.kill(pid, signal.SIGKILL)
        return
    stack.stop(kind)
    time.sleep(1.0)
    stack.restart(kind)


async def fault_run(stack, plan: LoadPlan, texts: list[str], kind: str, kill_after_s: float = 2.0, settle: int = 20) -> dict:
    """Load while ``kind`` is killed ``kill_after_s`` into the run. Reports the statuses of calls that
    were in flight at the kill, calls past their deadline, and the recovery time: from the kill until
    the start of the first good call after which every good call succeeded. The load stops early once
    ``settle`` calls in a row started after the kill succeeded (or at the plan's bounds)."""
    killed_at: list[float] = []
    streak = [0]

    def on_result(result: CallResult) -> None:
        if killed_at and result.started > killed_at[0]:
            streak[0] = streak[0] + 1 if result.code == "OK" else 0

    async def killer() -> None:
        await asyncio.sleep(kill_after_s)
        killed_at.append(time.monotonic())
        await asyncio.to_thread(kill, stack, kind)

    task = asyncio.create_task(killer())
    results, seconds = await run_load(stack.relay_address, plan, texts, on_result=on_result, until=lambda: streak[0] >= settle)
    await task
    at = killed_at[0]
    in_flight = Counter(r.code for r in results if r.started < at < r.started + r.seconds and r.kind == "good")
    good_after = sorted((r for r in results if r.kind == "good" and r.started >= at), key=lambda r: r.started)
    recovered = None
    for i, r in enumerate(good_after):
        if all(x.code == "OK" for x in good_after[i:]):
            recovered = r.started - at
            break
    return {"service": kind, "calls": len(results), "in_flight_at_kill": dict(in_flight),
            "failed_after_kill": sum(1 for r in good_after if r.code != "OK"),
            "past_deadline": sum(1 for r in results if r.seconds > plan.timeout_s + 1.0),
            "recovery_s": round(recovered, 2) if recovered is not None else None, "seconds": round(seconds, 1)}


def render(title: str, summary: dict) -> str:
    lines = [title, f"  {summary['calls']} calls in {summary['seconds']} s: {summary['calls_per_s']} calls/s "
                    f"({summary['good_ok_per_s']} good OK/s); good p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
                    f"p99 {summary['p99_ms']} ms",
             "  statuses: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()),
             f"  unexpected {summary['unexpected']}, past deadline {summary['past_deadline']}"]
    return "\n".join(lines)


def render_rss(rows: dict[str, dict[str, float]]) -> str:
    stages = list(rows)
    kinds = list(next(iter(rows.values())))
    lines = [f"  {'service':18s}" + "".join(f"{s:>20s}" for s in stages) + f"{'growth 2nd half':>17s}"]
    for kind in kinds:
        values = [rows[s][kind] for s in stages]
        growth = (values[-1] - values[-2]) / values[-2] * 100 if len(values) >= 2 and values[-2] else float("nan")
        lines.append(f"  {kind:18s}" + "".join(f"{v:20.1f}" for v in values) + f"{growth:16.1f}%")
    return "\n".join(lines)


def secure_overrides(directory: str) -> tuple[dict, TLSClient]:
    """Config overrides for TLS on every hop (Relay TLS, internal mTLS + secret, a bearer token) with a
    throw-away PKI in ``directory``, and the client settings that go with them."""
    from pathlib import Path

    from services.security import write_test_pki

    pki = write_test_pki(directory)
    token, secret = "load-token-" + os.urandom(8).hex(), "load-secret-" + os.urandom(8).hex()
    (Path(directory) / "tokens").write_text(token + "\n")
    (Path(directory) / "secret").write_text(secret + "\n")
    overrides = dict(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                     internal_tls_cert_file=pki["server_cert"], internal_tls_key_file=pki["server_key"], internal_tls_ca_file=pki["ca"],
                     internal_secret_file=str(Path(directory) / "secret"), auth_tokens_file=str(Path(directory) / "tokens"))
    return overrides, TLSClient(ca_file=pki["ca"], token=token)


def run_bench(requests: int, concurrency: int, use_ray: bool, faults: bool, fault_requests: int, tls_requests: int,
              timeout_s: float = 20.0, max_seconds: float = 600.0, progress=print) -> dict:
    """The whole `bench load`: a mixed load in two halves (RSS before, between and after), then kills
    under load (Ray only), then TLS-on vs TLS-off throughput on good requests, each on a fresh stack."""
    import tempfile

    from densecomm_core.zoo import tasks
    from services.config import load_config
    from services.stack import LocalStack, RayStack

    texts = [e.context for e in tasks.make_split("test", 40)]
    try:
        import cryptography  # noqa: F401  (the throw-away certificates of the TLS side)
    except ImportError:
        progress("TLS on vs off skipped: the certificates need the cryptography package (pip install cryptography)")
        tls_requests = 0
    report: dict = {"hosting": "Ray actors" if use_ray else "one process (LocalStack)", "requests": requests, "concurrency": concurrency}
    make = (lambda config: RayStack(config)) if use_ray else LocalStack
    half = LoadPlan(requests=requests // 2, concurrency=concurrency, timeout_s=timeout_s, max_seconds=max_seconds / 2)
    clean = LoadPlan(requests=tls_requests, concurrency=concurrency, timeout_s=timeout_s, max_seconds=max_seconds / 4,
                     bad_share=0.0, cancel_share=0.0, long_share=0.0, seed=1)
    with make(load_config(None, relay_port=0)) as stack:
        pids = stack_pids(stack)
        rss = {"before": rss_of(pids)}
        halves = []
        for name, seed in (("first half", 0), ("second half", 1)):
            results, seconds = asyncio.run(run_load(stack.relay_address, LoadPlan(**{**half.__dict__, "seed": seed}), texts))
            halves.append(results)
            rss[f"after {name}"] = rss_of(pids)
            report[name] = summarize(results, seconds, half)
            progress(render(f"{name}: {half.requests} calls at concurrency {concurrency}", report[name]))
        report["rss_mb"] = rss
        if tls_requests:
            results, seconds = asyncio.run(run_load(stack.relay_address, clean, texts))
            report["tls_off"] = summarize(results, seconds, clean)
            progress(render("TLS off, good requests only", report["tls_off"]))
        if faults and use_ray:
            fault_plan = LoadPlan(requests=fault_requests, concurrency=min(concurrency, 8), timeout_s=timeout_s,
                                  max_seconds=max_seconds / 4, bad_share=0.0, cancel_share=0.0, long_share=0.0, seed=2)
            report["faults"] = []
            for kind in ("sender", "adapter", "receiver"):
                row = asyncio.run(fault_run(stack, fault_plan, texts, kind))
                report["faults"].append(row)
                progress(f"kill {kind}: {row}")
                stack.wait_ready(kind, timeout=120)
    if tls_requests:
        with tempfile.TemporaryDirectory(prefix="densecomm-load-pki-") as directory:
            overrides, client = secure_overrides(directory)
            with make(load_config(None, relay_port=0, **overrides)) as stack:
                results, seconds = asyncio.run(run_load(stack.relay_address, clean, texts, client))
        report["tls_on"] = summarize(results, seconds, clean)
        progress(render("TLS on every hop (+ token, internal secret), good requests only", report["tls_on"]))
    return report


def render_report(report: dict) -> str:
    out = [f"Relay load on the zoo, {report['hosting']}, loopback; concurrency {report['concurrency']}", ""]
    for name in ("first half", "second half"):
        out.append(render(name, report[name]))
    out += ["", "RSS per service (MB)", render_rss(report["rss_mb"])]
    if "faults" in report:
        out += ["", "kills under load (SIGKILL to the actor's process; Ray restarts it)",
                f"  {'service':9s} {'calls':>6s} {'in flight at kill':>28s} {'failed after':>13s} {'past deadline':>14s} {'recovery s':>11s}"]
        for row in report["faults"]:
            flight = ", ".join(f"{k} {v}" for k, v in row["in_flight_at_kill"].items()) or "-"
            out.append(f"  {row['service']:9s} {row['calls']:6d} {flight:>28s} {row['failed_after_kill']:13d} "
                       f"{row['past_deadline']:14d} {row['recovery_s'] if row['recovery_s'] is not None else 'never':>11}")
    if "tls_on" in report:
        off, on = report["tls_off"], report["tls_on"]
        cost = (1 - on["good_ok_per_s"] / off["good_ok_per_s"]) * 100 if off["good_ok_per_s"] else float("nan")
        out += ["", "TLS on every hop vs plaintext (good requests only, same plan; plaintext on the stack above, TLS on a fresh one)",
                f"  {'':10s} {'good OK/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s}",
                f"  {'plaintext':10s} {off['good_ok_per_s']:10.2f} {off['p50_ms']:8.1f} {off['p99_ms']:8.1f}",
                f"  {'TLS':10s} {on['good_ok_per_s']:10.2f} {on['p50_ms']:8.1f} {on['p99_ms']:8.1f}",
                f"  TLS costs {cost:.1f} % of throughput"]
    return "\n".join(out)
