"""Answer extraction as the paper scores it: the last number for math, the answer letter for multiple choice.

Kinds
- ``number``: the last number in the text (``1,234`` -> ``1234``, ``-3.50`` -> ``-3.5``, ``\\frac{3}{4}`` ->
  ``3/4``), after LaTeX fractions are rewritten; canonical numbers compare as rationals (``0.5 == 1/2``).
- ``letter``: the option letter in its canonical answer form: the last ``answer is (B)`` / ``Answer: B`` /
  ``answer B`` / ``\\boxed{B}``; else a reply that is only a letter (``B``, ``(B).``); else the last ``(B)``.
- ``boxed``: the content of the last ``\\boxed{...}`` (canonical number when it is one), else the last number.
- ``word``: the zoo's format, the word after the last ``answer``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from densecomm_core.data.example import LETTERS

KINDS = ("number", "letter", "boxed", "word")

_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")
_LETTER_CLASS = f"[{LETTERS}]"
_ANSWER_LETTER = re.compile(
    r"(?i:answer)\s*(?:(?i:is)|:|=)?\s*(?:(?i:option)\s*)?[:(\[]?\s*\**\s*(" + _LETTER_CLASS + r")(?![\w'])"
)
_BOXED_LETTER = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?(" + _LETTER_CLASS + r")\)?\s*\}?\s*\}")
_ONLY_LETTER = re.compile(r"^\s*[(\[]?(" + _LETTER_CLASS + r")[)\]]?\s*[.:]?\s*$")
_PAREN_LETTER = re.compile(r"\((" + _LETTER_CLASS + r")\)")


def canonical_number(text: str) -> str | None:
    """``text`` as a canonical number string when it is exactly one number (``"1,000.50"`` -> ``"1000.5"``)."""
    cleaned = _FRAC.sub(r"\1/\2", text.strip())
    cleaned = cleaned.replace("$", "").replace("\\!", "").replace("\\,", "").strip()
    cleaned = re.sub(r"\\%|%$", "", cleaned).strip()
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    if not _NUMBER.fullmatch(cleaned):
        return None
    return _normalise(cleaned)


def _normalise(number: str) -> str:
    number = number.replace(",", "")
    if "/" in number:
        numerator, denominator = number.split("/")
        if int(denominator) == 0:
            return number
        value = Fraction(int(numerator), int(denominator))
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    if "." in number:
        number = number.rstrip("0").rstrip(".")
        if number.startswith("-."):
            number = "-0" + number[1:]
        elif number.startswith("."):
            number = "0" + number
    if number in ("-0", ""):
        number = "0"
    return number


def last_number(text: str) -> str | None:
    """The last number in ``text``, canonical, or None."""
    matches = _NUMBER.findall(_FRAC.sub(r"\1/\2", text))
    return _normalise(matches[-1]) if matches else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None


def answer_letter(text: str) -> str | None:
    """The canonical answer letter in ``text``, or None."""
    for pattern in (_ANSWER_LETTER, _BOXED_LETTER):
        matches = pattern.findall(text)
        if matches:
            return matches[-1].upper()
    only = _ONLY_LETTER.match(text)
    if only:
        return only.group(1).upper()
    matches = _PAREN_LETTER.findall(text)
    return matches[-1] if matches else None


def extract_answer(text: str, kind: str) -> str | None:
    """The answer of kind ``kind`` (one of ``KINDS``) in generated ``text``, canonical, or None."""
    if kind == "number":
        return last_number(text)
    if kind == "letter":
        return answer_letter(text)
    if kind == "boxed":
        boxed = last_boxed(text)
        if boxed is not None:
            return canonical_number(boxed) or boxed
        return last_number(text)
    if kind == "word":
        words = text.split()
        for i in range(len(words) - 2, -1, -1):
            if words[i] == "answer":
                return words[i + 1]
        return None
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a predicted canonical answer equals the gold one (numbers compared as rationals)."""
    if predicted is None:
        return False
    if predicted == gold:
        return True
    try:
        return _as_fraction(predicted) == _as_fraction(gold)
    except (ValueError, ZeroDivisionError):
        return False


def _as_fraction(number: str) -> Fraction:
    if not _NUMBER.fullmatch(number):
        raise ValueError(number)
    return Fraction(number.replace(",", ""))
