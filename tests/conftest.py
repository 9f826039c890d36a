"""Shared fixtures: tiny random heterogeneous pairs (fast) and the committed zoo pair (trained)."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.models import LoadedModel, wrap_model
from densecomm_core.zoo.build import ZooModelSpec, build_model
from densecomm_core.zoo.tokenizer import build_tokenizer

# Tiny stand-ins keeping the depth and head layout of real checkpoints (head dim and width shrunk).
QWEN3_LAYOUTS = {
    "qwen3-4b": ZooModelSpec("tiny-qwen3-4b", "qwen3", 64, 36, 32, 8, 8, 64, 1_000_000.0),
    "qwen3-8b": ZooModelSpec("tiny-qwen3-8b", "qwen3", 96, 36, 32, 8, 8, 64, 1_000_000.0),
    "qwen3-14b": ZooModelSpec("tiny-qwen3-14b", "qwen3", 80, 40, 40, 8, 8, 64, 1_000_000.0),
}
TINY_SENDER = ZooModelSpec("tiny-sender", "qwen3", 32, 3, 4, 2, 8, 64, 10_000.0)
TINY_RECEIVER = ZooModelSpec("tiny-receiver", "llama", 24, 2, 6, 3, 4, 48, 50_000.0)


def tiny_model(spec: ZooModelSpec, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return wrap_model(model, tokenizer, path=spec.name)


@pytest.fixture(scope="session")
def qwen3_models() -> dict[str, LoadedModel]:
    """One tiny random model per Qwen3 layout of ``QWEN3_LAYOUTS`` (real layer / head layout, tiny width)."""
    return {name: tiny_model(spec, seed=i) for i, (name, spec) in enumerate(QWEN3_LAYOUTS.items())}


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[LoadedModel, LoadedModel]:
    return tiny_model(TINY_SENDER, 1), tiny_model(TINY_RECEIVER, 2)


@pytest.fixture(scope="session")
def zoo_pair() -> tuple[LoadedModel, LoadedModel]:
    from densecomm_core.zoo.pair import load_zoo_pair

    return load_zoo_pair()


@pytest.fixture(scope="session")
def zoo_adapter(zoo_pair):
    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.zoo.pair import zoo_adapter_dir

    sender, receiver = zoo_pair
    return DenseAdapter.load(zoo_adapter_dir(), sender.geometry, receiver.geometry)
