"""`densecomm train` as Ray Train jobs on a local Ray (127.0.0.1), 2 CPU workers with DDP over the adapter.

One zoo run covers the whole pipeline (traces, phase I, phase II with a worker killed by an injected fault,
finalize); one run on the layer/head layout of Qwen3-14B -> Qwen3-4B covers a real pair's geometry and a
stage-level --resume.
"""

from __future__ import annotations

import json

import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.relay import ContextMode, DenseRelay
from densecomm_core.zoo import tasks
from services.train.config import STAGES, load_train_config
from services.train.data import Example
from services.train.job import RunStateError, init_ray, run
from services.train.worker import relay_accuracy
from tests.conftest import QWEN3_LAYOUTS, tiny_model


@pytest.fixture(scope="module")
def local_ray():
    import ray

    init_ray(load_train_config(None))
    yield
    ray.shutdown()


def write_config(path, text: str):
    path.write_text(text)
    return load_train_config(path)


def unaware_accuracy(sender, receiver, adapter, examples) -> float:
    relay = DenseRelay(sender, receiver, adapter)
    hits, n = relay_accuracy(relay, examples, ContextMode.UNAWARE, tasks.extract_answer)
    return hits / n


def test_zoo_run_with_a_worker_failure_resumes_and_learns(tmp_path, local_ray, zoo_pair):
    out = tmp_path / "run"
    config = write_config(tmp_path / "zoo.toml", f"""
name = "zoo-test"
output_dir = "{out}"
[data]
train_size = 300
validation_size = 30
test_size = 0
[phase1]
steps = 60
batch_size = 8
lr = 3e-3
warmup_steps = 5
log_every = 10
eval_every = 30
checkpoint_every = 10
[phase2]
steps = 60
batch_size = 8
lr = 3e-3
warmup_steps = 5
log_every = 10
eval_every = 60
checkpoint_every = 10
[output]
calibrate_bases = false
[workers]
num_workers = 2
max_failures = 1
[fault]
phase = "phase2"
step = 35
rank = 1
""")
    state = run(config, STAGES)
    assert set(state["stages"]) == set(STAGES)
    assert sum(state["stages"]["traces"]["counts"].values()) == 300
    # The fault killed rank 1 at step 35; Ray Train restarted the group from the step-30 checkpoint.
    assert (out / "fault-phase2-35.done").exists()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"phase": "phase2", "event": "resumed", "step": 30} in events
    history = state["stages"]["phase2"]["history"]
    assert [r["step"] for r in history] == list(range(10, 61, 10))  # the loss curve continues, no restart from 0
    assert state["stages"]["phase2"]["steps"] == 60
    assert all(r["workers"] == 2 for r in events if "workers" in r)
    # The served adapter: loads as is, records the run, and beats the untrained adapter on held-out inputs.
    sender, receiver = zoo_pair
    trained = DenseAdapter.load(out / "adapter", sender.geometry, receiver.geometry)
    assert trained.config.recipe["name"] == "zoo-test" and "traces:" in trained.config.data_fingerprint
    assert set(trained.config.metrics["gates_by_phase"]) == {"phase1", "phase2"}
    torch.manual_seed(0)
    untrained = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry))
    held_out = [Example(e.family, e.context, e.answer) for e in tasks.make_split("validation", 20)]
    before, after = (unaware_accuracy(sender, receiver, a, held_out) for a in (untrained, trained))
    assert after > before + 0.1, (before, after)
    assert (out / "tensorboard").is_dir()
    with pytest.raises(RunStateError, match="already holds a run"):
        run(config, STAGES)


def test_qwen3_14b_to_4b_layout_through_ray_train_and_stage_resume(tmp_path, local_ray):
    paths = {}
    for side, layout, seed in (("sender", "qwen3-14b", 3), ("receiver", "qwen3-4b", 4)):
        model = tiny_model(QWEN3_LAYOUTS[layout], seed)
        paths[side] = tmp_path / layout
        model.model.save_pretrained(paths[side])
        model.tokenizer.save_pretrained(paths[side])
    out = tmp_path / "run"
    config = write_config(tmp_path / "real.toml", f"""
name = "qwen3-14b-to-4b"
output_dir = "{out}"
[models]
sender = "{paths['sender']}"
receiver = "{paths['receiver']}"
[data]
train_size = 24
validation_size = 6
test_size = 0
[traces]
max_new_tokens = 8
[phase1]
steps = 3
batch_size = 4
warmup_steps = 1
log_every = 1
[phase2]
steps = 3
batch_size = 4
warmup_steps = 1
log_every = 1
[adapter]
expansion = 2
[output]
calibrate_bases = false
[workers]
num_workers = 2
""")
    first = run(config, ("traces", "phase1"))
    assert set(first["stages"]) == {"traces", "phase1"}
    # A random receiver gets the gold answers wrong: math/recall traces are dropped, choice ones relabelled.
    counts = first["stages"]["traces"]["counts"]
    assert counts["relabelled"] == 8 and counts["kept"] + counts["dropped"] == 16
    resumed = run(config, ("phase1", "phase2"), resume=True)
    assert resumed["stages"]["phase1"] == first["stages"]["phase1"]  # done earlier: skipped, not retrained
    assert resumed["stages"]["phase2"]["steps"] == 3
    adapter = DenseAdapter.load(out / "phase2" / "adapter")
    assert (adapter.config.sender.num_layers, adapter.config.receiver.num_layers) == (40, 36)
    assert adapter.config.layer_map[-1] == 39 and adapter.config.group_map == list(range(8))
