"""Phase II: tune the adapter for generation through the frozen receiver, mixing both regimes (eq. 6-7).

Each example's receiver prompt is context-aware with probability ``p_aware`` and context-unaware
otherwise; the target is the receiver's own guided trace in both cases. Only the adapter learns.
With ``p_mismatch`` (ours, not the paper's) a context-aware example's cache is the sender's cache of
another example of the batch: the receiver must still answer its own input, so the adapter learns a
cache that informs without overriding what the prompt says. With ``recon_weight`` (ours, not the paper's) the
loss keeps phase I's reconstruction term as an anchor: ``recon_weight`` times the squared error between the
transformed cache and the receiver's own cache of the sender's input, so generation tuning cannot drift into a
cache only the trained families decode (the paper's phase II optimises generation alone).

    phase2_batch(records, config, step, rank, world)   this worker's (records, modes, through codec?) of a step
    generation_loss(...)                               eq. 7 on one batch
    train_phase2(...)                                  the in-process trainer (``training.loop.run_steps``)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from densecomm_core.adapter import DenseAdapter
from densecomm_core.codec import Codec, get_codec
from densecomm_core.errors import CacheLayoutError
from densecomm_core.generation import forward_after_cache, model_device
from densecomm_core.hop import reconstruct
from densecomm_core.models import LoadedModel
from densecomm_core.relay import (
    ContextMode,
    PromptFormat,
    check_teacher_forced_layout,
    sliding_window,
    sender_prefill,
    transform_cache,
)
from densecomm_core.training.common import local_checkpoint, start_training
from densecomm_core.training.loop import (
    LoopConfig,
    StepResult,
    batch_rng,
    run_steps,
    shard,
)
from densecomm_core.training.phase1 import reconstruction_loss
from densecomm_core.training.traces import TraceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase2Config:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-4  # lower than phase 1: fine-tuning an already aligned channel
    warmup_steps: int = 30
    weight_decay: float = 0.0
    p_aware: float = 0.5  # paper appendix A: context-aware with probability 0.5
    seed: int = 0
    eval_every: int = 200  # also the checkpoint interval
    # Codec-aware training (ours, not the paper's): with probability ``p_input_codec`` a batch's sender
    # cache reaches the adapter through this codec (a registry name and its parameters) as the services
    # ship it (``hop.reconstruct``), so the adapter learns to read a compressed cache.
    input_codec: str | None = None
    input_codec_params: dict | None = None
    p_input_codec: float = 0.5
    # Context-aware examples whose cache comes from another example's input (0: the paper's recipe)
    p_mismatch: float = 0.0
    # Phase I's reconstruction loss kept in phase II with this weight (0: the paper's recipe, generation only)
    recon_weight: float = 0.0
    gate_lr_multiplier: float = 1.0  # the gates' rate relative to the MLPs' (see training.loop.build_optimizer)


def receiver_batch(
    receiver: LoadedModel, prompts: Sequence[str], targets: Sequence[str], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt + target + EOS] ids (B, T), mask (B, T), labels (B, T) on target + EOS only,
    built on the CPU and moved to ``device`` (the receiver's) in one copy each."""
    tok = receiver.tokenizer
    rows, label_rows = prompt_target_rows(tok, prompts, targets)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(lab), 1
    return ids.to(device), mask.to(device), labels.to(device)


