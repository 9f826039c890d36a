"""Receiver-self guided traces (paper appendix A): the receiver writes the Phase-II target given the gold answer.

    generate_receiver_traces(receiver, requests, extract, ...)   batched guided decoding -> one record per request
    save_traces / load_traces                                    JSONL (written atomically), one line per request
    match_traces(records, questions)                             records back to training examples by question text

For each training example the receiver is prompted with the input and the gold answer and decodes a
solution. A trace whose extracted answer equals the gold one is kept (cut right after its last answer
statement); a multiple-choice trace that ends elsewhere is relabelled to end in the canonical answer
statement (``answer_template``, e.g. ``answer B`` or ``The answer is (B)``); any other trace is dropped,
with the reason. Dropped requests are written too, so the JSONL accounts for every training example.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from densecomm_core.errors import DenseCommError
from densecomm_core.generation import GenerationConfig
from densecomm_core.models import LoadedModel
from densecomm_core.relay import receiver_generate

KEPT, RELABELLED, DROPPED = "kept", "relabelled", "dropped"


class TraceFileError(DenseCommError, ValueError):
    """A traces JSONL file is malformed, or its records do not match the training examples."""


@dataclass(frozen=True)
class TraceRecord:
    context: str  # the source input X (matched back to training examples by this text)
    answer: str  # gold answer
    trace: str  # the receiver's own solution, ending in the canonical answer statement ("" when dropped)
    family: str = ""
    mode: str = "guided"  # "guided" or "guided-relabelled"
    status: str = KEPT  # kept | relabelled | dropped
    reason: str = ""  # why a trace was relabelled or dropped (what the receiver answered)

    @property
    def usable(self) -> bool:
        return self.status != DROPPED


@dataclass(frozen=True)
class TraceRequest:
    context: str
    answer: str
    guided_prompt: str  # X plus the gold answer, in the receiver's prompt format
    family: str = ""
    multiple_choice: bool = False


def answer_statement_prefix(answer_template: str) -> str:
    """The words of the canonical answer statement before the answer itself ("answer {answer}" -> "answer")."""
    if "{answer}" not in answer_template:
        raise ValueError(f"answer_template must contain '{{answer}}', got {answer_template!r}")
    return answer_template.split("{answer}")[0].strip()


def canonical_trace(text: str, answer: str, answer_template: str = "answer {answer}") -> str:
    """Cut ``text`` right after its last canonical statement of ``answer`` (unchanged when there is none)."""
    statement = answer_template.format(answer=answer)
    end = text.rfind(statement)
    return text[: end + len(statement)].strip() if end >= 0 else text.strip()


def relabelled_trace(text: str, answer: str, answer_template: str = "answer {answer}") -> str:
    """The trace up to its last answer statement (or all of it), ending in the canonical statement of ``answer``."""
    prefix = answer_statement_prefix(answer_template)
    cut = text.rfind(prefix) if prefix else -1
    body = (text[:cut] if cut >= 0 else text).strip()
    return f"{body} {answer_template.format(answer=answer)}".strip()


def generate_receiver_traces(
    receiver: LoadedModel,
    requests: Sequence[TraceRequest],
    extract: Callable[[str], str | None],
    answer_template: str = "answer {answer}",
    config: GenerationConfig = GenerationConfig(max_new_tokens=32),
    batch_size: int = 128,
) -> tuple[list[TraceRecord], dict[str, int]]:
    """Guided decoding by the receiver itself, batched; returns one record per request and the counts."""
    records: list[TraceRecord] = []
    stats = {KEPT: 0, RELABELLED: 0, DROPPED: 0}
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        out = receiver_generate(receiver, None, [r.guided_prompt for r in chunk], config)
        for request, text in zip(chunk, out.texts):
            got = extract(text)
            if got == request.answer:
                record = TraceRecord(request.context, request.answer, canonical_trace(text, request.answer, answer_template),
                                     request.family)
            elif request.multiple_choice:
                record = TraceRecord(request.context, request.answer, relabelled_trace(text, request.answer, answer_template),
                                     request.family, "guided-relabelled", RELABELLED, f"answered {got!r}")
            else:
                record = TraceRecord(request.context, request.answer, "", request.family, "guided", DROPPED,
                                     f"answered {got!r}, gold {request.answer!r}")
            records.append(record)
            stats[record.status] += 1
    return records, stats


_JSON_FIELDS = {"question": "context", "gold": "answer", "trace": "trace", "family": "family", "mode": "mode",
                "status": "status", "reason": "reason"}


def save_traces(records: Iterable[TraceRecord], path: Path) -> None:
    """JSONL with question, gold, trace, family, mode, status and reason; written to a temp file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for record in records:
            row = asdict(record)
            f.write(json.dumps({key: row[attr] for key, attr in _JSON_FIELDS.items()}, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_traces(path: Path) -> list[TraceRecord]:
    """Every record of a traces file (dropped ones included); TraceFileError names the line of a bad row."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            records.append(TraceRecord(**{attr: row[key] for key, attr in _JSON_FIELDS.items() if key in row}))
        except (json.JSONDecodeError, TypeError) as exc:
            raise TraceFileError(f"{path}:{number}: not a trace record: {exc}") from exc
        if records[-1].status not in (KEPT, RELABELLED, DROPPED):
            raise TraceFileError(f"{path}:{number}: status {records[-1].status!r}, expected kept, relabelled or dropped")
    return records


def match_traces(records: Sequence[TraceRecord], questions: Iterable[str]) -> list[TraceRecord]:
    """The usable records, each matched to a training example by its question text; refuses strangers."""
    known = set(questions)
    strangers = [r.context for r in records if r.context not in known]
    if strangers:
        raise TraceFileError(
            f"{len(strangers)} trace(s) match no training example by question text, e.g. {strangers[0][:80]!r}")
    return [r for r in records if r.usable]


def traces_fingerprint(records: Sequence[TraceRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(asdict(record), sort_keys=True).encode())
    return digest.hexdigest()[:16]
