"""The embedded zoo: a deterministic suite, a heterogeneous pair that solves it, a committed adapter that works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densecomm_core.evaluation.accuracy import evaluate_with_input
from densecomm_core.zoo import tasks
from densecomm_core.zoo.pair import load_zoo_pair, zoo_adapter_dir, zoo_root


def test_splits_are_deterministic_and_disjoint():
    assert tasks.make_split("test", 20) == tasks.make_split("test", 20)
    test = {e.context for e in tasks.make_split("test", 100)}
    validation = {e.context for e in tasks.make_split("validation", 100)}
    train = {e.context for e in tasks.make_split("train", 300)}
    assert not (test & train) and not (validation & train) and not (test & validation)
    assert all(tasks.split_of(c) == "test" for c in test)


def test_every_family_is_present_and_answerable():
    examples = tasks.make_split("validation", 30)
    assert {e.family for e in examples} == set(tasks.FAMILIES)
    for e in examples:
        assert tasks.extract_answer(e.trace) == e.answer
        assert all(word in tasks.VOCABULARY for word in (e.context + " " + e.trace).split())


def test_math_traces_compute_mod_10():
    for e in tasks.make_split("test", 50):
        if e.family == "math":
            words = e.context.split()[1:-1]
            value = int(words[0])
            for op, digit in zip(words[1::2], words[2::2]):
                value = (value + int(digit)) % 10 if op == "+" else (value - int(digit)) % 10
            assert e.answer == str(value)


def test_extract_answer():
    assert tasks.extract_answer("bob = 3 . answer 3") == "3"
    assert tasks.extract_answer("answer 1 answer B") == "B"
    assert tasks.extract_answer("no final word answer") is None
    assert tasks.extract_answer("") is None


def test_unknown_family_and_split():
    import random

    with pytest.raises(ValueError, match="unknown task family"):
        tasks.sample_example(random.Random(0), "poetry")
    with pytest.raises(ValueError, match="unknown split"):
        tasks.make_split("dev", 1)


def test_zoo_pair_is_heterogeneous(zoo_pair):
    sender, receiver = zoo_pair
    s, r = sender.geometry, receiver.geometry
    assert s.model_type != r.model_type
    for field in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "rope"):
        assert getattr(s, field) != getattr(r, field), field
    assert sender.tokenizer.get_vocab() == receiver.tokenizer.get_vocab()


# Floors under the committed weights' measured test accuracy (100 per family: sender 100 / 100 / 94,
# receiver 100 / 100 / 100 on recall / math / choice), so a regression shows.
FLOORS = {"sender": {"recall": 0.95, "math": 0.95, "choice": 0.9}, "receiver": {"recall": 0.95, "math": 0.95, "choice": 0.95}}


@pytest.mark.parametrize("side", [0, 1], ids=["sender", "receiver"])
def test_zoo_models_answer_from_the_input(zoo_pair, side):
    accuracy = evaluate_with_input(zoo_pair[side].model, zoo_pair[side].tokenizer, tasks.make_split("test", 100))
    floors = FLOORS["sender" if side == 0 else "receiver"]
    for family, floor in floors.items():
        assert accuracy[family] >= floor, (family, accuracy)
        assert accuracy[family] >= 2 * tasks.CHANCE[family]


def test_committed_weights_record_their_recipe():
    for name in ("zoo-qwen3-sender", "zoo-llama-receiver"):
        recipe = json.loads((zoo_root() / name / "zoo_recipe.json").read_text())
        assert recipe["validation_accuracy"] == recipe["stages"][-1]["validation_accuracy"]
        assert [s["stage"] for s in recipe["stages"]][0] == 1 and recipe["steps"] == sum(s["steps"] for s in recipe["stages"])
        assert recipe["train"]["seed"] == 0
    config = json.loads((zoo_adapter_dir() / "adapter_config.json").read_text())
    assert config["expansion"] == 16
    # Trained by `densecomm train --config zoo`: the run config, data fingerprints and per-phase metrics.
    assert set(config["recipe"]) >= {"phase1", "phase2", "data", "workers", "seed"}
    assert config["recipe"]["data"]["source"] == "zoo" and config["recipe"]["workers"]["num_workers"] == 2
    assert config["data_fingerprint"].startswith("train:") and "/traces:" in config["data_fingerprint"]
    assert set(config["metrics"]["gates_by_phase"]) == {"phase1", "phase2"}
    gates = config["metrics"]["gates"]
    assert gates["gate_max"] - gates["gate_min"] > 0.1  # the gates learned (the first adapter's sat at 0.997-0.999)
    sender, receiver = load_zoo_pair()
    assert config["sender"]["fingerprint"] == sender.geometry.fingerprint()
    assert config["receiver"]["fingerprint"] == receiver.geometry.fingerprint()


# ---- zoo v2: the committed generalising pair -------------------------------------------------------------

# Floors under the committed v2 weights' measured test accuracy with the input (100 per family; sender 100
# everywhere but hops 59, receiver 100 everywhere but hops 69): both LMs know the OOD families.
V2_FLOORS = {"sender": {"recall": 0.95, "math": 0.95, "choice": 0.95, "compare": 0.95, "owner": 0.95},
             "receiver": {"recall": 0.95, "math": 0.95, "choice": 0.95, "compare": 0.95, "owner": 0.95}}


def test_zoo_v2_pair_is_heterogeneous_and_records_its_recipe():
    sender, receiver = load_zoo_pair(suite="v2")
    s, r = sender.geometry, receiver.geometry
    assert (s.model_type, s.num_layers, r.model_type, r.num_layers) == ("qwen3", 5, "llama", 3)
    for field in ("num_kv_heads", "head_dim", "hidden_size", "rope"):
        assert getattr(s, field) != getattr(r, field), field
    assert sender.tokenizer.get_vocab() == receiver.tokenizer.get_vocab()
    from dataclasses import asdict

    from densecomm_core.zoo.build import zoo_recipe

    for model, (spec, config), stages in zip((sender, receiver), zoo_recipe("v2"), ([1, 2], [1])):
        recipe = json.loads((Path(model.path) / "zoo_recipe.json").read_text())
        assert recipe["train"] == asdict(config) and recipe["spec"] == asdict(spec)  # what `zoo build --suite v2` runs
        assert recipe["train"]["suite"] == "v2" and recipe["train"]["p_message"] > 0 and recipe["train"]["seed"] == 0
        assert recipe["validation_accuracy"] == recipe["stages"][-1]["validation_accuracy"]
        assert [s["stage"] for s in recipe["stages"]] == stages  # the sender's warm restart is recorded


@pytest.mark.parametrize("side", [0, 1], ids=["sender", "receiver"])
def test_zoo_v2_models_answer_from_the_input_and_the_receiver_has_headroom_on_hops(side):
    from densecomm_core.zoo.suite import get_suite

    model = load_zoo_pair(suite="v2")[side]
    accuracy = evaluate_with_input(model.model, model.tokenizer, get_suite("v2").make_split("test", 50))
    for family, floor in V2_FLOORS["sender" if side == 0 else "receiver"].items():
        assert accuracy[family] >= floor, (family, accuracy)
    assert 0.2 < accuracy["hops"] < 0.85, accuracy  # learned beyond chance (10 %), clearly below 100: headroom
