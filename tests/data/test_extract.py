"""Answer extraction edge cases, per answer kind: the paper's last number and canonical answer letter."""

from __future__ import annotations

import pytest

from densecomm_core.data import answers_match, canonical_number, extract_answer

NUMBER_CASES = [
    ("The answer is 1,234.", "1234"),  # thousands separators, sentence period
    ("She pays 312.50 dollars", "312.5"),  # trailing zeros
    ("3 apples, then 5, so 8", "8"),  # the LAST number
    ("12 - 5 = 7", "7"),  # a minus between numbers is not a sign
    ("It fell to -5 degrees", "-5"),
    ("x = \\frac{3}{4}", "3/4"),  # LaTeX fraction
    ("ratio 6/8", "3/4"),  # reduced
    ("about .5 cups", "0.5"),
    ("#### 10", "10"),  # GSM8K gold form
    ("1, 2, 3", "3"),  # a list is not 1,2,3 thousands
    ("no digits here", None),
    ("20%", "20"),
    ("x = 4.0", "4"),
]


@pytest.mark.parametrize(("text", "expected"), NUMBER_CASES)
def test_last_number(text, expected):
    assert extract_answer(text, "number") == expected


LETTER_CASES = [
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("answer D", "D"),  # the zoo's 'answer X' form
    ("ANSWER IS A", "A"),
    ("answer: **B**", "B"),  # markdown bold
    ("The correct answer is option C.", "C"),
    ("so \\boxed{D}", "D"),
    ("\\boxed{\\text{(A)}}", "A"),
    ("B", "B"),  # a bare letter reply
    ("(A).", "A"),
    ("The answer is a cat", None),  # a lower-case article is not a letter
    ("I first thought (A), then (C)", "C"),  # the last parenthesised letter
    ("A is wrong; answer: C. A again", "C"),  # the answer form wins over stray capitals
    ("Answer: B ... wait, the answer is D", "D"),  # the last answer form
    ("nothing here", None),
]


@pytest.mark.parametrize(("text", "expected"), LETTER_CASES)
def test_answer_letter(text, expected):
    assert extract_answer(text, "letter") == expected


def test_boxed_word_and_matching():
    assert extract_answer("so $x = \\boxed{\\frac{1}{2}}$", "boxed") == "1/2"
    assert extract_answer("\\boxed{(1, {2})}", "boxed") == "(1, {2})"  # nested braces
    assert extract_answer("no box but 7", "boxed") == "7"
    assert extract_answer("bob 7 . answer 7 <eos>", "word") == "7"
    assert extract_answer("answer", "word") is None
    assert answers_match("0.5", "1/2") and answers_match("1000", "1000") and not answers_match("7", "8")
    assert not answers_match(None, "1") and not answers_match("B", "C")
    assert canonical_number("$1,000.50$") == "1000.5" and canonical_number("x + 1") is None
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("1", "regex")
