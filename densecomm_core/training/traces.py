"""Receiver-self guided traces (paper appendix A): the receiver writes the Phase-II target given the gold answer.

For each training example the receiver is prompted with the input and the gold answer and decodes a
solution. Traces whose final answer disagrees with the gold one are dropped, except for multiple-choice
tasks, whose traces are relabelled to end in the canonical ``answer X`` the evaluator expects. Records
are JSONL-serialisable and carry a mode tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from densecomm_core.generation import GenerationConfig
from densecomm_core.models import LoadedModel
from densecomm_core.relay import receiver_generate


@dataclass(frozen=True)
class TraceRecord:
    context: str  # the source input X (matched back to training examples by this text)
    answer: str  # gold answer
    trace: str  # the receiver's own solution, ending in the canonical answer format
    family: str = ""
    mode: str = "guided"  # "guided" or "guided-relabelled"


@dataclass(frozen=True)
class TraceRequest:
    context: str
    answer: str
    guided_prompt: str  # X plus the gold answer, in the receiver's prompt format
    family: str = ""
    multiple_choice: bool = False


def canonical_trace(text: str, answer_word: str) -> str:
    """Cut the trace right after its final ``answer X``; used only once X == gold."""
    words = text.split()
    last = max(i for i, w in enumerate(words[:-1]) if w == answer_word)
    return " ".join(words[: last + 2])


def generate_receiver_traces(
    receiver: LoadedModel,
    requests: Sequence[TraceRequest],
    extract: Callable[[str], str | None],
    answer_word: str = "answer",
    config: GenerationConfig = GenerationConfig(max_new_tokens=32),
    batch_size: int = 128,
) -> tuple[list[TraceRecord], dict[str, int]]:
    """Guided decoding by the receiver itself; returns the kept records and kept/relabelled/dropped counts."""
    records: list[TraceRecord] = []
    stats = {"kept": 0, "relabelled": 0, "dropped": 0}
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        out = receiver_generate(receiver, None, [r.guided_prompt for r in chunk], config)
        for request, text in zip(chunk, out.texts):
            if extract(text) == request.answer:
                trace = canonical_trace(text, answer_word)
                records.append(TraceRecord(request.context, request.answer, trace, request.family))
                stats["kept"] += 1
            elif request.multiple_choice:
                words = text.split()
                cut = words.index(answer_word) if answer_word in words else len(words)
                trace = " ".join(words[:cut] + [answer_word, request.answer])
                records.append(TraceRecord(request.context, request.answer, trace, request.family, "guided-relabelled"))
                stats["relabelled"] += 1
            else:
                stats["dropped"] += 1
    return records, stats


def save_traces(records: Sequence[TraceRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records))


def load_traces(path: Path) -> list[TraceRecord]:
    return [TraceRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def traces_fingerprint(records: Sequence[TraceRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(asdict(record), sort_keys=True).encode())
    return digest.hexdigest()[:16]
