"""What runs inside each Ray Train worker: load the frozen pair once, wrap only the adapter in DDP, run one phase.

    train_loop_per_worker(loop_config)       the TorchTrainer entry point for phase1 and phase2
    load_pair(config, device, gpus)          the frozen sender and receiver on their devices
    load_side(config, side, device, gpus)    one of them (the traces stage needs only the receiver)
    resolve_device(name, device, gpus)       a [models] device: "cuda:N" is a Ray Train worker's N-th own GPU

Every worker draws the same global batch of a step (``training.loop.batch_rng``) and computes its shard;
DDP averages the gradients. Rank 0 writes checkpoints through ``ray.train.report``; a restarted worker
group (or a new ``densecomm train --resume``) continues from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.models import DTYPES, LoadedModel, check_shared_tokenizer, load_model
from densecomm_core.relay import ContextMode, DenseRelay
from densecomm_core.training.loop import (
    LoopConfig,
    TrainingState,
    build_optimizer,
    cuda_rng_state,
    restore_rng,
    run_steps,
    shard,
)
from densecomm_core.training.phase1 import (
    Phase1Config,
    batch_loss,
    phase1_batch,
    phase1_step,
    vocabulary_words,
)
from densecomm_core.training.phase2 import Phase2Config, phase2_batch, phase2_step
from densecomm_core.training.traces import load_traces, match_traces
from services.train.config import TrainConfig, config_from_dict
from services.train.data import answer_reader, load_splits, prompt_format

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class InjectedFault(RuntimeError):
    """Raised once by [fault] to exercise Ray Train's restart-from-checkpoint path."""


def resolve_device(name: str, worker_device: torch.device, own_gpus: Sequence[torch.device] | None = None) -> torch.device:
    """``"auto"`` is the worker's device. With ``own_gpus`` (a Ray Train worker's ``ray.train.torch.get_devices()``),
    ``"cuda[:N]"`` is the worker's N-th own GPU: TorchTrainer shares CUDA_VISIBLE_DEVICES across a node's workers,
    so a literal index would name another worker's GPU. Without it (a plain Ray task, which sees only its own
    GPUs) the name is taken literally."""
    if name == "auto":
        return worker_device
    device = torch.device(name)
    if own_gpus is None or device.type != "cuda":
        return device
    index = device.index or 0
    if index >= len(own_gpus):
        raise ValueError(f"device {name!r} names GPU {index} of the worker, which has {len(own_gpus)}: "
                         f"{[str(d) for d in own_gpus]} (raise [workers].gpus_per_worker)")
    return own_gpus[index]


def model_paths(config: TrainConfig) -> dict[str, str]:
    """The sender's and receiver's directories ("zoo" = the committed zoo model of that side, of [data].suite)."""
    from densecomm_core.zoo.pair import zoo_model_dirs

    m, committed = config.models, zoo_model_dirs(suite=config.data.suite)
    return {"sender": m.sender if m.sender != "zoo" else str(committed[0]),
            "receiver": m.receiver if m.receiver != "zoo" else str(committed[1])}


def load_side(config: TrainConfig, side: str, worker_device: torch.device,
              own_gpus: Sequence[torch.device] | None = None) -> LoadedModel:
    """The ``side`` ("sender" or "receiver") model on its device (``resolve_device``)."""
    m = config.models
    return load_model(model_paths(config)[side], dtype=DTYPES[m.dtype],
                      device=resolve_device(getattr(m, f"{side}_device"), worker_device, own_gpus))


def load_pair(config: TrainConfig, worker_device: torch.device,
              own_gpus: Sequence[torch.device] | None = None) -> tuple[LoadedModel, LoadedModel]:
    """Both models on their devices; a pair whose tokenizers differ is refused (the adapter is token-wise)."""
    sender, receiver = (load_side(config, side, worker_device, own_gpus) for side in ("sender", "receiver"))
    check_shared_tokenizer(sender, receiver)
    return sender, receiver


