"""Task sets an evaluation scores: the zoo's families and local JSONL files in public benchmark formats.

    TaskSet(name, examples, kind, in_domain, source)    one column of the accuracy table
    TaskSet.correct(example, text)                      the paper's extraction, compared canonically
    zoo_task_sets(split, limit, seed, suite=)           one set per family of a zoo suite (v2's OOD ones marked so)
    file_task_sets(format, path, limit, seed)           a local file through ``data.load_task_file``, one set per
                                                        family it holds (out-of-domain for the zoo adapter)
    parse_task_specs("zoo,gsm8k=a.jsonl", ...)          the CLI's ``--tasks`` list

``limit`` keeps the first ``limit`` examples of each set (the zoo: per family, as the demo does); with a
``seed`` a seeded random subset instead (the zoo draws a seeded stream inside the same split partition).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from densecomm_core.data import (
    DataError,
    TaskExample,
    answers_match,
    extract_answer,
    load_task_file,
)
from densecomm_core.zoo.suite import get_suite

# Answer extraction per public format (the paper's: last number; the answer letter for multiple choice).
FORMAT_KINDS: dict[str, str] = {
    "gsm8k": "number",
    "math": "boxed",
    "arc": "letter",
    "mmlu-redux": "letter",
    "medqa": "letter",
    "openbookqa": "letter",
    "jsonl": "auto",  # each example's own kind: letter when it has choices, else number
}


@dataclass(frozen=True)
class TaskSet:
    """Examples scored together; ``kind`` is an ``extract.KINDS`` name or ``auto`` (per example)."""

    name: str
    examples: tuple[TaskExample, ...]
    kind: str
    in_domain: bool  # the adapter was trained on this distribution (targets are stated on in-domain sets)
    source: str

    def correct(self, example: TaskExample, text: str) -> bool:
        kind = example.answer_kind if self.kind == "auto" else self.kind
        return answers_match(extract_answer(text, kind), example.answer)


def _subset(items: list, limit: int | None, seed: int | None) -> list:
    if limit is None or limit >= len(items):
        return items
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def zoo_task_sets(split: str = "test", limit: int | None = 200, seed: int | None = None,
                  families: Sequence[str] | None = None, suite: str = "v1") -> list[TaskSet]:
    """One task set per family of the zoo ``suite`` (default: all of them; its out-of-domain families are
    marked so): ``limit`` examples of ``split`` (the split's own stream without a seed)."""
    zoo = get_suite(suite)
    if split not in zoo.split_seeds:
        raise DataError(f"unknown zoo split {split!r}; expected one of {tuple(zoo.split_seeds)}")
    names = zoo.family_names if families is None else tuple(families)
    per_family = 200 if limit is None else limit
    if seed is None:
        drawn = zoo.make_split(split, per_family, names)
    else:  # another stream, still inside the split's hash partition
        rng = random.Random(f"{split}-{seed}")
        drawn = [zoo.sample_in_split(rng, split, f) for _ in range(per_family) for f in names]
    sets = []
    for family in names:
        examples = tuple(TaskExample(e.family, e.context, e.answer, (), e.trace, f"zoo:{split}")
                         for e in drawn if e.family == family)
        sets.append(TaskSet(family, examples, "word", not zoo.family(family).out_of_domain, f"zoo {suite} {split} split"))
    return sets


def file_task_sets(format: str, path: str | Path, limit: int | None = None, seed: int | None = None) -> list[TaskSet]:
    """A local JSONL file in a public format; one set per family in it, each cut to ``limit``."""
    if format not in FORMAT_KINDS:
        raise DataError(f"unknown task format {format!r}; expected one of {sorted(FORMAT_KINDS)}")
    examples = load_task_file(path, format)
    if not examples:
        raise DataError(f"task file {str(path)!r} holds no examples")
    families: dict[str, list[TaskExample]] = {}
    for example in examples:
        families.setdefault(example.family, []).append(example)
    return [TaskSet(name, tuple(_subset(items, limit, seed)), FORMAT_KINDS[format], False, str(path))
            for name, items in families.items()]


def parse_task_specs(specs: str, split: str = "test", limit: int | None = None, seed: int | None = None,
                     suite: str = "v1") -> list[TaskSet]:
    """``zoo`` (the families of the zoo ``suite``) and ``FORMAT=PATH`` items, comma-separated, e.g.
    ``zoo,gsm8k=gsm8k.jsonl,arc=arc.jsonl``."""
    sets: list[TaskSet] = []
    for item in (s.strip() for s in specs.split(",")):
        if not item:
            continue
        if item == "zoo":
            sets.extend(zoo_task_sets(split, limit, seed, suite=suite))
        elif "=" in item:
            format, path = (part.strip() for part in item.split("=", 1))
            sets.extend(file_task_sets(format, path, limit, seed))
        else:
            raise DataError(f"task spec {item!r} is neither 'zoo' nor FORMAT=PATH (FORMAT one of {sorted(FORMAT_KINDS)})")
    names = [s.name for s in sets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"task set names {duplicates} appear twice in {specs!r}")
    if not sets:
        raise DataError(f"no task sets in {specs!r}")
    return sets
