"""The one training loop both phases run: step-indexed batches, warmup + cosine, periodic evaluation and checkpoints.

    batch_rng(seed, step, stream)   the RNG that draws step ``step``'s batch: a pure function of its arguments,
                                    so a resumed run (or one with another number of workers) sees the same data
    shard(items, rank, world)       this worker's share of a global batch
    TrainingState                   what a checkpoint holds (step, history, optimizer, RNG, adapter weights)
    run_steps(...)                  the loop; hooks plug in the loss, the evaluation and the checkpoint writer

The loop knows nothing of Ray: a Ray Train job passes hooks that call ``ray.train.report``, the in-process
trainers (``train_phase1`` / ``train_phase2``) pass hooks that write a local file.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from densecomm_core.errors import CheckpointError

log = logging.getLogger(__name__)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rng(seed: int, step: int, stream: str = "batch") -> random.Random:
    """The RNG of one step's global batch; independent of how many steps ran before in this process."""
    return random.Random(f"{seed}/{stream}/{step}")


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s slice of a global batch (strided, so every rank gets the same size when divisible)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return list(items[rank::world])


def build_optimizer(module: torch.nn.Module, lr: float, weight_decay: float, gate_lr_multiplier: float = 1.0) -> torch.optim.AdamW:
    """AdamW over ``module``'s parameters; parameters named ``*gate*`` get ``gate_lr_multiplier`` x the rate.

    The gates are one scalar per (layer, group) against thousands of MLP weights: at the MLPs' rate they
    hardly move within a run, so they learn on their own (larger) rate.
    """
    gates = [p for n, p in module.named_parameters() if "gate" in n and p.requires_grad]
    others = [p for n, p in module.named_parameters() if "gate" not in n and p.requires_grad]
    groups = [{"params": others, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": gates, "lr_scale": gate_lr_multiplier, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, max_grad_norm: float = 1.0) -> torch.Tensor:
    """Set the learning rate (times each group's ``lr_scale``), back-propagate, clip, step; returns the grad norm
    as a tensor on its device (no host sync here: the loop reads it only when it logs)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return norm


@dataclass
class TrainingState:
    """A resumable checkpoint: everything the loop needs to continue exactly where it stopped."""

    phase: str
    step: int
    adapter: dict  # state_dict of the unwrapped adapter
    optimizer: dict
    history: list[dict] = field(default_factory=list)  # one record per logged interval (the loss curve)
    torch_rng: torch.Tensor | None = None
    config: dict = field(default_factory=dict)
    cuda_rng: list[torch.Tensor] | None = None  # each visible GPU's generator (C2C's gate noise draws there)

    def save(self, path) -> None:
        from pathlib import Path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.__dict__, tmp)
        tmp.replace(path)  # atomic: a crash mid-write never leaves a torn checkpoint

    @classmethod
    def load(cls, path, phase: str) -> TrainingState:
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read training checkpoint {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or data.get("phase") != phase:
            found = data.get("phase") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"checkpoint {str(path)!r} is from phase {found!r}, expected {phase!r}")
        return cls(**data)


def cuda_rng_state() -> list[torch.Tensor] | None:
    """Every visible GPU's generator state, for a checkpoint; None when CUDA was never used here."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def restore_rng(state: TrainingState) -> None:
    """The checkpoint's generators back in place: the CPU's, and the GPUs' where the same number is visible."""
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and torch.cuda.is_available() and len(state.cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state.cuda_rng)


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    warmup_steps: int
    log_every: int = 10  # a progress record (loss, tokens/s, eta) every this many steps
    eval_every: int = 200  # evaluation (when an evaluate hook is given)
    checkpoint_every: int = 200
    max_grad_norm: float = 1.0


@dataclass
class StepResult:
    """What a batch-loss hook returns: the loss to back-propagate and how many tokens it covered."""

    loss: torch.Tensor
    tokens: int


def run_steps(
    name: str,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: LoopConfig,
    batch_loss: Callable[[int], StepResult],
    *,
    start_step: int = 0,
    history: list[dict] | None = None,
    evaluate: Callable[[int], dict] | None = None,
    on_record: Callable[[dict], None] | None = None,
    checkpoint: Callable[[int, list[dict]], None] | None = None,
    reduce: Callable[[float], float] = lambda x: x,
) -> list[dict]:
    """Optimise ``module`` from ``start_step`` to ``config.steps``; returns the history of logged records.

    ``batch_loss(step)`` computes this worker's loss of step ``step``. Every ``log_every`` steps a record
    (step, loss averaged over the interval and over workers via ``reduce``, lr, tokens/s, eta) is appended
    to the history and passed to ``on_record``; every ``eval_every`` steps ``evaluate(step)``'s figures are
    merged into it; every ``checkpoint_every`` steps (and at the end) ``checkpoint(step, history)`` runs.
    """
    history = list(history or [])
    module.train()
    interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
    interval_start = time.perf_counter()
    for step in range(start_step, config.steps):
        lr = cosine_lr(step, config.steps, config.lr, config.warmup_steps)
        result = batch_loss(step)
        grad_norm = optimizer_step(optimizer, result.loss, lr, config.max_grad_norm)
        interval_loss += float(result.loss.detach())
        interval_steps += 1
        interval_tokens += result.tokens
        done = step + 1
        last = done == config.steps
        if done % config.log_every == 0 or last or (evaluate and done % config.eval_every == 0):
            seconds = time.perf_counter() - interval_start
            per_step = seconds / interval_steps
            record = {
                "phase": name, "step": done, "loss": reduce(interval_loss / interval_steps), "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": interval_tokens / max(seconds, 1e-9),
                "seconds_per_step": per_step, "eta_s": per_step * (config.steps - done),
            }
            if evaluate is not None and (done % config.eval_every == 0 or last):
                module.eval()
                with torch.no_grad():
                    record |= evaluate(done)
                module.train()
            history.append(record)
            log.info("%s %s", name, record)
        if checkpoint is not None and (done % config.checkpoint_every == 0 or last):
            checkpoint(done, history)  # before on_record: a hook that stops the run still leaves this step saved
        if history and history[-1]["step"] == done:
            if on_record is not None:
                on_record(history[-1])
            interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
            interval_start = time.perf_counter()
    module.eval()
    return history