def phase_config(config: TrainConfig, phase: str):
    ph = getattr(config, phase)
    common = dict(steps=ph.steps, batch_size=ph.batch_size, lr=ph.lr, warmup_steps=ph.warmup_steps, weight_decay=ph.weight_decay,
                  seed=config.seed, eval_every=ph.eval_every, gate_lr_multiplier=ph.gate_lr_multiplier)
    if phase == "phase1":
        return Phase1Config(**common, p_scrambled=ph.p_scrambled, p_vocabulary=ph.p_vocabulary)
    return Phase2Config(**common, p_aware=ph.p_aware, input_codec=ph.input_codec or None,
                        input_codec_params=dict(ph.input_codec_params) or None, p_input_codec=ph.p_input_codec,
                        p_mismatch=ph.p_mismatch, recon_weight=ph.recon_weight)


def gate_summary(adapter: DenseAdapter) -> dict:
    """The distribution of the gates γ (one per receiver layer and KV group)."""
    g = adapter.gates.detach().float().cpu().flatten()
    q = torch.quantile(g, torch.tensor([0.1, 0.5, 0.9]))
    return {"gate_min": float(g.min()), "gate_p10": float(q[0]), "gate_median": float(q[1]), "gate_p90": float(q[2]),
            "gate_max": float(g.max()), "gate_std": float(g.std()) if g.numel() > 1 else 0.0}


