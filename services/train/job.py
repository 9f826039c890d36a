"""`densecomm train`: receiver-self traces, phase I and phase II as Ray Train jobs, then the served adapter.

    plan(config)                 what a run will do (printed by --dry-run; data and config checked)
    run(config, stages, resume)  the stages in order; each records its result in run_state.json

Stages:
- ``traces``   the receiver writes guided solutions (paper appendix A), spread over Ray tasks; traces.jsonl
- ``phase1``   reconstruction (eq. 5) as a TorchTrainer job; its final adapter initialises phase II
- ``phase2``   mixed-regime generation (eq. 6-7) as a TorchTrainer job
- ``finalize`` validation and test accuracy, gate statistics, the pca basis of the adapter's output space,
               and ``<output_dir>/adapter``: a directory ``densecomm serve`` loads as is
Checkpoints go through ``ray.train.report``; ``RunConfig(storage_path=<output_dir>/ray, name=<name>-<phase>)``
is the same on a resumed run, so Ray Train restores the latest checkpoint and the loop continues from it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.train.config import STAGES, TrainConfig, TrainConfigError
from services.train.data import (
    Splits,
    load_splits,
    prompt_format,
    trace_requests,
)

STATE_FILE = "run_state.json"


class RunStateError(TrainConfigError):
    """The output directory holds another run, or a stage's input is missing."""


@dataclass
class RunState:
    """Which stages finished and what they produced; rewritten atomically after each stage."""

    path: Path
    data: dict

    @classmethod
    def open(cls, config: TrainConfig, resume: bool) -> RunState:
        path = config.output_path / STATE_FILE
        if path.exists():
            data = json.loads(path.read_text())
            if not resume:
                raise RunStateError(f"output_dir {str(config.output_path)!r} already holds a run (stages done: "
                                    f"{sorted(data.get('stages', {}))}); pass --resume to continue it or choose another output_dir")
            changed = changed_settings(data.get("config", {}), config)
            if changed:
                raise RunStateError(
                    f"--resume with settings other than the run in {str(config.output_path)!r}: {'; '.join(changed)}. A "
                    "resumed run trains what it started (only [workers], [output], [fault] and the [models] devices may "
                    "change): restore them, or start another output_dir")
            return cls(path, data)
        config.output_path.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"config": config.to_dict(), "stages": {}})
        state.write()
        return state

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def record(self, stage: str, result: dict) -> None:
        self.data["stages"][stage] = result
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(self.path)


# What a resumed run may change: where and how it runs, not what it trains
RESUMABLE = {"output_dir", "workers", "output", "fault", "models.sender_device", "models.receiver_device"}


def changed_settings(saved: dict, config: TrainConfig) -> list[str]:
    """``section.key: saved -> now`` for every setting ``config`` changes from a run's saved config (keys the saved
    config predates count as their defaults), except the RESUMABLE ones."""
    from services.train.config import config_from_dict

    try:
        saved = config_from_dict(saved).to_dict()  # fills keys added since the run started with their defaults
    except (TypeError, KeyError):
        pass  # another version's layout: compared as it is
    changed = []
    for name, value in config.to_dict().items():
        if name in RESUMABLE:
            continue
        if isinstance(value, dict):
            old = saved.get(name) if isinstance(saved.get(name), dict) else {}
            changed += [f"[{name}].{key} {old.get(key)!r} -> {now!r}" for key, now in value.items()
                        if f"{name}.{key}" not in RESUMABLE and old.get(key) != now]
        elif saved.get(name) != value:
            changed.append(f"{name} {saved.get(name)!r} -> {value!r}")
    return changed


