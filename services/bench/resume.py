"""`densecomm bench resume`: a training run killed with SIGKILL part way, then `--resume`d, against an uninterrupted run.

The killed run is a real `densecomm train` process in its own session: at the chosen fraction of all
optimizer steps (phase I + phase II) the whole process group gets SIGKILL, and so does every process of
the Ray cluster the command had started (Ray's session directory is named after the driver's PID). Then
`densecomm train --resume` on the same output directory finishes the run. The table compares the two
runs' step counts and final validation accuracy (the finalize stage's, every validation example).
The uninterrupted run is either run here or an earlier run of the same config (``--reference DIR``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.train.config import TrainConfig


@dataclass
class ResumeRow:
    run: str
    phase1_steps: int
    phase2_steps: int
    resumed_at: dict  # phase -> the checkpoint step the restarted loop continued from
    validation: dict  # "aware" / "unaware" -> family -> accuracy
    wall_s: float


def total_steps(config: TrainConfig) -> int:
    return config.phase1.steps + config.phase2.steps


def steps_done(metrics: Path) -> int:
    """Optimizer steps logged so far, phase I's counted before phase II's."""
    if not metrics.exists():
        return 0
    done = {"phase1": 0, "phase2": 0}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("phase") in done and "loss" in record:
            done[record["phase"]] = max(done[record["phase"]], record["step"])
    return done["phase1"] + done["phase2"]  # phase II starts after phase I's last step


def train_command(config_arg: str, out: Path, seed: int, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "services.cli", "train", "--config", config_arg, "--output-dir", str(out), "--seed", str(seed)]
    return command + (["--resume"] if resume else [])


def kill_run(process: subprocess.Popen) -> int:
    """SIGKILL the command's process group and its Ray cluster; returns how many processes were killed."""
    session = f"_{process.pid}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    victims = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if any(part.startswith("session_") and part.endswith(session) for part in cmdline.replace("/", " ").split()):
            victims.append(p)
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def summarize(name: str, out: Path, wall_s: float | None = None) -> ResumeRow:
    """A finished run's figures; ``wall_s`` None: the sum of its stages' wall times (an earlier run)."""
    state = json.loads((out / "run_state.json").read_text())
    stages = state["stages"]
    if wall_s is None:
        wall_s = sum(stage.get("wall_s", 0.0) for stage in stages.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resumed = {r["phase"]: r["step"] for r in records if r.get("event") == "resumed"}
    finalize = stages["finalize"]
    return ResumeRow(name, stages["phase1"]["steps"], stages["phase2"]["steps"], resumed,
                     {mode: finalize[f"validation_{mode}"] for mode in ("aware", "unaware")}, wall_s)


def run_killed(config_arg: str, config: TrainConfig, out: Path, seed: int, fraction: float, log) -> ResumeRow:
    """Train to ``fraction`` of all steps, SIGKILL everything, then ``--resume`` to the end."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the killed run needs a fresh output directory")
    at = int(fraction * total_steps(config))
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.killed.log", "w") as sink:
        process = subprocess.Popen(train_command(config_arg, out, seed, False), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while process.poll() is None and steps_done(out / "metrics.jsonl") < at:
            time.sleep(2)
        if process.poll() is not None:
            raise SystemExit(f"the run ended (exit {process.returncode}) before step {at}; see {sink.name}")
        done = steps_done(out / "metrics.jsonl")
        killed = kill_run(process)
    log(f"SIGKILL at step {done} of {total_steps(config)} (command and {killed} Ray processes); resuming")
    with open(out.parent / f"{out.name}.resumed.log", "w") as sink:
        code = subprocess.run(train_command(config_arg, out, seed, True), stdout=sink, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"densecomm train --resume exited {code}; see {sink.name}")
    return summarize(f"killed at {done}/{total_steps(config)}, resumed", out, time.perf_counter() - started)


def run_reference(config_arg: str, out: Path, seed: int) -> ResumeRow:
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as sink:
        code = subprocess.run(train_command(config_arg, out, seed, False), stdout=sink, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"densecomm train exited {code}; see {sink.name}")
    return summarize("uninterrupted", out, time.perf_counter() - started)


def check_reference(config: TrainConfig, reference: Path) -> None:
    """The reference run must be this config (output directory and name aside)."""
    state = json.loads((reference / "run_state.json").read_text())
    theirs, ours = state["config"], config.to_dict()
    differ = sorted(k for k in set(ours) | set(theirs) if k not in ("output_dir", "name") and ours.get(k) != theirs.get(k))
    if differ:
        raise SystemExit(f"--reference {reference} ran another config: {', '.join(differ)} differ")
    if "finalize" not in state["stages"]:
        raise SystemExit(f"--reference {reference} has not finished (no finalize stage)")


def render(rows: list[ResumeRow]) -> str:
    lines = ["| run | phase I / II steps | resumed from checkpoint | validation aware (per family) | validation unaware (per family) | wall |",
             "|---|---|---|---|---|---|"]
    fmt = lambda acc: " / ".join(f"{f} {100 * a:.1f}" for f, a in sorted(acc.items()))
    for r in rows:
        resumed = ", ".join(f"{p} step {s}" for p, s in sorted(r.resumed_at.items())) or "-"
        lines.append(f"| {r.run} | {r.phase1_steps} / {r.phase2_steps} | {resumed} | {fmt(r.validation['aware'])} | "
                     f"{fmt(r.validation['unaware'])} | {r.wall_s / 60:.1f} min |")
    if len(rows) == 2:
        first, second = (r.validation for r in rows)
        gap = max(abs(first[mode][f] - second[mode].get(f, -1.0)) for mode in first for f in first[mode])
        same = (rows[0].phase1_steps, rows[0].phase2_steps) == (rows[1].phase1_steps, rows[1].phase2_steps)
        lines.append("")
        lines.append(f"same step counts: {'yes' if same else 'NO'}; largest validation gap: {100 * gap:.1f} points "
                     f"(target <= 1): {'ok' if same and gap <= 0.01 + 1e-9 else 'missed'}")
    return "\n".join(lines)
