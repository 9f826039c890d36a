"""Task sets: the zoo's families and public-format files, their limits, seeds and answer kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from densecomm_core.data import DataError
from densecomm_core.evaluation.tasksets import parse_task_specs, zoo_task_sets
from densecomm_core.zoo import tasks

DATA = Path(__file__).resolve().parent.parent / "data"


def test_zoo_sets_are_the_split_by_family():
    sets = zoo_task_sets("test", 3)
    assert [s.name for s in sets] == list(tasks.FAMILIES) and all(s.in_domain and s.kind == "word" for s in sets)
    assert [e.question for s in sets for e in s.examples] == [
        e.context for f in tasks.FAMILIES for e in tasks.make_split("test", 3) if e.family == f]
    seeded = zoo_task_sets("validation", 3, seed=5)
    assert all(tasks.split_of(e.question) == "validation" for s in seeded for e in s.examples)
    assert seeded[0].examples != zoo_task_sets("validation", 3)[0].examples


def test_zoo_v2_sets_mark_the_out_of_domain_families():
    from densecomm_core.zoo.suite import get_suite

    v2 = get_suite("v2")
    sets = parse_task_specs("zoo", "validation", 4, suite="v2")
    assert [s.name for s in sets] == list(v2.family_names)
    assert {s.name for s in sets if not s.in_domain} == set(v2.out_of_domain) == {"compare", "owner"}
    assert all(len(s.examples) == 4 and all(e.family == s.name for e in s.examples) for s in sets)
    assert all(tasks.split_of(e.question) == "validation" for s in sets for e in s.examples)


def test_files_limits_seeds_and_scoring():
    sets = parse_task_specs(f"zoo,gsm8k={DATA / 'gsm8k.jsonl'},arc={DATA / 'arc_challenge.jsonl'},jsonl={DATA / 'generic.jsonl'}",
                            limit=2)
    by = {s.name: s for s in sets}
    assert list(by) == [*tasks.FAMILIES, "gsm8k", "arc-challenge", "generic", "sky"]
    assert len(by["gsm8k"].examples) == 2 and not by["gsm8k"].in_domain
    gsm = by["gsm8k"]
    assert gsm.correct(gsm.examples[0], "so she has 10.") and not gsm.correct(gsm.examples[0], "11")
    assert gsm.examples[1].answer == "312.5" and gsm.correct(gsm.examples[1], "each pays $312.50")
    arc = by["arc-challenge"]
    gold = arc.examples[0].answer
    assert arc.correct(arc.examples[0], f"The answer is ({gold}).")
    generic = by["generic"]  # auto: a number, then a letter
    assert generic.correct(generic.examples[0], "42") and generic.correct(generic.examples[1], "answer: B")
    first = parse_task_specs(f"gsm8k={DATA / 'gsm8k.jsonl'}", limit=2, seed=1)[0].examples
    assert len(first) == 2 and first == parse_task_specs(f"gsm8k={DATA / 'gsm8k.jsonl'}", limit=2, seed=1)[0].examples


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="neither 'zoo' nor FORMAT=PATH"):
        parse_task_specs("gsm8k")
    with pytest.raises(DataError, match="unknown task format 'squad'"):
        parse_task_specs(f"squad={DATA / 'gsm8k.jsonl'}")
    with pytest.raises(DataError, match="appear twice"):
        parse_task_specs("zoo,zoo", limit=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        parse_task_specs(f"gsm8k={bad}")
