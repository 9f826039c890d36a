"""The embedded default pair: where its committed weights live, how its adapter is trained, how it is scored.

    zoo_root()                      directory of the committed zoo weights (inside the package)
    zoo_model_dirs(root, suite)     the sender's and receiver's directories of a suite's pair (default: v1, committed)
    load_zoo_pair(root, suite)      (sender, receiver) LoadedModels from there
    (its adapter is trained by `densecomm train --config zoo`: services/train/zoo.toml)
    evaluate_pair(...)              the demo's table: baselines and both dense regimes on the test split
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.evaluation.accuracy import accuracy_by_family
from densecomm_core.generation import GenerationConfig
from densecomm_core.models import LoadedModel, load_model
from densecomm_core.relay import (
    ContextMode,
    DenseRelay,
    RelayOutput,
    answer_with_input,
    answer_without_input,
)
from densecomm_core.zoo import tasks
from densecomm_core.zoo.build import zoo_recipe
from densecomm_core.zoo.suite import get_suite

log = logging.getLogger(__name__)

GREEDY = GenerationConfig(max_new_tokens=24)
ANSWER_TEMPLATE = f"{tasks.ANSWER_WORD} {{answer}}"  # the zoo's canonical final answer statement
BASIS_CALIBRATION_PER_FAMILY = 300  # train-split contexts per family the pca codec's bases are fitted on


def zoo_root() -> Path:
    return Path(__file__).resolve().parent / "weights"


def _pair_name(suite: str) -> str:
    (sender_spec, _), (receiver_spec, _) = zoo_recipe(suite)
    return f"{sender_spec.name}-to-{receiver_spec.name}"


def zoo_adapter_dir(root: Path | None = None, suite: str = "v1") -> Path:
    """The committed adapter of ``suite``'s zoo pair."""
    return (root or zoo_root()) / f"adapter-{_pair_name(suite)}"


def zoo_c2c_dir(root: Path | None = None, suite: str = "v1") -> Path:
    """The committed C2C-style fuser of ``suite``'s zoo pair (``densecomm baseline c2c``; a baseline, not served)."""
    return (root or zoo_root()) / f"c2c-{_pair_name(suite)}"


def zoo_model_dirs(root: Path | None = None, suite: str = "v1") -> tuple[Path, Path]:
    """(sender directory, receiver directory) of ``suite``'s pair under ``root`` (default: the committed weights)."""
    root = root or zoo_root()
    (sender_spec, _), (receiver_spec, _) = zoo_recipe(suite)
    return root / sender_spec.name, root / receiver_spec.name


def load_zoo_pair(root: Path | None = None, suite: str = "v1") -> tuple[LoadedModel, LoadedModel]:
    """``suite``'s pair under ``root`` (default: the committed weights)."""
    sender_dir, receiver_dir = zoo_model_dirs(root, suite)
    return load_model(sender_dir, dtype=torch.float32), load_model(receiver_dir, dtype=torch.float32)


def batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def relay_accuracy(relay: DenseRelay, examples: list[tasks.Example], mode: ContextMode, batch_size: int = 128) -> tuple[dict[str, float], list[RelayOutput]]:
    outputs = [relay.run([e.context for e in chunk], mode, GREEDY) for chunk in batched(examples, batch_size)]
    return accuracy_by_family(examples, [t for o in outputs for t in o.texts]), outputs


def fit_zoo_bases(sender: LoadedModel, receiver: LoadedModel, adapter: DenseAdapter | None = None, suite: str = "v1"):
    """The pca codec's KV bases of the sender's space (and, with ``adapter``, of the receiver space it
    writes), fitted on train-split contexts of ``suite``'s in-domain families: (sender basis,
    receiver-space basis or None). v1's are exactly ``tasks.make_split("train", 300)``."""
    from densecomm_core.codec.calibrate import calibrate

    texts = [e.context for e in get_suite(suite).adapter_split("train", BASIS_CALIBRATION_PER_FAMILY)]
    return calibrate(sender, texts, adapter, receiver if adapter is not None else None)


def save_zoo_bases(sender: LoadedModel, receiver: LoadedModel, adapter: DenseAdapter, adapter_dir: Path) -> None:
    """Fit both bases and write them beside the sender's weights and the adapter's."""
    from densecomm_core.codec.transform import BASIS_FILE

    sender_basis, receiver_basis = fit_zoo_bases(sender, receiver, adapter)
    sender_basis.save(Path(sender.path) / BASIS_FILE)
    receiver_basis.save(Path(adapter_dir) / BASIS_FILE)


@dataclass
class TableRow:
    method: str
    accuracy: dict[str, float]
    payload_bytes_per_request: float = 0.0  # raw KV bytes handed to the receiver (valid tokens)
    flops_per_request: float = 0.0
    texts: list[str] = field(default_factory=list, repr=False)
    wire_bytes_per_request: float = 0.0  # bytes on the wire, when the row went through the services

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


def evaluate_pair(
    sender: LoadedModel, receiver: LoadedModel, adapter: DenseAdapter, per_family: int = 200, batch_size: int = 128,
    suite: str = "v1",
) -> list[TableRow]:
    """Every method of the demo's table on ``per_family`` test examples of each family of ``suite``."""
    zoo = get_suite(suite)
    examples = zoo.make_split("test", per_family)
    contexts = [e.context for e in examples]
    n = len(examples)
    fmt = zoo.prompt_format
    relay = DenseRelay(sender, receiver, adapter, fmt)
    rows: list[TableRow] = []

    def add(method: str, outputs: list[RelayOutput], flops_fn) -> None:
        texts = [t for o in outputs for t in o.texts]
        payload = sum(o.payload_bytes for o in outputs) / n
        rows.append(TableRow(method, accuracy_by_family(examples, texts), payload, sum(flops_fn(o) for o in outputs) / n, texts))

    n_s, n_r = sender.non_embedding_params, receiver.non_embedding_params

    def alone(params: int):
        """FLOPs of one model answering by itself (its tokens are counted on the answering side)."""
        return lambda o: 2 * params * (o.counts.receiver_prefill + o.counts.receiver_decode)

    add("sender with input", [answer_with_input(sender, c, GREEDY, fmt) for c in batched(contexts, batch_size)], alone(n_s))
    add("receiver with input", [answer_with_input(receiver, c, GREEDY, fmt) for c in batched(contexts, batch_size)], alone(n_r))
    add("receiver without input", [answer_without_input(receiver, len(c), GREEDY, fmt) for c in batched(contexts, batch_size)], alone(n_r))
    adapter_flops = adapter.num_flops_per_token()
    for mode in (ContextMode.AWARE, ContextMode.UNAWARE):
        outputs = [relay.run(c, mode, GREEDY) for c in batched(contexts, batch_size)]
        add(f"dense context-{mode.value}", outputs, lambda o: o.counts.flops(n_s, n_r, adapter_flops)["total"])
    return rows
