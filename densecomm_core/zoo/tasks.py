"""The synthetic task suite of the embedded zoo: three families that can only be answered from the input.

Every example is a source context X (what the sender reads) plus a gold answer and a step-by-step
solution trace. The receiver is prompted with X (context-aware), with nothing (context-unaware) or
with X and the gold answer (guided trace generation, paper appendix A).

Families
- ``recall``: several entity -> digit facts, then a question about one entity (chance 10 %).
- ``math``:   a chain of three digits joined by + / - modulo 10; the trace works it step by step
              (chance 10 %).
- ``choice``: a short passage of animal -> colour facts, four lettered options (``red A , blue B ...``)
              and a question; the answer is the option letter in the canonical ``answer X`` format
              (chance 25 %).

Text is whitespace-separated words from a closed vocabulary (see ``VOCABULARY``) so that one small
word-level tokenizer serves the whole suite.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

FAMILIES: tuple[str, ...] = ("recall", "math", "choice")
CHANCE: dict[str, float] = {"recall": 0.1, "math": 0.1, "choice": 0.25}

NAMES = ("ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou")
DIGITS = tuple(str(d) for d in range(10))
ANIMALS = ("cat", "dog", "cow", "pig", "hen", "fox", "owl", "rat")
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold")
LETTERS = ("A", "B", "C", "D")
SYMBOLS = ("+", "-", "=", ".", ",", "?")
KEYWORDS = ("answer", "hint", "=>") + FAMILIES
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCABULARY: tuple[str, ...] = SPECIAL_TOKENS + KEYWORDS + SYMBOLS + DIGITS + LETTERS + NAMES + ANIMALS + COLORS

SEPARATOR = "=>"  # ends every prompt; the model's solution follows it
ANSWER_WORD = "answer"

N_FACTS = 4  # entities per recall / choice context
N_OPERANDS = 3  # digits per math chain (two steps)

# Seeds of the three splits; the training stream of the zoo LMs uses yet another seed.
SPLIT_SEEDS: dict[str, int] = {"train": 1_000, "validation": 2_000, "test": 3_000}


@dataclass(frozen=True)
class Example:
    """One task instance. ``context`` is X without BOS; ``trace`` is the gold solution ending in ``answer A``."""

    family: str
    context: str
    answer: str
    trace: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def make_recall(rng: random.Random) -> Example:
    names = rng.sample(NAMES, N_FACTS)
    values = [rng.choice(DIGITS) for _ in names]
    facts = " , ".join(f"{n} {v}" for n, v in zip(names, values))
    i = rng.randrange(N_FACTS)
    context = f"recall {facts} . {names[i]} ?"
    # The trace restates the fact in the context's own "name value" form, so finding it is a plain copy.
    return Example("recall", context, values[i], f"{names[i]} {values[i]} . {ANSWER_WORD} {values[i]}")


def make_math(rng: random.Random) -> Example:
    return math_chain(rng, N_OPERANDS)


def math_chain(rng: random.Random, operands: int) -> Example:
    """A chain of ``operands`` digits joined by + / - modulo 10, solved step by step."""
    digits = [rng.randrange(10) for _ in range(operands)]
    ops = [rng.choice("+-") for _ in range(operands - 1)]
    context = "math " + " ".join(
        [str(digits[0])] + [f"{op} {d}" for op, d in zip(ops, digits[1:])]
    ) + " ?"
    steps, acc = [], digits[0]
    for op, d in zip(ops, digits[1:]):
        new = (acc + d) % 10 if op == "+" else (acc - d) % 10
        steps.append(f"{acc} {op} {d} = {new} .")
        acc = new
    return Example("math", context, str(acc), " ".join(steps) + f" {ANSWER_WORD} {acc}")


def make_choice(rng: random.Random) -> Example:
    animals = rng.sample(ANIMALS, N_FACTS)
    colors = rng.sample(COLORS, N_FACTS)
    passage = " , ".join(f"{a} {c}" for a, c in zip(animals, colors))
    i = rng.randrange(N_FACTS)
    distractors = rng.sample([c for c in COLORS if c != colors[i]], len(LETTERS) - 1)
    options = distractors + [colors[i]]
    rng.shuffle(options)
    letter = LETTERS[options.index(colors[i])]
    rendered = " , ".join(f"{o} {l}" for l, o in zip(LETTERS, options))
    context = f"choice {passage} . {rendered} . {animals[i]} ?"
    # The trace looks the animal up in the passage, then the colour among the options.
    return Example("choice", context, letter, f"{animals[i]} {colors[i]} . {colors[i]} {letter} . {ANSWER_WORD} {letter}")


MAKERS = {"recall": make_recall, "math": make_math, "choice": make_choice}


def sample_example(rng: random.Random, family: str | None = None) -> Example:
    """Draw one example, from ``family`` or from a uniformly chosen family."""
    family = family or rng.choice(FAMILIES)
    if family not in MAKERS:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    return MAKERS[family](rng)


def split_of(context: str) -> str:
    """The split a context belongs to, by hash: 10 % test, 10 % validation, 80 % train (disjoint by construction)."""
    bucket = int(hashlib.sha256(context.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def sample_in_split(rng: random.Random, split: str, family: str | None = None) -> Example:
    """Draw examples until one falls in ``split``'s hash partition."""
    while True:
        example = sample_example(rng, family)
        if split_of(example.context) == split:
            return example


def make_split(split: str, per_family: int) -> list[Example]:
    """A deterministic split: ``per_family`` examples of every family, interleaved family by family."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[split])
    return [sample_in_split(rng, split, family) for _ in range(per_family) for family in FAMILIES]


def split_fingerprint(examples: list[Example]) -> str:
    """sha256 over the examples' JSON, recorded in checkpoints so a run names the data it saw."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.to_json().encode())
    return digest.hexdigest()[:16]


# ---- prompt formats shared by the zoo LMs, trace generation and evaluation -------------------------


def prompt_with_input(example: Example) -> str:
    """What a model sees when it reads the input itself."""
    return f"{example.context} {SEPARATOR}"


def prompt_guided(example: Example) -> str:
    """Guided trace generation (appendix A): the input plus the gold answer."""
    return f"{example.context} hint {example.answer} {SEPARATOR}"


def prompt_duplicated(example: Example) -> str:
    """The input twice; what a context-aware receiver sees after a transferred cache of X."""
    return f"{example.context} {example.context} {SEPARATOR}"


def extract_answer(text: str) -> str | None:
    """The word after the last ``answer`` in generated text, or None when there is none."""
    words = text.split()
    for i in range(len(words) - 2, -1, -1):
        if words[i] == ANSWER_WORD:
            return words[i + 1]
    return None