def plan(config: TrainConfig) -> str:
    """Load the data (every row checked) and describe the run without starting Ray."""
    splits = load_splits(config)
    if not splits.train:
        raise TrainConfigError("[data] yields no training examples")
    if not splits.validation:
        raise TrainConfigError("[data] yields no validation examples (model selection needs them)")
    w, m = config.workers, config.models
    families = sorted({e.family for e in splits.train})
    lines = [
        f"run {config.name!r} -> {config.output_path}",
        f"models: sender {m.sender} on {m.sender_device}, receiver {m.receiver} on {m.receiver_device}, {m.dtype}",
        f"data: {config.data.source}; train {len(splits.train)}, validation {len(splits.validation)}, test {len(splits.test)} "
        f"examples; families {families}; fingerprints {splits.fingerprint()}",
        f"workers: {w.num_workers} x ({w.cpus_per_worker} CPU" + (f", {w.gpus_per_worker} GPU" if w.use_gpu else "")
        + f"), DDP over the adapter, max_failures {w.max_failures}",
        f"traces: {len(splits.train)} guided prompts, batches of {config.traces.batch_size}, "
        f"{config.traces.tasks or w.num_workers} Ray tasks",
    ]
    for name in ("phase1", "phase2"):
        ph = getattr(config, name)
        extra = f", input codec {ph.input_codec} {ph.input_codec_params} p={ph.p_input_codec}" if name == "phase2" and ph.input_codec else ""
        extra += f", reconstruction anchor x{ph.recon_weight}" if name == "phase2" and ph.recon_weight else ""
        lines.append(f"{name}: {ph.steps} steps x global batch {ph.batch_size} ({ph.batch_size // w.num_workers} per worker), "
                     f"lr {ph.lr} (gates x{ph.gate_lr_multiplier}), warmup {ph.warmup_steps}, eval every {ph.eval_every}, "
                     f"checkpoint every {ph.checkpoint_every}{extra}")
    lines.append(f"finalize: validation + test accuracy, gates, adapter -> {config.output_path / 'adapter'}")
    return "\n".join(lines)


