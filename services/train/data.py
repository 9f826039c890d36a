"""The examples, prompts and answer reading of a training run, built from its config the same way on every worker.

    Example                          one task instance: the input X, the gold answer, its family
    load_splits(config)              (train, validation, test) examples; deterministic, no downloads
    prompt_format(config)            the relay's PromptFormat from [prompts]
    answer_reader(config)            text -> extracted answer, by [prompts].answer_kind
    trace_requests(config, train)    guided prompts for receiver-self trace construction
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from densecomm_core.relay import PromptFormat
from densecomm_core.training.traces import TraceRequest
from services.train.config import TrainConfig


@dataclass(frozen=True)
class Example:
    family: str
    question: str  # X: what the sender reads
    answer: str  # canonical gold answer
    multiple_choice: bool = False
    source: str = ""  # "file:line" for file data


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def fingerprint(self) -> dict[str, str]:
        return {name: examples_fingerprint(getattr(self, name)) for name in ("train", "validation", "test")}


def examples_fingerprint(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.family}\x1f{e.question}\x1f{e.answer}\x1e".encode())
    return digest.hexdigest()[:16]


def _zoo_splits(config: TrainConfig) -> Splits:
    """The suite's in-domain families, evenly (v1: exactly ``tasks.make_split``); OOD families never appear."""
    from densecomm_core.zoo.suite import get_suite

    suite = get_suite(config.data.suite)

    def convert(split: str, size: int) -> list[Example]:
        per_family = -(-size // len(suite.in_domain)) if size else 0
        return [Example(e.family, e.context, e.answer, suite.family(e.family).multiple_choice)
                for e in suite.adapter_split(split, per_family)] if per_family else []

    d = config.data
    return Splits(convert("train", d.train_size), convert("validation", d.validation_size), convert("test", d.test_size))


def _file_examples(path: str, config: TrainConfig) -> list[Example]:
    from densecomm_core.data import load_task_file

    filters = {"subject": config.data.subject} if config.data.source == "math" and config.data.subject else {}
    loaded = load_task_file(path, config.data.source, **filters)
    return [Example(t.family, t.question, t.answer, t.multiple_choice, t.source) for t in loaded]


def _held_out(question: str, seed: int, fraction: float) -> bool:
    """A stable hash split: the same question is on the same side in every run with this seed."""
    return int(hashlib.sha256(f"{seed}:{question}".encode()).hexdigest()[:8], 16) < fraction * 0xFFFFFFFF


def load_splits(config: TrainConfig) -> Splits:
    """The run's examples. Files: validation carved out of train by hash unless a file is given; a
    question in two splits is removed from train (a validation or test item is never trained on)."""
    d = config.data
    if d.source == "zoo":
        return _zoo_splits(config)
    train = _file_examples(d.train, config)
    if d.validation:
        validation = _file_examples(d.validation, config)
    else:
        validation = [e for e in train if _held_out(e.question, config.seed, d.validation_fraction)]
    test = _file_examples(d.test, config) if d.test else []
    held = {e.question for e in validation} | {e.question for e in test}
    train = [e for e in train if e.question not in held]
    if d.train_size:
        train = train[: d.train_size]
    return Splits(train, validation[: d.validation_size], test[: d.test_size])


def prompt_format(config: TrainConfig) -> PromptFormat:
    p = config.prompts
    return PromptFormat(sender=p.sender, aware=p.aware, unaware=p.unaware, with_input=p.with_input)


def answer_reader(config: TrainConfig) -> Callable[[str], str | None]:
    kind = config.prompts.answer_kind
    if kind == "word":
        from densecomm_core.zoo.tasks import extract_answer

        return extract_answer
    from densecomm_core.data import extract_answer as extract

    return lambda text: extract(text, kind)


def trace_requests(config: TrainConfig, train: Sequence[Example]) -> list[TraceRequest]:
    guided = config.prompts.guided
    return [TraceRequest(e.question, e.answer, guided.format(context=e.question, answer=e.answer), e.family, e.multiple_choice)
            for e in train]
