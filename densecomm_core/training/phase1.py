"""Phase I: teach the adapter to reconstruct the receiver's own cache from the sender's, on the same input (eq. 5).

    phase1_batch(contexts, config, step, rank, world)   this worker's texts of step ``step`` (step-indexed)
    batch_loss(adapter, sender, receiver, texts)        eq. 5 on one batch
    train_phase1(...)                                   the in-process trainer (``training.loop.run_steps``)

A Ray Train job (``services.train``) runs the same pieces with DDP and Ray checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.cache import KVCache
from densecomm_core.models import LoadedModel
from densecomm_core.relay import PromptFormat, sender_prefill, transform_cache
from densecomm_core.training.common import local_checkpoint, start_training
from densecomm_core.training.loop import (
    LoopConfig,
    StepResult,
    batch_rng,
    run_steps,
    shard,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase1Config:
    steps: int = 1200
    batch_size: int = 32  # global batch: split across data-parallel workers
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 200  # validation loss (and, in-process, the checkpoint interval)
    gate_lr_multiplier: float = 1.0  # the gates' rate relative to the MLPs' (see training.loop.build_optimizer)
    # Texts replaced by scrambled text (ours, not the paper's): the words of the text and of another training
    # context in random order, cut to the text's length. A stand-in for the paper's general corpus: the same
    # vocabulary with no task layout, so the map is fitted beyond the families' layouts (0: the paper's recipe).
    p_scrambled: float = 0.0
    # Texts replaced by words drawn uniformly from the (shared) tokenizer's whole vocabulary (ours, not the paper's),
    # as many as the text has. Nearer the paper's general corpus than scrambling: every word the LMs know, those of
    # families the adapter never trains on included, but no task layout at all (0: the paper's recipe). Drawn after
    # p_scrambled, over every text: with both set, a scrambled text may be replaced in turn.
    p_vocabulary: float = 0.0


def vocabulary_words(tokenizer) -> list[str]:
    """Every non-special token of ``tokenizer`` as text, stripped, the empty and repeated ones dropped, in id order.

    For a word-level tokenizer (the zoo's) these are its words; for a subword one, pieces (" the" and "the"
    strip to one word, drawn once) that a later tokenization may split again, which a general corpus stand-in
    does not mind. Both LMs of a pair share the tokenizer (``models.check_shared_tokenizer``, which training and the relay call)."""
    special = set(tokenizer.all_special_ids)
    ids = [[i] for i in range(len(tokenizer)) if i not in special]
    return list(dict.fromkeys(w for w in (t.strip() for t in tokenizer.batch_decode(ids)) if w))


def scrambled(text: str, other: str, rng) -> str:
    """``text``'s and ``other``'s words shuffled together, cut to ``text``'s word count."""
    words = text.split() + other.split()
    rng.shuffle(words)
    return " ".join(words[: len(text.split())])


def reconstruction_loss(predicted: KVCache, target: KVCache) -> torch.Tensor:
    """Eq. 5 as a mean: squared error of K and V over real tokens, averaged over layers and coordinates (fp32)."""
    weight = target.mask[:, None, :, None].to(predicted.keys[0].device, torch.float32)  # (B, 1, T, 1)
    total = predicted.keys[0].new_zeros((), dtype=torch.float32)
    for pk, pv, tk, tv in zip(predicted.keys, predicted.values, target.keys, target.values):
        denom = weight.sum() * tk.shape[1] * tk.shape[3]
        tk, tv = tk.to(pk.device, torch.float32), tv.to(pv.device, torch.float32)
        total = total + (((pk.float() - tk) ** 2 * weight).sum() + ((pv.float() - tv) ** 2 * weight).sum()) / denom
    return total / (2 * len(predicted.keys))


def reconstruction_pair(adapter: DenseAdapter, sender: LoadedModel, receiver: LoadedModel, texts: Sequence[str]) -> tuple[KVCache, KVCache]:
    """The adapter's prediction of the receiver's cache of ``texts`` and that cache (the receiver's own prefill)."""
    with torch.no_grad():
        source = sender_prefill(sender, texts)
        target = sender_prefill(receiver, texts)  # the receiver's own cache of the same input
    # Prediction restored in float32 on the receiver's device (where the target is): the loss is fp32
    # even for a bf16 / fp16 receiver, whose target is upcast.
    return transform_cache(adapter, source, sender, receiver, dtype=torch.float32), target


