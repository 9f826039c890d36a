"""Task suites of the zoo by name: ``v1`` (the committed zoo's three fixed-layout families) and ``v2``.

    get_suite(name)                          the TaskSuite registered under ``name`` ("v1", "v2")
    suite.family_names / in_domain / out_of_domain / chance
    suite.sample_example(rng, family=None)   one example (a uniformly drawn family when None)
    suite.sample_in_split(rng, split, ...)   draw until the example hashes into ``split``
    suite.make_split(split, per_family, families=None)   a deterministic split, families interleaved
    suite.adapter_split(split, per_family)   the same over in-domain families only: what adapters train on
    suite.prompt_format                      the relay's prompt layouts for the suite's LMs (T2T's differ in v2)

``v1`` is a view of ``tasks.py``: the same makers, vocabulary and split seeds drawn in the same order, so
its splits and the zoo LMs' training stream are byte-identical to ``tasks.make_split`` /
``tasks.sample_in_split``. Splits of every suite use ``tasks.split_of`` (a hash of the context), so a
context is in the same split in every suite and train / validation / test stay disjoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from densecomm_core.relay import PromptFormat
from densecomm_core.zoo import tasks, tasks_v2
from densecomm_core.zoo.tasks import Example, split_of


@dataclass(frozen=True)
class TaskFamily:
    """One family of a suite: how to draw an example, how often a guess is right, where it is used."""

    name: str
    make: Callable[[random.Random], Example]
    chance: float  # accuracy of a uniform guess, averaged over the family's sizes
    out_of_domain: bool = False  # held out from adapter training; evaluated as OOD
    multiple_choice: bool = False  # the answer is an option letter


@dataclass(frozen=True)
class TaskSuite:
    """A named set of task families with its vocabulary and split seeds."""

    name: str
    families: tuple[TaskFamily, ...]
    vocabulary: tuple[str, ...]
    split_seeds: Mapping[str, int]
    prompt_format: PromptFormat = PromptFormat()

    @property
    def family_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.families)

    @property
    def in_domain(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.families if not f.out_of_domain)

    @property
    def out_of_domain(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.families if f.out_of_domain)

    @property
    def chance(self) -> dict[str, float]:
        return {f.name: f.chance for f in self.families}

    def family(self, name: str) -> TaskFamily:
        for f in self.families:
            if f.name == name:
                return f
        raise ValueError(f"unknown task family {name!r} in suite {self.name!r}; expected one of {self.family_names}")

    def sample_example(self, rng: random.Random, family: str | None = None) -> Example:
        """Draw one example, from ``family`` or from a uniformly chosen family (OOD ones included)."""
        return self.family(family or rng.choice(self.family_names)).make(rng)

    def sample_in_split(self, rng: random.Random, split: str, family: str | None = None) -> Example:
        """Draw examples until one falls in ``split``'s hash partition."""
        self._check_split(split)
        while True:
            example = self.sample_example(rng, family)
            if split_of(example.context) == split:
                return example

    def make_split(self, split: str, per_family: int, families: Sequence[str] | None = None) -> list[Example]:
        """``per_family`` examples of each of ``families`` (default: all), interleaved family by family."""
        self._check_split(split)
        names = tuple(families) if families is not None else self.family_names
        for name in names:
            self.family(name)
        rng = random.Random(self.split_seeds[split])
        return [self.sample_in_split(rng, split, name) for _ in range(per_family) for name in names]

    def adapter_split(self, split: str, per_family: int) -> list[Example]:
        """The in-domain families only: adapter training and in-domain evaluation never see OOD families."""
        return self.make_split(split, per_family, self.in_domain)

    def _check_split(self, split: str) -> None:
        if split not in self.split_seeds:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(self.split_seeds)}")


V1 = TaskSuite(
    "v1",
    tuple(TaskFamily(name, tasks.MAKERS[name], tasks.CHANCE[name], multiple_choice=name == "choice") for name in tasks.FAMILIES),
    tasks.VOCABULARY,
    tasks.SPLIT_SEEDS,
)

V2 = TaskSuite(
    "v2",
    tuple(
        TaskFamily(name, tasks_v2.MAKERS_V2[name], tasks_v2.CHANCE_V2[name], name in tasks_v2.OUT_OF_DOMAIN,
                   name in tasks_v2.MULTIPLE_CHOICE_V2)
        for name in tasks_v2.IN_DOMAIN + tasks_v2.OUT_OF_DOMAIN
    ),
    tasks_v2.VOCABULARY_V2,
    tasks.SPLIT_SEEDS,
    PromptFormat(t2t_aware=tasks_v2.MESSAGE_AWARE, t2t_unaware=tasks_v2.MESSAGE_UNAWARE),  # what v2's LMs read
)

SUITES: dict[str, TaskSuite] = {"v1": V1, "v2": V2}


def get_suite(name: str) -> TaskSuite:
    if name not in SUITES:
        raise ValueError(f"unknown task suite {name!r}; expected one of {tuple(SUITES)}")
    return SUITES[name]
