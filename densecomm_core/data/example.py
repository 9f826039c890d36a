"""One typed task record shared by every benchmark loader, the zoo and the evaluator."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from densecomm_core.errors import DenseCommError

LETTERS = "ABCDEFGHIJ"  # canonical option letters, in order (MMLU-Pro has 10 options)


class DataError(DenseCommError, ValueError):
    """A task file or row is malformed; the message names ``file:line``, the field and what was expected."""


@dataclass(frozen=True)
class TaskExample:
    """One task instance: the input X the sender reads, the canonical gold answer and its provenance.

    ``answer`` is canonical: a number (``"72"``, ``"-1.5"``, ``"3/4"``) for math, an option letter
    (``"B"``) for multiple choice, the gold word for zoo families. ``choices`` holds the option texts
    in letter order; ``question`` already renders them (stem, then ``A. text`` lines).
    """

    family: str  # task set name, e.g. "gsm8k", "arc-challenge", or a zoo family
    question: str  # the input X the sender reads (multiple choice: stem + rendered options)
    answer: str  # gold answer in canonical form
    choices: tuple[str, ...] = ()  # option texts in letter order, for multiple choice
    solution: str = ""  # gold rationale when the format has one
    source: str = ""  # "file:line" it came from

    @property
    def multiple_choice(self) -> bool:
        return len(self.choices) > 0

    @property
    def answer_kind(self) -> str:
        """The extraction kind that scores this example: ``letter`` for multiple choice, else ``number``."""
        return "letter" if self.multiple_choice else "number"

    def to_json(self) -> str:
        """Canonical JSON of the content fields (``source`` left out: it names a local path)."""
        return json.dumps(
            {
                "family": self.family,
                "question": self.question,
                "answer": self.answer,
                "choices": list(self.choices),
                "solution": self.solution,
            },
            sort_keys=True,
            ensure_ascii=False,
        )


def render_multiple_choice(stem: str, choices: Sequence[str]) -> str:
    """The question text of a multiple-choice item: the stem, then one ``A. option`` line per choice."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} are supported")
    lines = [stem.strip()] + [f"{LETTERS[i]}. {text.strip()}" for i, text in enumerate(choices)]
    return "\n".join(lines)


def fingerprint(examples: Iterable[TaskExample]) -> str:
    """sha256 over the examples' canonical JSON (order matters), 16 hex digits; names the data a run saw."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.to_json().encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
