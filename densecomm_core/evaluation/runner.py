"""Run methods x modes x task sets in batches and keep, per cell, accuracy and the exact per-side token counts.

    cells(methods, modes)                              the (method, mode) pairs to run, in table order
    evaluate(methods, task_sets, modes, batch_size, progress)  -> list[CellResult]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from densecomm_core.evaluation.flops import add_counts
from densecomm_core.evaluation.methods import EvaluationError, Method, TextToTextOutput
from densecomm_core.evaluation.tasksets import TaskSet
from densecomm_core.relay import ContextMode, TokenCounts

# progress(cell label, task set, examples done, examples in the set)
Progress = Callable[[str, str, int, int], None]


def mode_label(mode: ContextMode | None) -> str:
    return mode.value if mode is not None else "-"


@dataclass
class CellResult:
    """One (method, mode, task set) cell."""

    method: str
    mode: ContextMode | None
    task: str
    in_domain: bool
    requests: int = 0
    correct: int = 0
    counts: TokenCounts = field(default_factory=TokenCounts)  # summed over the requests
    payload_bytes: int = 0  # raw bytes of transferred caches, summed
    texts: list[str] = field(default_factory=list, repr=False)
    messages: list[str] = field(default_factory=list, repr=False)  # T2T: the sender's messages, in order

    @property
    def accuracy(self) -> float:
        return self.correct / self.requests if self.requests else 0.0


def cells(methods: Sequence[Method], modes: Sequence[ContextMode] | None = None) -> list[tuple[Method, ContextMode | None]]:
    """Every method in each of its modes that ``modes`` asks for (methods without a regime always run)."""
    wanted = set(modes) if modes is not None else set(ContextMode)
    out = [(m, mode) for m in methods for mode in m.modes if mode is None or mode in wanted]
    if not out:
        raise EvaluationError(f"no method runs in modes {[m.value for m in wanted]}")
    return out


def evaluate(
    methods: Sequence[Method],
    task_sets: Sequence[TaskSet],
    modes: Sequence[ContextMode] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> list[CellResult]:
    """Score every cell; batches keep the task set's order, so a cell's texts line up with its examples."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    results = []
    for method, mode in cells(methods, modes):
        label = method.name if mode is None else f"{method.name} ({mode.value})"
        for task in task_sets:
            cell = CellResult(method.name, mode, task.name, task.in_domain)
            examples = task.examples
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                out = method.run([e.question for e in batch], mode)
                cell.requests += len(batch)
                cell.correct += sum(task.correct(e, t) for e, t in zip(batch, out.texts, strict=True))
                cell.counts = add_counts(cell.counts, out.counts)
                cell.payload_bytes += out.payload_bytes
                cell.texts.extend(out.texts)
                if isinstance(out, TextToTextOutput):
                    cell.messages.extend(out.messages)
                if progress is not None:
                    progress(label, task.name, cell.requests, len(examples))
            results.append(cell)
    return results