def batch_loss(adapter: DenseAdapter, sender: LoadedModel, receiver: LoadedModel, texts: Sequence[str]) -> torch.Tensor:
    return reconstruction_loss(*reconstruction_pair(adapter, sender, receiver, texts))


def phase1_batch(contexts: Sequence[str], config: Phase1Config, step: int, rank: int = 0, world: int = 1,
                 vocabulary: Sequence[str] = ()) -> list[str]:
    """The global batch of step ``step`` (a function of seed and step alone), then this worker's shard.

    ``vocabulary`` (``vocabulary_words``) is required when ``config.p_vocabulary`` > 0."""
    if config.p_vocabulary > 0 and not vocabulary:
        raise ValueError(f"phase1 p_vocabulary = {config.p_vocabulary} needs the tokenizer's words (vocabulary_words); got none")
    rng = batch_rng(config.seed, step, "phase1")
    contexts = list(contexts)
    texts = rng.sample(contexts, config.batch_size)
    if config.p_scrambled > 0:  # drawn after the sample: p_scrambled 0 keeps earlier batches exactly
        texts = [scrambled(t, rng.choice(contexts), rng) if rng.random() < config.p_scrambled else t for t in texts]
    if config.p_vocabulary > 0:  # likewise drawn last
        texts = [" ".join(rng.choices(vocabulary, k=len(t.split()))) if rng.random() < config.p_vocabulary else t
                 for t in texts]
    return shard(texts, rank, world)


def phase1_step(
    adapter: torch.nn.Module, sender: LoadedModel, receiver: LoadedModel, texts: Sequence[str], prompt_format: PromptFormat
) -> StepResult:
    """One worker's loss on its texts; ``adapter`` may be DDP-wrapped (the wrapper's forward syncs gradients)."""
    rendered = [prompt_format.sender.format(context=c) for c in texts]
    with torch.no_grad():
        source = sender_prefill(sender, rendered)
        target = sender_prefill(receiver, rendered)
    predicted = transform_cache(adapter, source, sender, receiver, dtype=torch.float32)
    return StepResult(reconstruction_loss(predicted, target), int(source.lengths.sum()))


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
    """Optimise ``adapter`` on the reconstruction loss in this process; returns the evaluation history."""
    optimizer, start, history = start_training("phase1", adapter, config, checkpoint, resume)
    if start:
        log.info("phase 1 resumed at step %d from %s", start, checkpoint)
    render = lambda cs: [prompt_format.sender.format(context=c) for c in cs]
    vocabulary = vocabulary_words(sender.tokenizer) if config.p_vocabulary > 0 else ()

    def evaluate(step: int) -> dict:
        return {"validation_loss": batch_loss(adapter, sender, receiver, render(validation_contexts)).item()} if validation_contexts else {}

    def on_record(record: dict) -> None:
        if progress:
            log.info("phase 1 step %d/%d loss %.4f", record["step"], config.steps, record["loss"])
        if on_eval is not None and (record["step"] % config.eval_every == 0 or record["step"] == config.steps):
            on_eval(record["step"], record)

    loop = LoopConfig(config.steps, config.lr, config.warmup_steps, log_every=config.eval_every,
                      eval_every=config.eval_every, checkpoint_every=config.eval_every)
    history = run_steps(
        "phase1", adapter, optimizer, loop,
        lambda step: phase1_step(adapter, sender, receiver, phase1_batch(contexts, config, step, vocabulary=vocabulary), prompt_format),
        start_step=start, history=history, evaluate=evaluate, on_record=on_record,
        checkpoint=local_checkpoint(checkpoint, "phase1", adapter, optimizer, config),
    )
    return [{"step": r["step"], "train_loss": r["loss"], **{k: v for k, v in r.items() if k.startswith("validation")}}
            for r in history]
