"""Pieces the in-process trainers share: seeding, the optimiser, and resumable local checkpoints.

The schedule, the optimiser step and the loop itself live in ``training.loop`` (re-exported here).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.training.loop import (
    TrainingState,
    build_optimizer,
    cosine_lr,
    cuda_rng_state,
    optimizer_step,
    restore_rng,
)

__all__ = ["cosine_lr", "optimizer_step", "start_training", "local_checkpoint"]


def start_training(
    phase: str, adapter: DenseAdapter, config, checkpoint: Path | None, resume: bool
) -> tuple[torch.optim.Optimizer, int, list[dict]]:
    """Seed, build AdamW, and resume from ``checkpoint`` when asked; returns (optimizer, first step, history)."""
    torch.manual_seed(config.seed)
    optimizer = build_optimizer(adapter, config.lr, config.weight_decay, getattr(config, "gate_lr_multiplier", 1.0))
    if resume and checkpoint is not None and checkpoint.exists():
        state = TrainingState.load(checkpoint, phase)
        adapter.load_state_dict(state.adapter)
        optimizer.load_state_dict(state.optimizer)
        restore_rng(state)
        return optimizer, state.step, state.history
    return optimizer, 0, []


def local_checkpoint(path: Path | None, phase: str, adapter: DenseAdapter, optimizer: torch.optim.Optimizer, config):
    """A ``run_steps`` checkpoint hook writing one resumable file (None when ``path`` is None)."""
    if path is None:
        return None

    def save(step: int, history: list[dict]) -> None:
        TrainingState(phase, step, adapter.state_dict(), optimizer.state_dict(), history, torch.get_rng_state(),
                      asdict(config), cuda_rng_state()).save(path)

    return save
