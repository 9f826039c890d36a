"""Loaders of the public benchmark formats: fixtures parse to canonical records, malformed rows name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densecomm_core.data import FORMATS, DataError, TaskExample, fingerprint, load_task_file

HERE = Path(__file__).parent


def test_gsm8k_answers_and_rationales():
    examples = load_task_file(HERE / "gsm8k.jsonl", "gsm8k")
    assert [e.answer for e in examples] == ["10", "312.5", "-5"]
    assert all(e.family == "gsm8k" and not e.multiple_choice for e in examples)
    assert "<<" not in examples[0].solution and "####" not in examples[0].solution
    assert examples[0].source.endswith("gsm8k.jsonl:1")
    assert examples[2].source.endswith("gsm8k.jsonl:4")  # the blank line 3 is skipped, numbering kept


def test_math500_and_original_math_with_subject_and_level_filters():
    every = load_task_file(HERE / "math500.jsonl", "math")
    assert [e.answer for e in every] == ["4", "3/4", "(1,2)"]
    algebra = load_task_file(HERE / "math500.jsonl", "math", family="math-algebra", subject="algebra")
    assert [e.answer for e in algebra] == ["4", "(1,2)"] and algebra[0].family == "math-algebra"
    assert [e.answer for e in load_task_file(HERE / "math500.jsonl", "math", level=[2, 3])] == ["3/4", "(1,2)"]
    original = load_task_file(HERE / "math_train.jsonl", "math", subject="Algebra")
    assert [e.answer for e in original] == ["2", "-3"]  # answers from \boxed{} of the solution
    assert [e.answer for e in load_task_file(HERE / "math_train.jsonl", "math", level="1")] == ["2"]


def test_arc_hf_and_original_forms():
    hf = load_task_file(HERE / "arc_challenge.jsonl", "arc")
    assert [e.answer for e in hf] == ["B", "B", "C"]  # numeric label "2" -> B
    assert hf[0].choices == ("oxygen", "carbon dioxide", "nitrogen", "helium")
    assert hf[0].question.splitlines() == [
        "Which gas do plants take in from the air to make food?",
        "A. oxygen",
        "B. carbon dioxide",
        "C. nitrogen",
        "D. helium",
    ]
    assert len(hf[2].choices) == 3 and hf[0].family == "arc-challenge"
    original = load_task_file(HERE / "arc_original.jsonl", "arc")
    assert original[0].answer == "A" and original[0].choices[0] == "chemical"


def test_mmlu_redux_medqa_openbookqa():
    redux = load_task_file(HERE / "mmlu_redux.jsonl", "mmlu-redux")
    assert [e.answer for e in redux] == ["C", "D", "C"]  # wrong_groundtruth row takes correct_answer
    assert len(load_task_file(HERE / "mmlu_redux.jsonl", "mmlu-redux", error_type=["ok", "wrong_groundtruth"])) == 2
    medqa = load_task_file(HERE / "medqa.jsonl", "medqa")
    assert [e.answer for e in medqa] == ["C", "B"]  # answer_idx, then the answer text matched to options
    assert len(medqa[1].choices) == 5
    obqa = load_task_file(HERE / "openbookqa.jsonl", "openbookqa")
    assert [e.answer for e in obqa] == ["B", "C"] and obqa[0].question.startswith("The sun is responsible for\nA. ")


def test_generic_jsonl_and_limit_and_fingerprint():
    examples = load_task_file(HERE / "generic.jsonl", "jsonl", family="mine")
    assert [(e.family, e.answer) for e in examples] == [("mine", "42"), ("mine", "B"), ("sky", "B")]
    assert examples[0].solution == "6 * 7 = 42" and examples[1].choices == ("3", "8", "5")
    assert load_task_file(HERE / "generic.jsonl", "jsonl", family="mine", limit=1) == examples[:1]
    assert load_task_file(HERE / "generic.jsonl", "jsonl")[0].family == "generic"  # default: the file's stem
    assert fingerprint(examples) == fingerprint(load_task_file(HERE / "generic.jsonl", "jsonl", family="mine"))
    assert fingerprint(examples) != fingerprint(examples[:2])
    assert isinstance(examples[0], TaskExample) and set(FORMATS) >= {"gsm8k", "math", "arc", "mmlu-redux", "medqa", "openbookqa", "jsonl"}


BAD_ROWS = [
    ("gsm8k", {"question": "q", "answer": "no final"}, "answer"),
    ("gsm8k", {"question": "q", "answer": "x #### many"}, "answer"),
    ("gsm8k", {"answer": "#### 3"}, "question"),
    ("math", {"problem": "p", "solution": "no box"}, "solution"),
    ("math", {"problem": "p", "solution": "\\boxed{1}", "level": "hard"}, "level"),
    ("arc", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}, "choices"),
    ("arc", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}, "answerKey"),
    ("arc", {"question": {"stem": "", "choices": []}, "answerKey": "A"}, "question.stem"),
    ("mmlu-redux", {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 7}, "answer"),
    ("mmlu-redux", {"question": "q", "choices": "abcd", "answer": 0}, "choices"),
    ("medqa", {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}, "answer_idx"),
    ("medqa", {"question": "q", "options": {"A": "x", "B": "y"}, "answer": "z"}, "answer"),
    ("openbookqa", {"question_stem": "q", "choices": {"text": ["a", ""], "label": ["A", "B"]}, "answerKey": "A"}, "choices"),
    ("jsonl", {"question": "q", "answer": "Q", "choices": ["a", "b"]}, "answer"),
    ("jsonl", {"question": "q", "answer": None}, "answer"),
    # found by fuzzing: a traceback, a field named wrongly, or a row read with a wrong answer
    ("mmlu-redux", {"question": "q", "choices": ["a", "b"], "answer": "\u00b2"}, "answer"),  # int('²') raised
    ("mmlu-redux", {"question": "q", "choices": ["a", "b"], "answer": 0, "subject": 5}, "subject"),
    ("math", {"problem": "p", "solution": "\\boxed{1}", "type": 5}, "type"),  # was named 'subject'
    ("math", {"problem": "p", "answer": True}, "answer"),
    ("math", {"problem": "p", "answer": float("nan")}, "answer"),
    ("jsonl", {"question": "q", "answer": float("inf")}, "answer"),
    ("jsonl", {"question": "q", "choices": ["3", "5", "7", "9"], "answer": "3"}, "answer"),  # index 3 = D, text '3' = A
    ("jsonl", {"question": "q", "choices": ["B", "A"], "answer": "A"}, "answer"),  # letter A, or the text of B
    ("medqa", {"question": "q", "options": [{"key": "A", "value": "x"}, {"key": "A", "value": "y"}], "answer_idx": "A"}, "options"),
    ("medqa", {"question": "q", "options": [{"value": "x"}, {"value": "y"}], "answer_idx": "A"}, "options"),
    ("arc", {"question": "q", "choices": {"text": ["a", "b"], "label": [True, False]}, "answerKey": "A"}, "choices"),
]


@pytest.mark.parametrize(("format", "row", "field"), BAD_ROWS)
def test_malformed_row_names_file_line_and_field(tmp_path, format, row, field):
    good = {
        "gsm8k": {"question": "q", "answer": "#### 1"},
        "math": {"problem": "p", "solution": "\\boxed{1}"},
        "arc": {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
        "mmlu-redux": {"question": "q", "choices": ["a", "b"], "answer": 1},
        "medqa": {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"},
        "openbookqa": {"question_stem": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
        "jsonl": {"question": "q", "answer": "1"},
    }[format]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: field '{field}'"):
        load_task_file(path, format, limit=1)  # every row is checked, even past the limit


def test_file_level_errors(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_task_file(path, "gsm8k")
    path.write_text('[{"question": "q"},\n')
    with pytest.raises(DataError, match="one JSON array"):
        load_task_file(path, "gsm8k")
    path.write_text('["a list"]\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:1: expected a JSON object"):
        load_task_file(path, "gsm8k")
    with pytest.raises(DataError, match="unknown task format 'squad'"):
        load_task_file(path, "squad")
    with pytest.raises(DataError, match="has no filter"):
        load_task_file(HERE / "gsm8k.jsonl", "gsm8k", subject="Algebra")
    with pytest.raises(DataError, match="does not exist"):
        load_task_file(tmp_path / "missing.jsonl", "gsm8k")
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid UTF-8"):  # was a bare UnicodeDecodeError
        load_task_file(path, "gsm8k")
