"""The C2C-style fuser: layouts, the closed gate, checkpoints, training on the zoo, token counts of c2c_run."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from densecomm_core.baselines.c2c import CONFIG_FILE, C2CConfig, C2CFuser, c2c_run, fuse_caches
from densecomm_core.baselines.c2c_training import C2CTrainConfig, c2c_batch, c2c_generation_loss, train_c2c
from densecomm_core.errors import CacheLayoutError, CheckpointError, GeometryMismatchError
from densecomm_core.generation import GenerationConfig, forward_after_cache
from densecomm_core.relay import ContextMode, encode, sender_prefill
from densecomm_core.training.traces import TraceRecord
from densecomm_core.zoo import tasks
from tests.conftest import QWEN3_LAYOUTS

CONTEXTS = ["math 1 + 2 ?", "recall ann 3 , bob 4 . ann ?", "choice cat red . red A , blue B . cat ?"]


def open_all(fuser: C2CFuser) -> C2CFuser:
    """Every inference gate open (logit > 0)."""
    with torch.no_grad():
        fuser.gate_logit.fill_(1.0)
    return fuser.eval()


@pytest.mark.parametrize("src, dst", list(itertools.permutations(QWEN3_LAYOUTS, 2)))
def test_shapes_across_qwen3_layouts(qwen3_models, src, dst):
    """Every direction of {4B, 8B, 14B} layouts: the fused cache has the receiver's layout and can be attended to."""
    sender, receiver = qwen3_models[src], qwen3_models[dst]
    fuser = open_all(C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=16)))
    contexts = CONTEXTS[:2]
    own = sender_prefill(receiver, contexts)
    fused = fuse_caches(fuser, sender_prefill(sender, contexts), own, sender, receiver)
    g = receiver.geometry
    assert fused.num_layers == g.num_layers and fused.rope_applied
    assert all(k.shape == v.shape == own.keys[0].shape == (2, g.num_kv_heads, own.num_tokens, g.head_dim)
               for k, v in zip(fused.keys, fused.values))
    assert not torch.equal(fused.keys[0], own.keys[0])
    ids, mask = encode(receiver.tokenizer, ["=>", "=>"], "left", add_special_tokens=False)
    logits, _ = forward_after_cache(receiver.model, ids, mask, fused.to_dynamic_cache(), fused.mask)
    assert logits.shape == (2, 1, len(receiver.tokenizer)) and torch.isfinite(logits).all()


def test_closed_gate_leaves_the_receivers_cache_unchanged_exactly(tiny_pair):
    sender, receiver = tiny_pair
    fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=16)).eval()  # logits start at 0: closed
    source, own = sender_prefill(sender, CONTEXTS), sender_prefill(receiver, CONTEXTS)
    assert not fuser.open_gates.any()
    fused = fuse_caches(fuser, source, own, sender, receiver)
    assert all(torch.equal(a, b) for a, b in zip(fused.keys + fused.values, own.keys + own.values))
    # One layer's key gate open: only that layer's keys change, and only on real tokens.
    with torch.no_grad():
        fuser.gate_logit[0, 1] = 2.0
    fused = fuse_caches(fuser, source, own, sender, receiver)
    for layer in range(receiver.geometry.num_layers):
        assert torch.equal(fused.values[layer], own.values[layer])
        changed = (fused.keys[layer] != own.keys[layer]).any(dim=(1, 3))  # (B, T)
        assert bool(changed.any()) == (layer == 1)
        assert not (changed & ~own.mask).any()
    # The context-unaware base (no own cache) stays all zeros behind a closed gate.
    with torch.no_grad():
        fuser.gate_logit.fill_(-1.0)
    blind = fuse_caches(fuser, source, None, sender, receiver)
    assert all(not k.any() and not v.any() for k, v in zip(blind.keys, blind.values))


def test_refuses_caches_of_different_tokens(tiny_pair):
    sender, receiver = tiny_pair
    fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=8))
    with pytest.raises(CacheLayoutError, match="same tokens"):
        fuse_caches(fuser, sender_prefill(sender, CONTEXTS[:2]), sender_prefill(receiver, CONTEXTS[1:]), sender, receiver)
    with pytest.raises(GeometryMismatchError):
        fuse_caches(fuser, sender_prefill(sender, CONTEXTS), None, receiver, receiver)


