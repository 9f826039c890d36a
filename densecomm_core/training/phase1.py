"""Phase I: teach the adapter to reconstruct the receiver's own cache from the sender's, on the same input (eq. 5).

A plain loop over batches of source contexts; a Ray Train job wraps ``train_phase1`` without changing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from densecomm_core.adapter import DenseAdapter
from densecomm_core.cache import KVCache
from densecomm_core.models import LoadedModel
from densecomm_core.relay import PromptFormat, sender_prefill, transform_cache
from densecomm_core.training.common import (
    cosine_lr,
    optimizer_step,
    save_training_state,
    start_training,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase1Config:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 200  # also the checkpoint interval


def reconstruction_loss(predicted: KVCache, target: KVCache) -> torch.Tensor:
    """Eq. 5 as a mean: squared error of K and V over real tokens, averaged over layers and coordinates."""
    weight = target.mask[:, None, :, None].float()  # (B, 1, T, 1)
    total = predicted.keys[0].new_zeros(())
    for pk, pv, tk, tv in zip(predicted.keys, predicted.values, target.keys, target.values):
        denom = weight.sum() * tk.shape[1] * tk.shape[3]
        total = total + (((pk - tk.float()) ** 2 * weight).sum() + ((pv - tv.float()) ** 2 * weight).sum()) / denom
    return total / (2 * len(predicted.keys))


def batch_loss(adapter: DenseAdapter, sender: LoadedModel, receiver: LoadedModel, texts: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        source = sender_prefill(sender, texts)
        target = sender_prefill(receiver, texts)  # the receiver's own cache of the same input
    # Prediction restored in float32 on the receiver's device (where the target is): the loss is fp32
    # even for a bf16 / fp16 receiver, whose target is upcast.
    predicted = transform_cache(adapter, source, sender, receiver, dtype=torch.float32)
    return reconstruction_loss(predicted, target)


def train_phase1(
    adapter: DenseAdapter,
    sender: LoadedModel,
    receiver: LoadedModel,
    contexts: Sequence[str],
    config: Phase1Config,
    validation_contexts: Sequence[str] = (),
    prompt_format: PromptFormat = PromptFormat(),
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Optimise ``adapter`` on the reconstruction loss; returns the evaluation history."""
    optimizer, rng, start = start_training("phase1", adapter, config, checkpoint, resume)
    if start:
        log.info("phase 1 resumed at step %d from %s", start, checkpoint)
    render = lambda cs: [prompt_format.sender.format(context=c) for c in cs]
    history: list[dict] = []
    adapter.train()
    bar = tqdm(range(start, config.steps), desc="phase 1 (reconstruction)", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        loss = batch_loss(adapter, sender, receiver, render(rng.sample(list(contexts), config.batch_size)))
        optimizer_step(optimizer, loss, cosine_lr(step, config.steps, config.lr, config.warmup_steps))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, "train_loss": loss.item()}
            if validation_contexts:
                adapter.eval()
                with torch.no_grad():
                    record["validation_loss"] = batch_loss(adapter, sender, receiver, render(validation_contexts)).item()
                adapter.train()
            history.append(record)
            log.info("phase 1 %s", record)
            if checkpoint is not None:
                save_training_state(checkpoint, "phase1", step + 1, adapter, optimizer, rng, config)
            if on_eval is not None:
                on_eval(step + 1, record)
    adapter.eval()
    return history
