"""The zoo v2 task families: variable sizes, distractor facts, a multi-hop family and two out-of-domain families.

v1 (``tasks.py``) has one layout per family, so its LMs learned layouts instead of skills. Every v2 family
draws its size per example, uniformly from the range in ``SIZES``:

In-domain (the adapter trains on these; the LMs too):
- ``recall``: 2-6 entity -> digit facts and 0-2 distractor animal -> colour facts, shuffled together; the
  question names one entity (chance 10 %). Trace as in v1: ``name v . answer v``.
- ``math``:   a chain of 2-4 digits joined by + / - modulo 10, worked step by step (chance 10 %).
- ``choice``: 2-6 animal -> colour facts and 0-2 distractor entity -> digit facts, 3-5 lettered options
  (``A`` .. ``E``) and a question (chance 1/options, 26 % on average).
- ``hops``:   a chain of 1-3 facts ``ann bob , bob cal , cal 7`` and 1-2 other chains of 1-3 facts, each
  ending at a digit, all facts shuffled; the question names the first chain's head, the answer is the
  digit at its end. The trace is the answer alone
  (``answer 7``): following h hops happens inside the forward pass, so it needs about h + 1 layers
  (one to bind each fact's key to its value, one per hop). This is the headroom family, designed so that
  a shallow receiver cannot follow three hops and a deeper sender can (measured on the committed build:
  the receiver does have headroom, 69 %, but the sender is weaker, 59 %; chance 10 %, the no-input floor; a reader that
  only learned "answer with the end of some chain" scores about 42 %, (1/2 + 1/3) / 2, as 400-step smoke
  LMs do).

Out-of-domain (held out from adapter training, learned by the LMs; the analogue of the paper's
MMLU-Redux / MedQA / OpenBookQA):
- ``compare``: 2-4 entities with distinct digits and ``max ?`` or ``min ?``; the answer is the entity
  (chance 1/entities, 36 % on average). Trace: ``bob 7 . answer bob``.
- ``owner``:   2-5 entity -> animal facts and an animal; the answer is its owner, a lookup in the reverse
  direction of every in-domain family (chance 1/facts, 32 % on average). Trace: ``bob dog . answer bob``.

The vocabulary is v1's plus ``NEW_WORDS`` appended, so v1 token ids are unchanged and v2 LMs still
share one word-level tokenizer.

T2T, the text baseline, needs a receiver that reads another agent's message. v1's LMs never saw one; v2's
train on message documents too (``ZooTrainConfig.p_message``): the context and a written trace after the
word ``note`` (``MESSAGE_AWARE``), or the note alone (``MESSAGE_UNAWARE``), then the solution. The same two
layouts are the v2 suite's T2T prompts (``suite.prompt_format``), so training and evaluation share them.
"""

from __future__ import annotations

import random

from densecomm_core.zoo.tasks import (
    ANIMALS,
    ANSWER_WORD,
    COLORS,
    DIGITS,
    LETTERS,
    NAMES,
    SEPARATOR,
    VOCABULARY,
    Example,
    math_chain,
)

LETTERS_V2: tuple[str, ...] = LETTERS + ("E",)
MESSAGE_WORD = "note"  # introduces another agent's written message (T2T)
NEW_WORDS: tuple[str, ...] = ("E", "hops", "compare", "owner", "max", "min", MESSAGE_WORD)
VOCABULARY_V2: tuple[str, ...] = VOCABULARY + NEW_WORDS

MESSAGE_AWARE = f"{{context}} {MESSAGE_WORD} {{message}} {SEPARATOR}"  # T2T context-aware: X, then the sender's message
MESSAGE_UNAWARE = f"{MESSAGE_WORD} {{message}} {SEPARATOR}"  # T2T context-unaware: the message alone

# Inclusive (low, high) ranges each example's sizes are drawn from, uniformly.
SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "recall": {"facts": (2, 6), "distractors": (0, 2)},
    "math": {"operands": (2, 4)},
    "choice": {"facts": (2, 6), "distractors": (0, 2), "options": (3, 5)},
    "hops": {"hops": (1, 3), "other_chains": (1, 2)},
    "compare": {"entities": (2, 4)},
    "owner": {"facts": (2, 5)},
}


def _size(rng: random.Random, family: str, what: str) -> int:
    low, high = SIZES[family][what]
    return rng.randint(low, high)


def _mean_inverse(low: int, high: int) -> float:
    """Chance of a uniform guess among n options, n uniform in [low, high]."""
    return sum(1 / n for n in range(low, high + 1)) / (high - low + 1)