def prompt_target_rows(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's [prompt + target + EOS] ids, and its labels (-100 on the prompt): the prompt and the target
    tokenized apart, as the receiver reads them."""
    rows, label_rows = [], []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + t)
        label_rows.append([-100] * len(p) + t)
    return rows, label_rows


def generation_loss(
    adapter: DenseAdapter,
    sender: LoadedModel,
    receiver: LoadedModel,
    records: Sequence[TraceRecord],
    modes: Sequence[ContextMode],
    prompt_format: PromptFormat,
    input_codec: Codec | None = None,
    sender_contexts: Sequence[str] | None = None,
    recon_weight: float = 0.0,
) -> torch.Tensor:
    """Eq. 7: −Σ log p_R(y_t | y_<t, T_θ(C_S(X)), X_R), averaged over target tokens.

    With ``input_codec`` the sender's cache first goes through it as the relay ships it (``hop.reconstruct``:
    on tensors for token-wise codecs; no gradient needed, only the adapter learns and it sits after the codec).
    ``sender_contexts``: what the sender reads per example (default: each record's own context).
    ``recon_weight`` > 0 adds that times eq. 5 (``phase1.reconstruction_loss``) between the transformed cache and
    the receiver's own cache of what the sender read (the uncompressed input, whatever the codec did)."""
    contexts = list(sender_contexts) if sender_contexts is not None else [r.context for r in records]
    sender_texts = [prompt_format.sender.format(context=c) for c in contexts]
    with torch.no_grad():
        source = sender_prefill(sender, sender_texts)
        if input_codec is not None:
            source = reconstruct(source, input_codec, model=sender)
        own = sender_prefill(receiver, sender_texts) if recon_weight > 0 else None
    cache = transform_cache(adapter, source, sender, receiver)
    prompts = [prompt_format.receiver_prompt(m, r.context) for r, m in zip(records, modes)]
    ids, mask, labels = receiver_batch(receiver, prompts, [r.trace for r in records], model_device(receiver.model))
    check_teacher_forced_layout(receiver, cache, mask)
    logits, _ = forward_after_cache(receiver.model, ids, mask, cache.to_dynamic_cache(), cache.mask, cache.next_positions)
    labels = labels.to(logits.device)  # the LM head's device (the same one unless the model is split)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    if own is not None:
        loss = loss + recon_weight * reconstruction_loss(cache, own).to(loss.device)
    return loss


def check_records_fit_window(sender: LoadedModel, receiver: LoadedModel, records: Sequence[TraceRecord], rows: int,
                             prompt_format: PromptFormat = PromptFormat()) -> None:
    """Before phase II starts: with a sliding-window receiver and more than one row per worker, a batch may span
    up to the longest sender cache plus the longest receiver prompt and trace, and one beyond the window is
    refused when it is drawn (``check_teacher_forced_layout``), maybe hours in; refuse such records now."""
    message = window_overflow(sender.tokenizer, receiver.tokenizer, sliding_window(receiver), records, rows, prompt_format)
    if message:
        raise CacheLayoutError(f"receiver {receiver.path!r}: {message}")


def window_overflow(sender_tokenizer, receiver_tokenizer, window: int | None, records: Sequence[TraceRecord], rows: int,
                    prompt_format: PromptFormat = PromptFormat()) -> str | None:
    """Why a phase II batch of ``rows`` rows of ``records`` could cross a receiver's sliding ``window``, or None.
    Tokenizers only (no weights): the training job checks it in its driver before it starts any worker. Counted
    as the loss lays the batch out: the sender's cache of X, then the receiver's rows (``prompt_target_rows``)."""
    if not window or rows < 2 or not records:
        return None
    cache = max(len(sender_tokenizer(prompt_format.sender.format(context=r.context))["input_ids"]) for r in records)
    rows_of_records, _ = prompt_target_rows(receiver_tokenizer, [prompt_format.receiver_prompt(ContextMode.AWARE, r.context)
                                                                  for r in records], [r.trace for r in records])
    tail = max(len(row) for row in rows_of_records)
    if cache + tail <= window:
        return None
    return (f"its sliding window is {window}, and a batch of {rows} rows per worker can span {cache} cache + {tail} "
            "prompt and trace slots: padding would push rows' caches out of the window; train with one row per "
            "worker (batch_size = number of workers) or on examples shorter than the window")


def phase2_batch(
    records: Sequence[TraceRecord], config: Phase2Config, step: int, rank: int = 0, world: int = 1
) -> tuple[list[TraceRecord], list[ContextMode], bool, list[str]]:
    """Step ``step``'s global batch (a function of seed and step alone), this worker's shard of it, the
    regime of each example, whether the batch reads the sender cache through the input codec, and the
    context the sender reads per example (its own, or with ``p_mismatch`` another example's)."""
    rng = batch_rng(config.seed, step, "phase2")
    batch = rng.sample(list(records), min(config.batch_size, len(records)))
    modes = [ContextMode.AWARE if rng.random() < config.p_aware else ContextMode.UNAWARE for _ in batch]
    through_codec = config.input_codec is not None and rng.random() < config.p_input_codec
    contexts = [r.context for r in batch]
    if config.p_mismatch > 0 and len(batch) > 1:  # drawn after the rest: p_mismatch 0 keeps earlier batches exactly
        for i, mode in enumerate(modes):
            if mode is ContextMode.AWARE and rng.random() < config.p_mismatch:
                contexts[i] = batch[(i + rng.randrange(1, len(batch))) % len(batch)].context  # any other example
    return shard(batch, rank, world), shard(modes, rank, world), through_codec, shard(contexts, rank, world)


def phase2_step(
    adapter: torch.nn.Module,
    sender: LoadedModel,
    receiver: LoadedModel,
    batch: tuple[list[TraceRecord], list[ContextMode], bool, list[str]],
    prompt_format: PromptFormat,
    input_codec: Codec | None,
    config: Phase2Config,
) -> StepResult:
    """One worker's loss on its shard; ``adapter`` may be DDP-wrapped."""
    records, modes, through_codec, contexts = batch
    loss = generation_loss(adapter, sender, receiver, records, modes, prompt_format, input_codec if through_codec else None,
                           contexts, config.recon_weight)
    return StepResult(loss, sum(len(r.trace.split()) for r in records))


def train_phase2(
    adapter: DenseAdapter,
    sender: LoadedModel,
    receiver: LoadedModel,
    records: Sequence[TraceRecord],
    config: Phase2Config,
    prompt_format: PromptFormat = PromptFormat(),
    evaluate: Callable[[], dict] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Optimise ``adapter`` on the mixed-regime generation loss in this process; returns the evaluation history."""
    if not records:
        raise ValueError("phase 2 needs at least one trace record")
    check_records_fit_window(sender, receiver, records, config.batch_size, prompt_format)
    input_codec = get_codec(config.input_codec, **(config.input_codec_params or {})) if config.input_codec else None
    optimizer, start, history = start_training("phase2", adapter, config, checkpoint, resume)
    if start:
        log.info("phase 2 resumed at step %d from %s", start, checkpoint)
    loop = LoopConfig(config.steps, config.lr, config.warmup_steps, log_every=config.eval_every,
                      eval_every=config.eval_every, checkpoint_every=config.eval_every)
    history = run_steps(
        "phase2", adapter, optimizer, loop,
        lambda step: phase2_step(adapter, sender, receiver, phase2_batch(records, config, step), prompt_format, input_codec, config),
        start_step=start, history=history, evaluate=(lambda step: evaluate()) if evaluate else None,
        checkpoint=local_checkpoint(checkpoint, "phase2", adapter, optimizer, config),
    )
    return [{"step": r["step"], "train_loss": r["loss"], **{k: v for k, v in r.items() if k.startswith("validation")}}
            for r in history]
