"""Train the C2C-style fuser with the generation loss only (as C2C does), mixing both regimes, and score it.

    C2CTrainConfig                                   steps, batch, rate, p_aware, seed, evaluation interval
    c2c_batch(records, config, step)                 step ``step``'s examples and regimes (a function of seed and step)
    c2c_generation_loss(fuser, S, R, records, modes) eq. 7 with the fused cache in place of T_θ(C_S(X))
    train_c2c(fuser, S, R, records, config, ...)     the in-process trainer (``training.loop.run_steps``); keeps the
                                                     fuser that scores best on the validation examples
    c2c_accuracy(S, R, fuser, examples, mode)        accuracy per task family through ``c2c_run``
    zoo_trace_records(receiver, path, per_family)    the zoo's receiver-self traces: read from a file or built

No phase I: C2C has no reconstruction objective, its fuser learns from next-token prediction of the receiver's
answer alone. The targets are the receiver's own guided traces (``training.traces``), as in phase II.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from densecomm_core.baselines.c2c import C2CFuser, c2c_run, fuse_caches
from densecomm_core.evaluation.accuracy import accuracy_by_family
from densecomm_core.generation import GenerationConfig, forward_after_cache, model_device
from densecomm_core.models import LoadedModel
from densecomm_core.relay import ContextMode, PromptFormat, check_teacher_forced_layout, sender_prefill
from densecomm_core.training.common import local_checkpoint, start_training
from densecomm_core.training.loop import LoopConfig, StepResult, batch_rng, run_steps, shard
from densecomm_core.training.phase2 import receiver_batch
from densecomm_core.training.traces import TraceRecord
from densecomm_core.zoo import tasks

log = logging.getLogger(__name__)

GREEDY = GenerationConfig(max_new_tokens=24)  # the zoo's evaluation decoding (zoo.pair.GREEDY)


@dataclass(frozen=True)
class C2CTrainConfig:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3  # from scratch, like phase I of the dense adapter (no reconstruction warm start here)
    warmup_steps: int = 30
    weight_decay: float = 0.0
    p_aware: float = 0.5  # the regime mix of phase II (paper appendix A), so both modes are trained
    seed: int = 0
    eval_every: int = 200  # validation (model selection) and checkpoint interval
    gate_lr_multiplier: float = 1.0  # the gate logits' rate relative to the MLPs' (training.loop.build_optimizer)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(f"steps, batch_size and eval_every must be >= 1, got {self.steps}, {self.batch_size}, {self.eval_every}")
        if not 0.0 <= self.p_aware <= 1.0:
            raise ValueError(f"p_aware must be in [0, 1], got {self.p_aware}")


def c2c_batch(records: Sequence[TraceRecord], config: C2CTrainConfig, step: int, rank: int = 0, world: int = 1
              ) -> tuple[list[TraceRecord], list[ContextMode]]:
    """Step ``step``'s global batch and regimes (seed and step alone decide them), this worker's shard of it."""
    rng = batch_rng(config.seed, step, "c2c")
    batch = rng.sample(list(records), min(config.batch_size, len(records)))
    modes = [ContextMode.AWARE if rng.random() < config.p_aware else ContextMode.UNAWARE for _ in batch]
    return shard(batch, rank, world), shard(modes, rank, world)


def c2c_generation_loss(
    fuser: C2CFuser,
    sender: LoadedModel,
    receiver: LoadedModel,
    records: Sequence[TraceRecord],
    modes: Sequence[ContextMode],
    prompt_format: PromptFormat = PromptFormat(),
) -> torch.Tensor:
    """−Σ log p_R(y_t | y_<t, fused cache of X, X_R), averaged over target tokens; only the fuser learns.

    Rows of either regime share one batch: context-aware rows fuse onto the receiver's own cache of X,
    context-unaware rows onto zeros (their own rows of the receiver's prefill are replaced before fusing)."""
    texts = [prompt_format.sender.format(context=r.context) for r in records]
    with torch.no_grad():
        source = sender_prefill(sender, texts)
        own = sender_prefill(receiver, texts)  # the receiver's own prefill of X (the same function, the other model)
        unaware = torch.tensor([m is ContextMode.UNAWARE for m in modes], device=own.device)
        if bool(unaware.any()):  # an unaware receiver never read X: its base is zeros on X's positions
            keep = (~unaware).to(own.dtype)[:, None, None, None]
            own = own.with_tensors([k * keep for k in own.keys], [v * keep for v in own.values])
    cache = fuse_caches(fuser, source, own, sender, receiver)
    prompts = [prompt_format.receiver_prompt(m, r.context) for r, m in zip(records, modes)]
    ids, mask, labels = receiver_batch(receiver, prompts, [r.trace for r in records], model_device(receiver.model))
    check_teacher_forced_layout(receiver, cache, mask)
    logits, _ = forward_after_cache(receiver.model, ids, mask, cache.to_dynamic_cache(), cache.mask, cache.next_positions)
    labels = labels.to(logits.device)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def c2c_accuracy(
    sender: LoadedModel, receiver: LoadedModel, fuser: C2CFuser, examples: Sequence[tasks.Example], mode: ContextMode,
    config: GenerationConfig = GREEDY, batch_size: int = 128, prompt_format: PromptFormat = PromptFormat(),
) -> dict[str, float]:
    """Accuracy per zoo task family of the C2C baseline in ``mode`` (greedy, the zoo's answer extraction)."""
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts += c2c_run(sender, receiver, fuser, [e.context for e in chunk], mode, config, prompt_format).texts
    return accuracy_by_family(examples, texts)


def validation_score(figures: dict) -> float:
    """Model selection: the mean validation accuracy over both regimes and every family."""
    values = [v for k, v in figures.items() if k.startswith("validation/")]
    return sum(values) / len(values) if values else float("-inf")


def train_c2c(
    fuser: C2CFuser,
    sender: LoadedModel,
    receiver: LoadedModel,
    records: Sequence[TraceRecord],
    config: C2CTrainConfig,
    prompt_format: PromptFormat = PromptFormat(),
    validation: Sequence[tasks.Example] = (),
    checkpoint: Path | None = None,
    resume: bool = False,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Optimise ``fuser`` on the mixed-regime generation loss in this process; returns the logged history.

    With ``validation`` examples, both regimes are scored every ``eval_every`` steps (records gain
    ``validation/<mode>/<family>``) and the fuser ends holding the weights of the best-scoring evaluation
    (``validation_score``; the last one on ties); without, it ends as the last step left it."""
    if not records:
        raise ValueError("C2C training needs at least one usable trace record")
    optimizer, start, history = start_training("c2c", fuser, config, checkpoint, resume)
    best: dict = {"score": float("-inf"), "state": None, "step": 0}

    def evaluate(step: int) -> dict:
        figures = {}
        for mode in ContextMode:
            for family, acc in c2c_accuracy(sender, receiver, fuser, validation, mode, prompt_format=prompt_format).items():
                figures[f"validation/{mode.value}/{family}"] = acc
        score = validation_score(figures)
        if score >= best["score"]:
            best.update(score=score, state=copy.deepcopy(fuser.state_dict()), step=step)
        return figures | {"validation/score": score, "open_gates": int(fuser.open_gates.sum())}

    def batch_loss(step: int) -> StepResult:
        fuser.anneal(step, config.steps)
        records_, modes = c2c_batch(records, config, step)
        loss = c2c_generation_loss(fuser, sender, receiver, records_, modes, prompt_format)
        return StepResult(loss, sum(len(r.trace.split()) for r in records_))

    loop = LoopConfig(config.steps, config.lr, config.warmup_steps, log_every=min(50, config.eval_every),
                      eval_every=config.eval_every, checkpoint_every=config.eval_every)
    history = run_steps("c2c", fuser, optimizer, loop, batch_loss, start_step=start, history=history,
                        evaluate=evaluate if validation else None, on_record=on_record,
                        checkpoint=local_checkpoint(checkpoint, "c2c", fuser, optimizer, config))
    if best["state"] is not None:
        fuser.load_state_dict(best["state"])
        log.info("C2C fuser: kept the step-%d weights (validation score %.4f)", best["step"], best["score"])
    fuser.config.recipe = {"c2c": asdict(config), "selected_step": best["step"] or config.steps}
    fuser.eval()
    return history


def zoo_trace_records(receiver: LoadedModel, path: Path | None, per_family: int, batch_size: int = 128,
                      suite: str = "v1") -> list[TraceRecord]:
    """The usable receiver-self traces of the first ``per_family`` train examples of every in-domain family of the
    zoo ``suite``: read from ``path`` (a ``densecomm train`` traces.jsonl, matched by question text) or built by
    guided decoding."""
    from densecomm_core.zoo.suite import get_suite
    from densecomm_core.training.traces import (
        TraceFileError,
        TraceRequest,
        generate_receiver_traces,
        load_traces,
        match_traces,
    )

    zoo = get_suite(suite)
    train = zoo.adapter_split("train", per_family)
    questions = {e.context for e in train}
    if path is not None:
        loaded = load_traces(Path(path))
        outside = [r.context for r in loaded if tasks.split_of(r.context) != "train"]
        if outside:  # a validation or test question must never be trained on
            raise TraceFileError(f"{path}: {len(outside)} trace(s) are not zoo train-split questions, e.g. {outside[0][:80]!r}")
        return match_traces([r for r in loaded if r.context in questions], questions)
    requests = [TraceRequest(e.context, e.answer, tasks.prompt_guided(e), e.family, zoo.family(e.family).multiple_choice)
                for e in train]
    records, stats = generate_receiver_traces(receiver, requests, tasks.extract_answer, f"{tasks.ANSWER_WORD} {{answer}}",
                                              GenerationConfig(max_new_tokens=32), batch_size)
    log.info("zoo traces: %s", stats)
    return [r for r in records if r.usable]
