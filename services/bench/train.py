"""`densecomm bench train`: seconds per step of phase I and phase II with 1 and with 2 Ray Train workers, one run.

The same global batch (the config's) is split over the workers, so the figures compare like with like:
data parallelism halves each worker's forward/backward, and DDP adds one all-reduce of the adapter's
gradients per step (gloo over loopback on CPU). Peak RSS per worker comes from each worker's getrusage.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from services.train.config import TrainConfig


@dataclass
class TrainBenchRow:
    phase: str
    workers: int
    seconds_per_step: float  # median over logged intervals, the first (warm-up) interval excluded
    tokens_per_s: float
    peak_rss_mib: list[float]
    adapter_params: int


def _short(config: TrainConfig, workers: int, steps: int, out: Path) -> TrainConfig:
    w = replace(config.workers, num_workers=workers)
    phase = lambda p: replace(p, steps=steps, warmup_steps=min(p.warmup_steps, steps // 4), log_every=max(1, steps // 10),
                              eval_every=10 * steps, checkpoint_every=steps)
    data = replace(config.data, train_size=min(config.data.train_size, 600), test_size=0)
    return replace(config, name=f"bench-{workers}w", output_dir=str(out), workers=w, data=data,
                   phase1=phase(config.phase1), phase2=phase(config.phase2), output=replace(config.output, calibrate_bases=False))


def measure(config: TrainConfig, steps: int, worker_counts: tuple[int, ...] = (1, 2)) -> list[TrainBenchRow]:
    from densecomm_core.adapter import DenseAdapter
    from services.train.job import run

    rows = []
    for workers in worker_counts:
        with tempfile.TemporaryDirectory() as tmp:
            short = _short(config, workers, steps, Path(tmp) / "run")
            state = run(short, ("traces", "phase1", "phase2"))
            params = sum(p.numel() for p in DenseAdapter.load(state["stages"]["phase2"]["adapter"]).parameters())
            records = [json.loads(line) for line in (short.output_path / "metrics.jsonl").read_text().splitlines()]
            for phase in ("phase1", "phase2"):
                logged = [r for r in records if r.get("phase") == phase and "seconds_per_step" in r][1:]
                rows.append(TrainBenchRow(
                    phase, workers, statistics.median(r["seconds_per_step"] for r in logged),
                    statistics.median(r["tokens_per_s"] * workers for r in logged), logged[-1]["peak_rss_mib"], params))
    return rows


def render(rows: list[TrainBenchRow]) -> str:
    base = {r.phase: r.seconds_per_step for r in rows if r.workers == 1}
    lines = ["| phase | workers | s / step | speed-up vs 1 worker | tokens / s | peak RSS per worker (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{base[r.phase] / r.seconds_per_step:.2f}x" if r.phase in base else "-"
        lines.append(f"| {r.phase} | {r.workers} | {r.seconds_per_step:.3f} | {speedup} | {r.tokens_per_s:.0f} | "
                     + " / ".join(f"{m:.0f}" for m in r.peak_rss_mib) + " |")
    return "\n".join(lines)