CHANCE_V2: dict[str, float] = {
    "recall": 0.1,
    "math": 0.1,
    "choice": _mean_inverse(*SIZES["choice"]["options"]),
    "hops": 0.1,
    "compare": _mean_inverse(*SIZES["compare"]["entities"]),
    "owner": _mean_inverse(*SIZES["owner"]["facts"]),
}


def _interleave(rng: random.Random, facts: list[str], distractors: list[str]) -> str:
    """The facts with the distractors inserted at random places; the facts keep their relative order."""
    merged = list(facts)
    for d in distractors:
        merged.insert(rng.randrange(len(merged) + 1), d)
    return " , ".join(merged)


def make_recall(rng: random.Random) -> Example:
    n = _size(rng, "recall", "facts")
    names = rng.sample(NAMES, n)
    values = [rng.choice(DIGITS) for _ in names]
    animals = rng.sample(ANIMALS, _size(rng, "recall", "distractors"))
    distractors = [f"{a} {rng.choice(COLORS)}" for a in animals]
    facts = _interleave(rng, [f"{k} {v}" for k, v in zip(names, values)], distractors)
    i = rng.randrange(n)
    return Example("recall", f"recall {facts} . {names[i]} ?", values[i], f"{names[i]} {values[i]} . {ANSWER_WORD} {values[i]}")


def make_math(rng: random.Random) -> Example:
    return math_chain(rng, _size(rng, "math", "operands"))


def make_choice(rng: random.Random) -> Example:
    n = _size(rng, "choice", "facts")
    animals = rng.sample(ANIMALS, n)
    colors = rng.sample(COLORS, n)
    names = rng.sample(NAMES, _size(rng, "choice", "distractors"))
    passage = _interleave(rng, [f"{a} {c}" for a, c in zip(animals, colors)], [f"{k} {rng.choice(DIGITS)}" for k in names])
    i = rng.randrange(n)
    letters = LETTERS_V2[: _size(rng, "choice", "options")]
    options = rng.sample([c for c in COLORS if c != colors[i]], len(letters) - 1) + [colors[i]]
    rng.shuffle(options)
    letter = letters[options.index(colors[i])]
    rendered = " , ".join(f"{o} {l}" for l, o in zip(letters, options))
    context = f"choice {passage} . {rendered} . {animals[i]} ?"
    return Example("choice", context, letter, f"{animals[i]} {colors[i]} . {colors[i]} {letter} . {ANSWER_WORD} {letter}")


def make_hops(rng: random.Random) -> Example:
    lengths = [_size(rng, "hops", "hops") for _ in range(1 + _size(rng, "hops", "other_chains"))]
    keys = rng.sample(NAMES, sum(lengths))  # every fact has its own key: a lookup is never ambiguous
    facts, heads, ends = [], [], []
    for length in lengths:  # disjoint chains, each ending at a digit: "the digit in the text" is no shortcut
        chain, keys = keys[:length], keys[length:]
        ends.append(rng.choice(DIGITS))
        heads.append(chain[0])
        facts += [f"{a} {b}" for a, b in zip(chain, chain[1:] + [ends[-1]])]
    rng.shuffle(facts)
    return Example("hops", f"hops {' , '.join(facts)} . {heads[0]} ?", ends[0], f"{ANSWER_WORD} {ends[0]}")


def make_compare(rng: random.Random) -> Example:
    n = _size(rng, "compare", "entities")
    names = rng.sample(NAMES, n)
    values = rng.sample(range(10), n)  # distinct: never a tie
    ask = rng.choice(("max", "min"))
    best = values.index(max(values) if ask == "max" else min(values))
    listing = " , ".join(f"{k} {v}" for k, v in zip(names, values))
    return Example("compare", f"compare {listing} . {ask} ?", names[best], f"{names[best]} {values[best]} . {ANSWER_WORD} {names[best]}")


def make_owner(rng: random.Random) -> Example:
    n = _size(rng, "owner", "facts")
    names = rng.sample(NAMES, n)
    animals = rng.sample(ANIMALS, n)
    i = rng.randrange(n)
    listing = " , ".join(f"{k} {a}" for k, a in zip(names, animals))
    return Example("owner", f"owner {listing} . {animals[i]} ?", names[i], f"{names[i]} {animals[i]} . {ANSWER_WORD} {names[i]}")


IN_DOMAIN: tuple[str, ...] = ("recall", "math", "choice", "hops")
OUT_OF_DOMAIN: tuple[str, ...] = ("compare", "owner")
MAKERS_V2 = {"recall": make_recall, "math": make_math, "choice": make_choice, "hops": make_hops,
             "compare": make_compare, "owner": make_owner}
MULTIPLE_CHOICE_V2: frozenset[str] = frozenset({"choice"})  # answered by an option letter
