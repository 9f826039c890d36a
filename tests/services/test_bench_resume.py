"""bench resume's pieces: step counting from metrics.jsonl, the kill of a run and its Ray cluster, the table."""

import json
import subprocess
import sys

import psutil
import pytest

from services.bench.resume import ResumeRow, check_reference, kill_run, render, steps_done
from services.train.config import load_train_config


def test_steps_done_counts_both_phases_and_skips_partial_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert steps_done(metrics) == 0
    rows = [{"phase": "phase1", "step": s, "loss": 1.0} for s in (50, 100)] + [{"phase": "phase1", "event": "resumed", "step": 400}]
    rows += [{"phase": "phase2", "step": 50, "loss": 0.5}, {"phase": "phase2", "step": 100, "validation_aware_mean": 1.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"phase": "phase2", "st')
    assert steps_done(metrics) == 150  # phase1 100 + phase2 50; events and evaluation records carry no loss


def test_kill_run_kills_the_process_group_and_the_ray_session_processes():
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    # A stand-in for a raylet: another session, its command line naming the driver's Ray session directory.
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--log_dir=/tmp/ray/session_2026-01-01_00-00-00_1_{leader.pid}/logs"],
                              start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"/tmp/ray/session_x_1{leader.pid}"],
                                 start_new_session=True)
    try:
        assert kill_run(leader) == 1
        assert leader.poll() is not None
        raylet.wait(timeout=5)
        assert psutil.pid_exists(bystander.pid) and bystander.poll() is None  # another driver's session is left alone
    finally:
        for p in (leader, raylet, bystander):
            p.kill()
            p.wait()


def test_render_marks_the_target():
    validation = {"aware": {"choice": 0.96, "math": 1.0}, "unaware": {"choice": 0.88, "math": 1.0}}
    same = ResumeRow("uninterrupted", 1600, 2400, {}, validation, 1260.0)
    close = ResumeRow("killed at 2080/4000, resumed", 1600, 2400, {"phase2": 400},
                      {"aware": {"choice": 0.96, "math": 1.0}, "unaware": {"choice": 0.89, "math": 1.0}}, 1500.0)
    table = render([same, close])
    assert "phase2 step 400" in table and "| 1600 / 2400 |" in table
    assert "largest validation gap: 1.0 points (target <= 1): ok" in table
    far = ResumeRow("killed", 1600, 2200, {}, validation, 1.0)
    assert "same step counts: NO" in render([same, far]) and "missed" in render([same, far])


def test_check_reference_refuses_another_config(tmp_path):
    config = load_train_config("zoo", output_dir=str(tmp_path / "x"))
    state = {"config": config.to_dict() | {"output_dir": "elsewhere", "name": "other"}, "stages": {"finalize": {}}}
    (tmp_path / "run_state.json").write_text(json.dumps(state))
    check_reference(config, tmp_path)  # output_dir and name may differ
    state["config"]["seed"] = 7
    (tmp_path / "run_state.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit, match="seed"):
        check_reference(config, tmp_path)