def init_ray(config: TrainConfig) -> bool:
    """Join [workers].ray_address / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = config.workers.ray_address or os.environ.get("RAY_ADDRESS")
    # Workers import this package by name; the driver's working directory may not be on their path.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                              os.environ.get("PYTHONPATH", "")]))}}
    # Workers' own output stays in Ray's session logs; the driver prints progress from metrics.jsonl.
    if address:
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False, log_to_driver=False)
        return False
    needed = config.workers.num_workers * config.workers.cpus_per_worker + 1
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
             runtime_env=runtime_env, configure_logging=False, log_to_driver=False)
    return True


def progress_line(record: dict) -> str:
    """One human line per metrics.jsonl record: step, loss, tokens/s, eta, and validation figures when present."""
    phase = record.get("phase", "?")
    if record.get("event") == "resumed":
        return f"[{phase}] resumed from the checkpoint at step {record['step']}"
    eta = record.get("eta_s", 0.0)
    line = (f"[{phase}] step {record['step']}/{record.get('steps', '?')}  loss {record['loss']:.4f}  "
            f"{record['tokens_per_s'] * record.get('workers', 1):.0f} tok/s  {record['seconds_per_step']:.2f} s/step  "
            f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
    if "validation_loss" in record:
        line += f"  validation loss {record['validation_loss']:.4f}"
    if "validation_unaware_mean" in record:
        line += f"  validation aware {record['validation_aware_mean']:.3f} unaware {record['validation_unaware_mean']:.3f}"
    if "validation_recon_loss" in record:
        line += f"  reconstruction {record['validation_recon_loss']:.4f}"
    if "peak_rss_mib" in record:
        line += "  peak RSS " + "/".join(f"{r:.0f}" for r in record["peak_rss_mib"]) + " MiB"
    if "gate_median" in record:
        line += f"  gates {record['gate_min']:.2f}/{record['gate_median']:.2f}/{record['gate_max']:.2f}"
    return line


class ProgressTail:
    """Follows metrics.jsonl in a thread and prints each new record as a progress line."""

    def __init__(self, path: Path, interval_s: float = 1.0) -> None:
        self.path, self.interval_s = path, interval_s
        self.offset = path.stat().st_size if path.exists() else 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> ProgressTail:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self._drain()

    def _follow(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self._drain()

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith("\n"):
                    break  # a record still being written: read it next time
                self.offset += len(line.encode())
                try:
                    print(progress_line(json.loads(line)), flush=True)
                except (ValueError, KeyError):
                    pass


# ---- stage: receiver-self traces ---------------------------------------------------------------


def _trace_shard(config_dict: dict, requests: list, worker_gpu: bool):
    import torch

    from densecomm_core.generation import GenerationConfig
    from densecomm_core.training.traces import generate_receiver_traces
    from services.train.config import config_from_dict
    from services.train.data import answer_reader
    from services.train.worker import load_side

    config = config_from_dict(config_dict)
    torch.set_num_threads(config.workers.torch_threads)
    # Only the receiver decodes traces. A plain Ray task sees only its own GPUs: "cuda:N" is literal here.
    receiver = load_side(config, "receiver", torch.device("cuda") if worker_gpu else torch.device("cpu"))
    return generate_receiver_traces(receiver, requests, answer_reader(config), config.prompts.answer_template,
                                    GenerationConfig(max_new_tokens=config.traces.max_new_tokens), config.traces.batch_size)


def run_traces(config: TrainConfig, splits: Splits) -> dict:
    import ray

    from densecomm_core.training.traces import save_traces, traces_fingerprint

    requests = trace_requests(config, splits.train)
    tasks = max(1, min(config.traces.tasks or config.workers.num_workers, len(requests)))
    w = config.workers
    remote = ray.remote(num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker if w.use_gpu else 0)(_trace_shard)
    started = time.perf_counter()
    shards = [requests[i::tasks] for i in range(tasks)]
    results = ray.get([remote.remote(config.to_dict(), s, w.use_gpu) for s in shards])
    # Back into the training examples' order (shards were strided).
    records = [None] * len(requests)
    stats = {"kept": 0, "relabelled": 0, "dropped": 0}
    for i, (shard_records, shard_stats) in enumerate(results):
        records[i::tasks] = shard_records
        for key in stats:
            stats[key] += shard_stats[key]
    save_traces(records, config.output_path / "traces.jsonl")
    seconds = time.perf_counter() - started
    print(f"[traces] {len(records)} guided prompts on {tasks} task(s) in {seconds:.0f} s: kept {stats['kept']}, "
          f"relabelled {stats['relabelled']}, dropped {stats['dropped']}", flush=True)
    return {"counts": stats, "tasks": tasks, "seconds": round(seconds, 1), "fingerprint": traces_fingerprint(records),
            "file": str(config.output_path / "traces.jsonl")}


# ---- stages: phase I and phase II as Ray Train jobs --------------------------------------------


def run_phase(config: TrainConfig, phase: str, init_adapter: str | None) -> dict:
    """One TorchTrainer job; saves the final adapter under ``<output>/<phase>/adapter`` and returns its summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from densecomm_core.adapter import AdapterConfig, DenseAdapter
    from densecomm_core.training.loop import TrainingState
    from services.train.worker import STATE_FILE as WORKER_STATE
    from services.train.worker import train_loop_per_worker

    w = config.workers
    resources = {"CPU": w.cpus_per_worker} | ({"GPU": w.gpus_per_worker} if w.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "phase": phase, "init_adapter": init_adapter},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{config.name}-{phase}",
            storage_path=str(config.output_path / "ray"),
            failure_config=FailureConfig(max_failures=w.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    started = time.perf_counter()
    with ProgressTail(config.output_path / "metrics.jsonl"):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RunStateError(f"{phase} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = TrainingState.load(Path(directory) / WORKER_STATE, phase)
    if state.step != getattr(config, phase).steps:
        raise RunStateError(f"{phase} stopped at step {state.step} of {getattr(config, phase).steps}")
    geometry = _pair_geometry(config)
    adapter = DenseAdapter(AdapterConfig(*geometry, expansion=config.adapter.expansion, gate_init=config.adapter.gate_init))
    adapter.load_state_dict(state.adapter)
    out = config.output_path / phase / "adapter"
    adapter.save(out)
    return {"steps": state.step, "seconds": round(time.perf_counter() - started, 1), "adapter": str(out),
            "history": state.history, "checkpoint": result.checkpoint.path}


def check_phase2_window(config: TrainConfig, splits: Splits) -> None:
    """Refuse phase II before any worker starts when a batch could cross a sliding-window receiver's window
    (``phase2.window_overflow``, from the tokenizers, the receiver's config and the traces)."""
    from transformers import AutoConfig

    from densecomm_core.models import load_tokenizer
    from densecomm_core.relay import config_sliding_window
    from densecomm_core.training.phase2 import window_overflow
    from densecomm_core.training.traces import load_traces, match_traces
    from services.train.worker import model_paths

    paths = model_paths(config)
    window = config_sliding_window(AutoConfig.from_pretrained(paths["receiver"], local_files_only=True).get_text_config())
    if not window:
        return
    records = match_traces(load_traces(config.output_path / "traces.jsonl"), [e.question for e in splits.train])
    rows = -(-config.phase2.batch_size // config.workers.num_workers)
    message = window_overflow(load_tokenizer(paths["sender"]), load_tokenizer(paths["receiver"]), window, records, rows,
                              prompt_format(config))
    if message:
        raise TrainConfigError(f"[phase2] batch_size {config.phase2.batch_size}: receiver {paths['receiver']!r}: {message}")


def _pair_geometry(config: TrainConfig):
    """Both models' geometry from their configs alone (no weights loaded in the driver)."""
    from densecomm_core.models import load_rope_model
    from services.train.worker import model_paths

    paths = model_paths(config)
    return load_rope_model(paths["sender"]).geometry, load_rope_model(paths["receiver"]).geometry


# ---- stage: finalize ---------------------------------------------------------------------------


def _finalize_task(config_dict: dict, adapter_dir: str, out_dir: str, worker_gpu: bool, provenance: dict) -> dict:
    """Score the final adapter on validation and test (both regimes), fit its output basis, and save it
    once, its config recording the recipe, ``provenance["data_fingerprint"]`` and the metrics
    (``provenance["metrics"]`` plus this stage's figures)."""
    import torch

    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.relay import ContextMode, DenseRelay
    from services.train.config import config_from_dict
    from services.train.data import answer_reader, load_splits, prompt_format
    from services.train.worker import gate_summary, load_pair, relay_accuracy

    config = config_from_dict(config_dict)
    torch.set_num_threads(max(1, int(config.workers.cpus_per_worker * config.workers.num_workers)))
    sender, receiver = load_pair(config, torch.device("cuda") if worker_gpu else torch.device("cpu"))  # a Ray task: literal indices
    adapter = DenseAdapter.load(adapter_dir, sender.geometry, receiver.geometry).to(receiver.model.device)
    splits, read = load_splits(config), answer_reader(config)
    relay = DenseRelay(sender, receiver, adapter, prompt_format(config))
    figures: dict = {"gates": gate_summary(adapter)}
    for split in ("validation", "test"):
        examples = getattr(splits, split)
        for mode in ContextMode:
            per_family = {}
            for family in sorted({e.family for e in examples}):
                hits, n = relay_accuracy(relay, [e for e in examples if e.family == family], mode, read)
                per_family[family] = hits / n
            if per_family:
                figures[f"{split}_{mode.value}"] = per_family
    if config.output.calibrate_bases:
        from densecomm_core.codec.calibrate import calibrate
        from densecomm_core.codec.transform import BASIS_FILE

        texts = [prompt_format(config).sender.format(context=e.question) for e in splits.train[:900]]
        _, receiver_basis = calibrate(sender, texts, adapter, receiver)
        figures["basis"] = BASIS_FILE
    else:
        receiver_basis = None
    adapter.config.recipe = config_dict
    adapter.config.data_fingerprint = provenance["data_fingerprint"]
    adapter.config.metrics = provenance["metrics"] | {k: v for k, v in figures.items() if k != "basis"}
    adapter.save(out_dir)
    if receiver_basis is not None:
        receiver_basis.save(Path(out_dir) / BASIS_FILE)
    return figures


def run_finalize(config: TrainConfig, state: RunState, splits: Splits) -> dict:
    import ray

    w = config.workers
    out = config.output_path / "adapter"
    stages = state.data["stages"]
    provenance = {
        "data_fingerprint": "/".join(f"{k}:{v}" for k, v in splits.fingerprint().items()) + f"/traces:{stages['traces']['fingerprint']}",
        "metrics": {
            "phase1": stages["phase1"]["history"][-1:], "phase2": stages["phase2"]["history"][-1:],
            "trace_counts": stages["traces"]["counts"],
            "gates_by_phase": {p: _gates_of(stages[p]["history"]) for p in ("phase1", "phase2")},
        },
    }
    remote = ray.remote(num_cpus=w.cpus_per_worker * w.num_workers, num_gpus=w.gpus_per_worker if w.use_gpu else 0)(_finalize_task)
    started = time.perf_counter()
    figures = ray.get(remote.remote(config.to_dict(), stages["phase2"]["adapter"], str(out), w.use_gpu, provenance))
    print(f"[finalize] adapter saved to {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    for key, value in figures.items():
        if key.startswith(("validation", "test")):
            print(f"[finalize] {key}: " + ", ".join(f"{f} {100 * a:.1f}" for f, a in value.items()), flush=True)
    return {"adapter": str(out), **figures, "seconds": round(time.perf_counter() - started, 1)}


def _gates_of(history: list[dict]) -> dict:
    last = [r for r in history if "gate_median" in r]
    return {k: v for k, v in last[-1].items() if k.startswith("gate_")} if last else {}


# ---- the run -----------------------------------------------------------------------------------


def run(config: TrainConfig, stages: tuple[str, ...] = STAGES, resume: bool = False) -> dict:
    """Run ``stages`` (in pipeline order) and return run_state.json's content."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise TrainConfigError(f"unknown stage(s) {sorted(unknown)}; expected some of {STAGES}")
    print(plan(config), flush=True)
    from densecomm_core.models import check_shared_tokenizer_at
    from services.train.worker import model_paths

    check_shared_tokenizer_at(**model_paths(config))  # before the traces stage decodes for minutes
    state = RunState.open(config, resume)
    splits = load_splits(config)
    state.data["data_fingerprints"] = splits.fingerprint()
    started_ray = init_ray(config)
    try:
        for stage in STAGES:
            if stage not in stages:
                continue
            if state.done(stage):
                print(f"[{stage}] done in an earlier run; skipped", flush=True)
                continue
            started = time.perf_counter()
            if stage == "traces":
                result = run_traces(config, splits)
            elif stage == "phase1":
                result = run_phase(config, "phase1", None)
            elif stage == "phase2":
                if not state.done("traces") or not state.done("phase1"):
                    raise RunStateError("phase2 needs the traces and phase1 stages of this run first")
                check_phase2_window(config, splits)  # here, not in the workers: Ray Train would retry a refusal
                result = run_phase(config, "phase2", state.data["stages"]["phase1"]["adapter"])
            else:
                if not state.done("phase2"):
                    raise RunStateError("finalize needs the phase2 stage of this run first")
                result = run_finalize(config, state, splits)
            result["wall_s"] = round(time.perf_counter() - started, 1)
            state.record(stage, result)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return state.data


def train_zoo_adapter(work_dir: str | Path, root: Path | None = None, seed: int | None = None, resume: bool = False,
                      suite: str = "v1") -> Path:
    """The zoo recipe of ``suite`` (``--config zoo``, ``zoo-v2``) on its LMs under ``root`` (default: the
    committed ones); returns the finished adapter directory (``<work_dir>/adapter``)."""
    from dataclasses import replace

    from densecomm_core.zoo.pair import zoo_model_dirs
    from services.train.config import load_train_config, zoo_config_name

    config = load_train_config(zoo_config_name(suite), output_dir=str(work_dir), seed=seed)
    if root is not None:
        sender_dir, receiver_dir = zoo_model_dirs(root, suite)
        config = replace(config, models=replace(config.models, sender=str(sender_dir), receiver=str(receiver_dir)))
    return Path(run(config, STAGES, resume=resume)["stages"]["finalize"]["adapter"])
