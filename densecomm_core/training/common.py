"""Pieces every training loop shares: the schedule, one optimiser step, and resumable checkpoints."""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path

import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.errors import CheckpointError


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to 10 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, max_grad_norm: float = 1.0) -> None:
    """Set the learning rate, back-propagate ``loss``, clip the gradient norm and step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()


def start_training(
    phase: str, adapter: DenseAdapter, config, checkpoint: Path | None, resume: bool
) -> tuple[torch.optim.Optimizer, random.Random, int]:
    """Seed, build AdamW, and resume from ``checkpoint`` when asked; returns (optimizer, rng, first step)."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if resume and checkpoint is not None and checkpoint.exists():
        start = load_training_state(checkpoint, phase, adapter, optimizer, rng)
    return optimizer, rng, start


def save_training_state(
    path: Path, phase: str, step: int, adapter: DenseAdapter, optimizer: torch.optim.Optimizer, rng: random.Random, config
) -> None:
    """A resumable checkpoint: adapter and optimizer state, step, RNG states and the phase config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "phase": phase,
        "step": step,
        "adapter": adapter.state_dict(),
        "optimizer": optimizer.state_dict(),
        "python_rng": list(rng.getstate()[1]),
        "python_rng_version": rng.getstate()[0],
        "python_rng_gauss": rng.getstate()[2],
        "torch_rng": torch.get_rng_state(),
        "config": asdict(config),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a torn checkpoint


def load_training_state(
    path: Path, phase: str, adapter: DenseAdapter, optimizer: torch.optim.Optimizer, rng: random.Random
) -> int:
    """Restore a checkpoint written by ``save_training_state``; returns the step to continue from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict moves to the params' device
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read training checkpoint {str(path)!r}: {exc}") from exc
    if state.get("phase") != phase:
        raise CheckpointError(f"checkpoint {str(path)!r} is from phase {state.get('phase')!r}, expected {phase!r}")
    adapter.load_state_dict(state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate((state["python_rng_version"], tuple(state["python_rng"]), state["python_rng_gauss"]))
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
