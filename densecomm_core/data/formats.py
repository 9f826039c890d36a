"""Loaders of local JSONL benchmark files in their public formats, one typed record per row.

Formats (``FORMATS``; every row is checked, a bad one raises ``DataError`` naming ``file:line`` and the field)
- ``gsm8k``:      ``question``, ``answer`` ending in ``#### N`` (calculator ``<<...>>`` notes dropped).
- ``math``:       MATH / MATH-500: ``problem``, ``solution`` with ``\\boxed{}``, optional ``answer``,
                  ``type`` or ``subject``, ``level`` (``"Level 5"`` or ``5``). Filters: ``subject``, ``level``.
- ``arc``:        ARC (HF: ``question``, ``choices: {text, label}``, ``answerKey``; original:
                  ``question: {stem, choices: [{text, label}]}``); numeric labels ``1..5`` map to ``A..E``.
- ``openbookqa``: HF ``question_stem``, ``choices: {text, label}``, ``answerKey`` (or the original ARC-like form).
- ``mmlu-redux``: ``question``, ``choices: [..]``, ``answer`` (index or letter), optional ``error_type`` and
                  ``correct_answer`` (used when the row is flagged ``wrong_groundtruth`` and it is a letter or
                  an index). Filters: ``error_type``, ``subject``.
- ``medqa``:      ``question``, ``options`` (``{"A": text}`` or ``[{key, value}]``), ``answer_idx``
                  (else ``answer`` text matched against the options). Filter: ``meta_info``.
- ``jsonl``:      generic ``question``, ``answer`` (number/text; a letter, index or option text when
                  ``choices`` is given as a list or a letter map), optional ``solution``, ``family`` (default:
                  the file name without extension).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densecomm_core.data.example import LETTERS, DataError, TaskExample, render_multiple_choice
from densecomm_core.data.extract import canonical_number, last_boxed

Attributes = dict[str, Any]  # per-row values the format's filters test (subject, level, ...)


class Row:
    """One parsed JSONL object plus where it came from; field accessors raise ``DataError`` on bad values."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def fail(self, field: str, expected: str) -> DataError:
        got = self.data.get(field, "<missing>") if "." not in field else "<see row>"
        return DataError(f"{self.where}: field {field!r} {expected}; got {_short(got)}")

    def text(self, field: str, data: Mapping[str, Any] | None = None, name: str | None = None) -> str:
        """A required non-empty string field (of ``data``, a nested object, when given)."""
        value = (self.data if data is None else data).get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{self.where}: field {name or field!r} must be a non-empty string; got {_short(value)}")
        return value

    def optional_text(self, field: str) -> str:
        value = self.data.get(field, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(field, "must be a string when present")
        return value


def _index(text: str) -> int | None:
    """``text`` as a non-negative integer written in ASCII digits (``str.isdigit`` also takes '²'), else None."""
    return int(text) if text.isascii() and text.isdigit() else None


def _answer_value(row: Row, field: str) -> str | int | float | None:
    """An answer that is a string or a finite number (JSON's true is not 1, and NaN / Infinity answer nothing)."""
    value = row.data.get(field)
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise row.fail(field, "must be a string or a finite number")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- helpers shared by the multiple-choice formats ----------------------------------------------------------


def _labelled_choices(row: Row, choices: Any, field: str) -> tuple[list[str], list[str]]:
    """``{text: [...], label: [...]}`` or ``[{text, label}, ...]`` -> (texts, labels)."""
    if isinstance(choices, Mapping):
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise DataError(f"{row.where}: field {field!r} must hold lists 'text' and 'label' of equal length; got {_short(choices)}")
    elif isinstance(choices, list) and all(isinstance(c, Mapping) for c in choices):
        texts = [c.get("text") for c in choices]
        labels = [c.get("label") for c in choices]
    else:
        raise DataError(f"{row.where}: field {field!r} must be {{text: [...], label: [...]}} or [{{text, label}}]; got {_short(choices)}")
    _check_options(row, texts, field)
    _check_labels(row, labels, field)
    return [str(t) for t in texts], [str(label).strip() for label in labels]


def _check_labels(row: Row, labels: list, field: str) -> None:
    if not all(isinstance(label, str | int) and not isinstance(label, bool) and str(label).strip() for label in labels) \
            or len({str(label).strip() for label in labels}) != len(labels):
        raise DataError(f"{row.where}: field {field!r} labels must be distinct non-empty; got {_short(labels)}")


def _check_options(row: Row, texts: Any, field: str) -> None:
    if not isinstance(texts, list) or not 2 <= len(texts) <= len(LETTERS):
        raise DataError(f"{row.where}: field {field!r} must hold 2 to {len(LETTERS)} options; got {_short(texts)}")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{row.where}: field {field!r} options must be non-empty strings; got {_short(texts)}")


def _key_to_letter(row: Row, key: Any, labels: list[str], field: str) -> str:
    """An answer key (one of ``labels``) -> the canonical letter of its position."""
    key = str(key).strip() if isinstance(key, str | int) else None
    if key is None or key not in labels:
        raise DataError(f"{row.where}: field {field!r} must be one of the labels {labels}; got {_short(row.data.get(field))}")
    return LETTERS[labels.index(key)]


def _index_or_letter(value: Any, n: int) -> str | None:
    """An index ``0..n-1`` or a letter ``A..`` -> canonical letter, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value < n:
        return LETTERS[value]
    if isinstance(value, str):
        value = value.strip().strip("()").strip()
        if len(value) == 1 and value.upper() in LETTERS[:n]:
            return value.upper()
        index = _index(value)
        if index is not None and index < n:
            return LETTERS[index]
    return None


def _mc_example(family: str, stem: str, texts: list[str], letter: str, row: Row, solution: str = "") -> TaskExample:
    return TaskExample(family, render_multiple_choice(stem, texts), letter, tuple(t.strip() for t in texts), solution, row.where)


# ---- the formats --------------------------------------------------------------------------------------------


def parse_gsm8k(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    question = row.text("question")
    answer = row.text("answer")
    if "####" not in answer:
        raise row.fail("answer", "must end in '#### N' (the GSM8K final answer)")
    rationale, final = answer.rsplit("####", 1)
    number = canonical_number(final)
    if number is None:
        raise row.fail("answer", "must end in '#### N' with N a number")
    solution = re.sub(r"<<[^<>]*>>", "", rationale).strip()
    return TaskExample(family, question.strip(), number, (), solution, row.where), {}


def parse_math(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    problem = row.text("problem")
    solution = row.optional_text("solution")
    answer = _answer_value(row, "answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise row.fail("answer", "must be a string or a number when present")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        boxed = last_boxed(solution) if solution else None
        if boxed is None:
            raise row.fail("solution", "must contain \\boxed{...} when 'answer' is absent")
        answer = boxed
    answer = str(answer).strip()
    subject_field = "subject" if "subject" in row.data else "type"  # MATH's own files call it type
    subject = row.data.get(subject_field)
    if subject is not None and not isinstance(subject, str):
        raise row.fail(subject_field, "must be a string when present")
    level = row.data.get("level")
    if isinstance(level, str):
        match = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", level)
        if match is None:
            raise row.fail("level", "must be 'Level N' or an integer")
        level = None if match.group(1) == "?" else int(match.group(1))
    elif level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        raise row.fail("level", "must be 'Level N' or an integer")
    canonical = canonical_number(answer) or answer.replace(" ", "")
    return TaskExample(family, problem.strip(), canonical, (), solution.strip(), row.where), {"subject": subject, "level": level}


def parse_arc(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    question = row.data.get("question")
    if isinstance(question, Mapping):  # original ARC / OpenBookQA: question: {stem, choices: [{text, label}]}
        stem = row.text("stem", question, "question.stem")
        texts, labels = _labelled_choices(row, question.get("choices"), "question.choices")
    elif isinstance(question, str) and question.strip():
        stem = question
        texts, labels = _labelled_choices(row, row.data.get("choices"), "choices")
    else:
        raise row.fail("question", "must be a non-empty string or {stem, choices}")
    letter = _key_to_letter(row, row.data.get("answerKey"), labels, "answerKey")
    return _mc_example(family, stem, texts, letter, row), {}


def parse_openbookqa(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    if "question_stem" not in row.data:
        return parse_arc(row, family)
    stem = row.text("question_stem")
    texts, labels = _labelled_choices(row, row.data.get("choices"), "choices")
    letter = _key_to_letter(row, row.data.get("answerKey"), labels, "answerKey")
    return _mc_example(family, stem, texts, letter, row), {}


def parse_mmlu_redux(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    stem = row.text("question")
    texts = row.data.get("choices")
    _check_options(row, texts, "choices")
    letter = _index_or_letter(row.data.get("answer"), len(texts))
    if letter is None:
        raise row.fail("answer", f"must be an index 0..{len(texts) - 1} or a letter A..{LETTERS[len(texts) - 1]}")
    error_type = row.data.get("error_type")
    if error_type is not None and not isinstance(error_type, str):
        raise row.fail("error_type", "must be a string when present")
    if error_type == "wrong_groundtruth":
        corrected = _index_or_letter(row.data.get("correct_answer"), len(texts))
        letter = corrected or letter
    subject = row.data.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise row.fail("subject", "must be a string when present")
    return _mc_example(family, stem, texts, letter, row), {"error_type": error_type, "subject": subject}


def parse_medqa(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    stem = row.text("question")
    options = row.data.get("options")
    if isinstance(options, Mapping):
        keys = sorted(options)
        texts = [options[k] for k in keys]
    elif isinstance(options, list) and all(isinstance(o, Mapping) for o in options):
        keys = [o.get("key") for o in options]
        texts = [o.get("value") for o in options]
    else:
        raise row.fail("options", "must be {letter: text} or [{key, value}]")
    _check_options(row, texts, "options")
    _check_labels(row, keys, "options")
    keys = [str(k).strip() for k in keys]
    if "answer_idx" in row.data:
        letter = _key_to_letter(row, row.data["answer_idx"], keys, "answer_idx")
    else:
        answer = row.text("answer")
        matches = [i for i, t in enumerate(texts) if t.strip() == answer.strip()]
        if len(matches) != 1:
            raise row.fail("answer", "must equal exactly one option text when 'answer_idx' is absent")
        letter = LETTERS[matches[0]]
    return _mc_example(family, stem, texts, letter, row), {"meta_info": row.data.get("meta_info")}


def parse_jsonl(row: Row, family: str) -> tuple[TaskExample, Attributes]:
    question = row.text("question")
    family = row.optional_text("family").strip() or family
    answer = _answer_value(row, "answer")
    if not isinstance(answer, str | int | float) or not str(answer).strip():
        raise row.fail("answer", "must be a non-empty string or a number")
    solution = row.optional_text("solution").strip()
    choices = row.data.get("choices")
    if choices is None:
        text = str(answer).strip()
        return TaskExample(family, question.strip(), canonical_number(text) or text, (), solution, row.where), {}
    if isinstance(choices, Mapping):
        keys = sorted(choices)
        if [str(k).strip().upper() for k in keys] != list(LETTERS[: len(keys)]):
            raise row.fail("choices", "as a map must be keyed A, B, C, ... in order")
        texts = [choices[k] for k in keys]
    else:
        texts = choices
    _check_options(row, texts, "choices")
    by_key = _index_or_letter(answer, len(texts))
    matches = [LETTERS[i] for i, t in enumerate(texts) if t.strip() == str(answer).strip()]
    by_text = matches[0] if len(matches) == 1 else None
    if by_key is not None and by_text is not None and by_key != by_text:
        raise row.fail("answer", f"is ambiguous: as a letter or index it is option {by_key}, as an option's text option "
                                 f"{by_text}; give the option's letter")
    letter = by_key or (by_text if isinstance(answer, str) else None)
    if letter is None:
        raise row.fail("answer", "must be an option letter, an index or one option's text when 'choices' is given")
    return _mc_example(family, question, texts, letter, row, solution), {}


@dataclass(frozen=True)
class Format:
    """A public file format: its default family name, its row parser and the filters it supports."""

    name: str
    family: str  # default task-set name ("" = the file's stem)
    parse: Callable[[Row, str], tuple[TaskExample, Attributes]]
    filters: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("gsm8k", "gsm8k", parse_gsm8k),
        Format("math", "math", parse_math, ("subject", "level")),
        Format("arc", "arc-challenge", parse_arc),
        Format("mmlu-redux", "mmlu-redux", parse_mmlu_redux, ("error_type", "subject")),
        Format("medqa", "medqa", parse_medqa, ("meta_info",)),
        Format("openbookqa", "openbookqa", parse_openbookqa),
        Format("jsonl", "", parse_jsonl)  # family: the file name without .jsonl,
    )
}


def _matches(value: Any, wanted: Any) -> bool:
    """A filter test: equality (strings case-insensitive); ``wanted`` may be a list/tuple/set of accepted values."""
    if isinstance(wanted, list | tuple | set | frozenset):
        return any(_matches(value, w) for w in wanted)
    if isinstance(value, str) and isinstance(wanted, str):
        return value.strip().casefold() == wanted.strip().casefold()
    if isinstance(value, int) and isinstance(wanted, str) and _index(wanted.strip()) is not None:
        return value == int(wanted)
    return value == wanted


def load_task_file(
    path: str | Path, format: str, family: str | None = None, limit: int | None = None, **filters: Any
) -> list[TaskExample]:
    """Every row of a local JSONL file in ``format`` (checked), filtered, in file order, at most ``limit``.

    ``family`` names the task set (default: the format's, e.g. ``arc-challenge``). ``filters`` keep rows
    whose attribute equals the value (case-insensitive, or any of a list), e.g. ``subject="Algebra"``.
    All rows are validated even when ``limit`` stops the output early.
    """
    if format not in FORMATS:
        raise DataError(f"unknown task format {format!r}; expected one of {sorted(FORMATS)}")
    spec = FORMATS[format]
    unknown = sorted(set(filters) - set(spec.filters))
    if unknown:
        raise DataError(f"format {format!r} has no filter {unknown}; expected one of {list(spec.filters)}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0; got {limit}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} does not exist or is not a file")
    examples: list[TaskExample] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                hint = " (expected JSON Lines: one object per line, not one JSON array)" if number == 1 and line.lstrip().startswith("[") else ""
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}){hint}") from None
            if not isinstance(data, dict):
                raise DataError(f"{where}: expected a JSON object per line; got {type(data).__name__}")
            example, attributes = spec.parse(Row(data, where), family or spec.family or path.stem)
            if all(_matches(attributes.get(key), wanted) for key, wanted in filters.items()):
                examples.append(example)
    return examples if limit is None else examples[:limit]