class Collective:
    """All-reduce of small figures across the workers (a no-op with one worker)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / (dist.get_world_size() if self.active else 1)


def relay_accuracy(relay: DenseRelay, examples, mode: ContextMode, read, batch_size: int = 128) -> tuple[int, int]:
    hits = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        out = relay.run([e.question for e in chunk], mode)
        hits += sum(read(t) == e.answer for t, e in zip(out.texts, chunk))
    return hits, len(examples)


def train_loop_per_worker(loop_config: dict) -> None:
    """The body of one Ray Train worker for ``loop_config['phase']``."""
    import ray.train.torch
    from ray.train import Checkpoint

    config = config_from_dict(loop_config["config"])
    phase = loop_config["phase"]
    torch.set_num_threads(config.workers.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    own_gpus = ray.train.torch.get_devices() if config.workers.use_gpu else None  # this worker's GPUs, not the node's
    worker_device = own_gpus[0] if own_gpus else torch.device("cpu")
    sender, receiver = load_pair(config, worker_device, own_gpus)
    adapter_device = receiver.model.device
    fmt, read = prompt_format(config), answer_reader(config)
    splits = load_splits(config)
    ph = getattr(config, phase)
    core_config = phase_config(config, phase)
    output = config.output_path

    torch.manual_seed(config.seed)
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=config.adapter.expansion,
                                         gate_init=config.adapter.gate_init)).to(adapter_device)
    optimizer = build_optimizer(adapter, ph.lr, ph.weight_decay, ph.gate_lr_multiplier)
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = TrainingState.load(Path(directory) / STATE_FILE, phase)
        adapter.load_state_dict(state.adapter)
        optimizer.load_state_dict(state.optimizer)
        start, history = state.step, state.history
        restore_rng(state)
        if rank == 0:
            with (output / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"phase": phase, "event": "resumed", "step": start}) + "\n")
    elif loop_config.get("init_adapter"):
        adapter.load_state_dict(DenseAdapter.load(loop_config["init_adapter"]).state_dict())
    model = adapter
    if world > 1:  # only the adapter learns, so only the adapter is wrapped; the frozen models are not
        device_ids = [adapter_device.index] if adapter_device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(adapter, device_ids=device_ids)
    collective = Collective(adapter_device)

    eval_size = ph.eval_size or len(splits.validation)

    def validation_recon(texts: list[str]) -> float:
        """Phase I's loss on this worker's validation texts, averaged over every worker's (per text, as phase I reports it)."""
        total, count = 0.0, 0
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            total += batch_loss(adapter, sender, receiver, chunk).item() * len(chunk)
            count += len(chunk)
        total, count = collective.sum([total, count])
        return total / max(count, 1)

    validation = shard(splits.validation[:eval_size], rank, world)
    if phase == "phase1":
        contexts = [e.question for e in splits.train]
        val_texts = [fmt.sender.format(context=e.question) for e in validation]
        vocabulary = vocabulary_words(sender.tokenizer) if core_config.p_vocabulary > 0 else ()

        def step_loss(step: int):
            return phase1_step(model, sender, receiver, phase1_batch(contexts, core_config, step, rank, world, vocabulary), fmt)

        def evaluate(step: int) -> dict:
            return {"validation_loss": validation_recon(val_texts)} | gate_summary(adapter)
    else:
        from densecomm_core.codec import get_codec

        records = match_traces(load_traces(output / "traces.jsonl"), [e.question for e in splits.train])
        if core_config.input_codec == "pca":
            register_sender_basis(sender, [fmt.sender.format(context=e.question) for e in splits.train[:900]])
        codec = get_codec(core_config.input_codec, **(core_config.input_codec_params or {})) if core_config.input_codec else None
        relay = DenseRelay(sender, receiver, adapter, fmt)
        families = sorted({e.family for e in splits.validation})

        def step_loss(step: int):
            return phase2_step(model, sender, receiver, phase2_batch(records, core_config, step, rank, world), fmt, codec,
                               core_config)

        def evaluate(step: int) -> dict:
            figures: dict = {}
            for mode in ContextMode:
                counts = []
                for family in families:
                    counts += relay_accuracy(relay, [e for e in validation if e.family == family], mode, read)
                counts = collective.sum([float(c) for c in counts])
                per_family = {f: counts[2 * i] / max(counts[2 * i + 1], 1) for i, f in enumerate(families)}
                figures[f"validation_{mode.value}"] = per_family
                figures[f"validation_{mode.value}_mean"] = sum(per_family.values()) / len(per_family)
            # phase I's loss on the validation inputs: how far generation tuning has moved the cache from the
            # receiver's own (what recon_weight holds; without it the zoo adapters drift past an all-zero cache)
            figures["validation_recon_loss"] = validation_recon([fmt.sender.format(context=e.question) for e in validation])
            return figures | gate_summary(adapter)

    fault = config.fault
    marker = output / f"fault-{phase}-{fault.step}.done"
    started = time.perf_counter()

    def step_with_fault(step: int):
        if fault.phase == phase and step == fault.step and rank == fault.rank and not marker.exists():
            marker.touch()
            raise InjectedFault(f"injected fault in {phase} at step {step} on rank {rank} ([fault] in the config)")
        return step_loss(step)

    def on_record(record: dict) -> None:
        """Rank 0 appends the record to metrics.jsonl (the driver prints it as a progress line).
        Every rank contributes its peak RSS first (all ranks reach this call at the same steps)."""
        rss = [0.0] * world
        rss[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
        rss = collective.sum(rss)
        if rank != 0:
            return
        record = record | {"steps": ph.steps, "workers": world, "elapsed_s": time.perf_counter() - started,
                           "peak_rss_mib": [round(r, 1) for r in rss]}
        with (output / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if config.output.tensorboard:
            write_tensorboard(output / "tensorboard", record)

    def save_checkpoint(step: int, history: list[dict]) -> None:
        metrics = {"step": step, "loss": history[-1]["loss"] if history else float("nan")}
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                TrainingState(phase, step, adapter.state_dict(), optimizer.state_dict(), history, torch.get_rng_state(),
                              config.to_dict(), cuda_rng_state()).save(Path(directory) / STATE_FILE)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)

    loop = LoopConfig(ph.steps, ph.lr, ph.warmup_steps, log_every=ph.log_every, eval_every=ph.eval_every,
                      checkpoint_every=ph.checkpoint_every)
    run_steps(phase, model, optimizer, loop, step_with_fault, start_step=start, history=history, evaluate=evaluate,
              on_record=on_record, checkpoint=save_checkpoint, reduce=collective.mean)


def register_sender_basis(sender: LoadedModel, texts: list[str]) -> None:
    """Codec-aware batches through ``pca`` need the sender space's basis: the one beside its weights, else fitted here."""
    from densecomm_core.codec.calibrate import calibrate
    from densecomm_core.codec.transform import BASIS_FILE, load_bases, register_basis

    if (Path(sender.path) / BASIS_FILE).is_file():
        load_bases(sender.path)
    else:
        register_basis(calibrate(sender, texts)[0])


_writers: dict = {}


def write_tensorboard(directory: Path, record: dict) -> None:
    """Scalars of one record as TensorBoard events (skipped when tensorboardX is not installed)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return
    writer = _writers.get(directory) or _writers.setdefault(directory, SummaryWriter(str(directory)))
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "step":
            writer.add_scalar(f"{record['phase']}/{key}", value, record["step"])
        elif isinstance(value, dict):
            for sub, v in value.items():
                writer.add_scalar(f"{record['phase']}/{key}/{sub}", v, record["step"])
    writer.flush()