def test_save_load_round_trip_and_wrong_pair(tmp_path, tiny_pair):
    sender, receiver = tiny_pair
    fuser = open_all(C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=8, recipe={"c2c": {"steps": 3}})))
    fuser.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["sender"]["fingerprint"] == sender.geometry.fingerprint() and saved["recipe"] == {"c2c": {"steps": 3}}
    loaded = C2CFuser.load(tmp_path, sender.geometry, receiver.geometry)
    assert not loaded.training
    for (name, a), (_, b) in zip(fuser.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    source, own = sender_prefill(sender, CONTEXTS), sender_prefill(receiver, CONTEXTS)
    a, b = fuse_caches(fuser, source, own, sender, receiver), fuse_caches(loaded, source, own, sender, receiver)
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    with pytest.raises(GeometryMismatchError) as info:
        C2CFuser.load(tmp_path, receiver.geometry, receiver.geometry)
    assert sender.geometry.fingerprint() in str(info.value) and receiver.geometry.fingerprint() in str(info.value)
    with pytest.raises(CheckpointError, match="not a C2C fuser checkpoint"):
        C2CFuser.load(tmp_path / "missing")
    saved["kind"] = "dense-adapter"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="kind"):
        C2CFuser.load(tmp_path)


@pytest.mark.parametrize("mode", list(ContextMode))
def test_c2c_run_counts_and_batching(tiny_pair, mode):
    """S_dec = 0; R_pre = the receiver's own prefill of X (aware only) + its prompt; batched = one at a time."""
    sender, receiver = tiny_pair
    fuser = open_all(C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=8)))
    config = GenerationConfig(max_new_tokens=5)
    out = c2c_run(sender, receiver, fuser, CONTEXTS, mode, config)
    tok = receiver.tokenizer
    x_tokens = sum(len(tok(c)["input_ids"]) for c in CONTEXTS)  # with BOS, as both models prefill X
    prompt = "{c} =>" if mode is ContextMode.AWARE else "=>"
    prompt_tokens = sum(len(tok(prompt.format(c=c), add_special_tokens=False)["input_ids"]) for c in CONTEXTS)
    assert out.counts.sender_prefill == x_tokens and out.counts.sender_decode == 0
    assert out.counts.receiver_prefill == prompt_tokens + (x_tokens if mode is ContextMode.AWARE else 0)
    assert out.counts.receiver_decode == int(out.lengths.sum()) > 0
    g = sender.geometry
    assert out.payload_bytes == x_tokens * g.num_layers * 2 * g.num_kv_heads * g.head_dim * 4
    singles = [c2c_run(sender, receiver, fuser, [c], mode, config) for c in CONTEXTS]
    assert out.texts == [s.texts[0] for s in singles]
    assert out.counts.receiver_prefill == sum(s.counts.receiver_prefill for s in singles)


def test_a_few_steps_lower_the_generation_loss_on_the_zoo(zoo_pair):
    sender, receiver = zoo_pair
    examples = tasks.make_split("train", 8)
    records = [TraceRecord(e.context, e.answer, e.trace, e.family) for e in examples]
    torch.manual_seed(0)
    fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=32))
    config = C2CTrainConfig(steps=12, batch_size=12, lr=3e-3, warmup_steps=2, p_aware=0.5, eval_every=12)
    fixed, modes = c2c_batch(records, C2CTrainConfig(batch_size=24, p_aware=0.5, seed=7), 0)
    assert {m for m in modes} == set(ContextMode)

    def loss(train: bool) -> float:
        """The loss of the fixed batch: with training's Gumbel gates at temperature 1 and fixed noise, or hard gates."""
        fuser.train(train)
        fuser.temperature = 1.0
        torch.manual_seed(1)
        with torch.no_grad():
            return float(c2c_generation_loss(fuser, sender, receiver, fixed, modes))

    before = loss(train=True)
    history = train_c2c(fuser, sender, receiver, records, config)
    after = loss(train=True)
    assert history[-1]["step"] == 12 and fuser.config.recipe["c2c"]["steps"] == 12
    assert after < before - 0.05, (before, after)
    assert torch.isfinite(torch.tensor(loss(train=False)))


def test_zoo_traces_are_built_or_read_and_never_from_held_out_questions(tmp_path, zoo_pair):
    from densecomm_core.baselines.c2c_training import zoo_trace_records
    from densecomm_core.training.traces import TraceFileError, save_traces

    _, receiver = zoo_pair
    built = zoo_trace_records(receiver, None, per_family=2)  # guided decoding by the receiver itself
    train = {e.context for e in tasks.make_split("train", 2)}
    assert built and {r.context for r in built} <= train and all(r.trace.split()[-2] == "answer" for r in built)
    save_traces(built, tmp_path / "traces.jsonl")
    assert zoo_trace_records(receiver, tmp_path / "traces.jsonl", per_family=2) == built
    held_out = tasks.make_split("test", 1)[0]
    save_traces([*built, TraceRecord(held_out.context, held_out.answer, held_out.trace, held_out.family)], tmp_path / "bad.jsonl")
    with pytest.raises(TraceFileError, match="not zoo train-split"):
        zoo_trace_records(receiver, tmp_path / "bad.jsonl", per_family=2)
