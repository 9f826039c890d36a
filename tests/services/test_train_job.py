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
    evaluated = [r for r in events if r.get("phase") == "phase2" and "validation_aware_mean" in r]
    assert evaluated and all(r["validation_recon_loss"] > 0 for r in evaluated)  # the cache's drift, in every phase II evaluation
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


def test_cuda_indices_map_to_the_ray_train_workers_own_gpus():
    """TorchTrainer shares CUDA_VISIBLE_DEVICES across a node's workers: the second of two 2-GPU workers sees
    cuda:0..3 and owns cuda:2 and cuda:3. Its "cuda:N" is its own N-th GPU; a plain Ray task's is literal."""
    from services.train.worker import resolve_device

    own, cpu = [torch.device("cuda:2"), torch.device("cuda:3")], torch.device("cpu")
    assert [resolve_device(n, own[0], own) for n in ("cuda:0", "cuda:1", "cuda", "auto")] == [own[0], own[1], own[0], own[0]]
    assert resolve_device("cpu", own[0], own) == cpu
    assert resolve_device("cuda:1", torch.device("cuda"), None) == torch.device("cuda:1")  # a Ray task sees only its GPUs
    assert resolve_device("auto", cpu) == cpu
    with pytest.raises(ValueError, match=r"device 'cuda:2' names GPU 2 of the worker, which has 2: \['cuda:2', 'cuda:3'\]"):
        resolve_device("cuda:2", own[0], own)


def gpu_config(tmp_path, models: str):
    """A config whose workers hold 2 GPUs each, with ``models`` as its [models] table's lines."""
    return write_config(tmp_path / "gpu.toml", f"""
output_dir = "{tmp_path / 'run'}"
[workers]
use_gpu = true
gpus_per_worker = 2
[models]
{models}
""")


def test_a_gpu_worker_loads_the_pair_on_its_own_gpus(tmp_path, monkeypatch):
    """train_loop_per_worker hands ray.train.torch.get_devices() to load_pair, which places each side there."""
    import ray.train
    import ray.train.torch

    from services.train import worker

    config = gpu_config(tmp_path, 'sender_device = "cuda:0"\nreceiver_device = "cuda:1"')
    own = [torch.device("cuda:2"), torch.device("cuda:3")]

    class Context:
        get_world_rank, get_world_size = staticmethod(lambda: 1), staticmethod(lambda: 2)

    class Loaded(Exception):
        pass

    def fake_load_pair(config, worker_device, own_gpus=None):
        raise Loaded(worker_device, own_gpus)

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train.torch, "get_devices", lambda: own)
    monkeypatch.setattr(worker, "load_pair", fake_load_pair)
    with pytest.raises(Loaded) as caught:
        worker.train_loop_per_worker({"config": config.to_dict(), "phase": "phase1"})
    assert caught.value.args == (own[0], own)
    monkeypatch.undo()

    loaded = []
    monkeypatch.setattr(worker, "load_model", lambda path, dtype, device: loaded.append((path, dtype, device)) or path)
    monkeypatch.setattr(worker, "check_shared_tokenizer", lambda sender, receiver: None)
    paths = worker.model_paths(config)
    assert worker.load_pair(config, own[0], own) == (paths["sender"], paths["receiver"])
    assert loaded == [(paths["sender"], torch.float32, own[0]), (paths["receiver"], torch.float32, own[1])]


def test_trace_stage_loads_only_the_receiver(tmp_path, monkeypatch):
    """The traces are the receiver's own answers: the sender is never loaded. A plain Ray task owns its GPUs,
    so "cuda:1" is taken literally there."""
    from densecomm_core.training import traces
    from services.train import worker
    from services.train.job import _trace_shard

    config = gpu_config(tmp_path, 'receiver_device = "cuda:1"')
    loaded = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(worker, "load_model", lambda path, dtype, device: loaded.append((path, device)) or f"model {path}")
    monkeypatch.setattr(traces, "generate_receiver_traces", lambda receiver, requests, *args: (receiver, requests))
    receiver = worker.model_paths(config)["receiver"]
    assert _trace_shard(config.to_dict(), ["request"], True) == (f"model {receiver}", ["request"])
    assert loaded == [(receiver, torch.device("cuda:1"))]


def test_a_pair_with_different_tokenizers_is_refused_before_any_stage(tmp_path):
    """The driver compares the two tokenizers (no weights read) before the traces stage decodes for minutes."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from densecomm_core.errors import IncompatiblePairError

    paths = {}
    for side, layout in (("sender", "qwen3-14b"), ("receiver", "qwen3-4b")):
        model = tiny_model(QWEN3_LAYOUTS[layout])
        paths[side] = tmp_path / layout
        model.model.save_pretrained(paths[side])
        model.tokenizer.save_pretrained(paths[side])
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>")),
                                    eos_token="<unk>")
    other.save_pretrained(paths["receiver"])
    out = tmp_path / "run"
    config = write_config(tmp_path / "mixed.toml", f"""
output_dir = "{out}"
[models]
sender = "{paths['sender']}"
receiver = "{paths['receiver']}"
""")
    with pytest.raises(IncompatiblePairError, match="different tokenizers"):
        run(config, STAGES)
    assert not (out / "run_state.json").exists()  # nothing started


def test_phase2_over_a_sliding_window_is_refused_in_the_driver(tmp_path):
    """A phase II whose batches could cross the receiver's sliding window is refused before any worker starts (a
    refusal inside the Ray Train workers was retried max_failures times, reloading both models each time)."""
    from densecomm_core.training.traces import TraceRecord, save_traces
    from services.train.config import TrainConfigError
    from services.train.data import load_splits
    from services.train.job import check_phase2_window
    from tests.test_relay import _sliding_window_receiver

    receiver = _sliding_window_receiver(window=8)
    receiver.model.save_pretrained(tmp_path / "mistral")
    receiver.tokenizer.save_pretrained(tmp_path / "mistral")
    out = tmp_path / "run"
    config = write_config(tmp_path / "window.toml", f"""
output_dir = "{out}"
[models]
receiver = "{tmp_path / 'mistral'}"
[phase2]
batch_size = 4
""")
    splits = load_splits(config)
    out.mkdir()
    save_traces([TraceRecord(context=e.question, answer=e.answer, trace=" 5") for e in splits.train[:8]], out / "traces.jsonl")
    with pytest.raises(TrainConfigError, match=r"\[phase2\] batch_size 4: .* its sliding window is 8"):
        check_phase2_window(config, splits)
    check_phase2_window(write_config(tmp_path / "one.toml", f"""
output_dir = "{out}"
[models]
receiver = "{tmp_path / 'mistral'}"
[phase2]
batch_size = 2
"""), splits)  # one row per worker (two workers by default): no padding, nothing to refuse
