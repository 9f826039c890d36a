"""Both training phases reduce their loss on a tiny problem; checkpoints resume exactly."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.errors import CheckpointError
from densecomm_core.relay import ContextMode, PromptFormat
from densecomm_core.training.phase1 import Phase1Config, batch_loss, train_phase1
from densecomm_core.training.phase2 import Phase2Config, generation_loss, train_phase2
from densecomm_core.training.traces import TraceRecord
from densecomm_core.zoo import tasks

EXAMPLES = tasks.make_split("train", 24)
CONTEXTS = [e.context for e in EXAMPLES]


def fresh_adapter(pair, seed=0):
    torch.manual_seed(seed)
    sender, receiver = pair
    return DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=4))


def test_phase1_reduces_reconstruction_loss(tiny_pair):
    sender, receiver = tiny_pair
    adapter = fresh_adapter(tiny_pair)
    validation = CONTEXTS[:16]
    with torch.no_grad():
        before = batch_loss(adapter, sender, receiver, validation).item()
    history = train_phase1(adapter, sender, receiver, CONTEXTS[16:], Phase1Config(steps=60, batch_size=8, lr=3e-3, eval_every=20),
                           validation_contexts=validation, progress=False)
    assert [h["step"] for h in history] == [20, 40, 60]
    assert history[-1]["validation_loss"] < 0.5 * before


def test_phase2_reduces_generation_loss(zoo_pair):
    """Through the trained zoo receiver (a random tiny receiver barely reads its cache)."""
    sender, receiver = zoo_pair
    adapter = fresh_adapter(zoo_pair)
    records = [TraceRecord(e.context, e.answer, e.trace, e.family) for e in EXAMPLES[:8]]
    modes = [ContextMode.UNAWARE] * 4 + [ContextMode.AWARE] * 4
    with torch.no_grad():
        before = generation_loss(adapter, sender, receiver, records, modes, PromptFormat()).item()
    train_phase2(adapter, sender, receiver, records, Phase2Config(steps=40, batch_size=8, lr=3e-3, eval_every=40), progress=False)
    with torch.no_grad():
        after = generation_loss(adapter, sender, receiver, records, modes, PromptFormat()).item()
    assert after < 0.8 * before


def test_phase2_gradients_reach_every_used_parameter(tiny_pair):
    sender, receiver = tiny_pair
    adapter = fresh_adapter(tiny_pair)
    records = [TraceRecord(e.context, e.answer, e.trace) for e in EXAMPLES[:4]]
    generation_loss(adapter, sender, receiver, records, [ContextMode.UNAWARE, ContextMode.AWARE] * 2, PromptFormat()).backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.grad is not None for p in receiver.model.parameters())


class Interrupt(Exception):
    pass


def test_phase1_resume_matches_an_uninterrupted_run(tmp_path, tiny_pair):
    sender, receiver = tiny_pair
    config = Phase1Config(steps=20, batch_size=4, lr=1e-3, eval_every=10)
    straight = fresh_adapter(tiny_pair)
    train_phase1(straight, sender, receiver, CONTEXTS, config, progress=False)

    checkpoint = tmp_path / "phase1.pt"
    interrupted = fresh_adapter(tiny_pair)

    def stop_at_10(step, record):
        if step == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_phase1(interrupted, sender, receiver, CONTEXTS, config, checkpoint=checkpoint, progress=False, on_eval=stop_at_10)
    resumed = fresh_adapter(tiny_pair, seed=123)  # different init: everything must come from the checkpoint
    history = train_phase1(resumed, sender, receiver, CONTEXTS, config, checkpoint=checkpoint, resume=True, progress=False)
    assert [h["step"] for h in history] == [10, 20]  # the loss curve continues from the checkpoint
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_from_the_other_phase_is_refused(tmp_path, tiny_pair):
    sender, receiver = tiny_pair
    checkpoint = tmp_path / "ckpt.pt"
    train_phase1(fresh_adapter(tiny_pair), sender, receiver, CONTEXTS, Phase1Config(steps=2, batch_size=2, eval_every=2),
                 checkpoint=checkpoint, progress=False)
    records = [TraceRecord(e.context, e.answer, e.trace) for e in EXAMPLES[:4]]
    with pytest.raises(CheckpointError, match="phase 'phase1', expected 'phase2'"):
        train_phase2(fresh_adapter(tiny_pair), sender, receiver, records, Phase2Config(steps=2), checkpoint=checkpoint,
                     resume=True, progress=False)


def test_codec_aware_phase2_feeds_the_adapter_a_decoded_cache(zoo_pair, tiny_pair):
    """With an input codec the loss sees the sender cache after a wire round trip: a coarse codec raises
    the committed adapter's loss, a lossless one leaves it (up to the bf16 cast); training runs through it."""
    from densecomm_core.codec import get_codec
    from densecomm_core.zoo.pair import zoo_adapter_dir

    sender, receiver = zoo_pair
    adapter = DenseAdapter.load(zoo_adapter_dir(), sender.geometry, receiver.geometry)
    records = [TraceRecord(e.context, e.answer, e.trace) for e in tasks.make_split("test", 4)]
    modes = [ContextMode.UNAWARE] * len(records)
    with torch.no_grad():
        clean = generation_loss(adapter, sender, receiver, records, modes, PromptFormat())
        coarse = generation_loss(adapter, sender, receiver, records, modes, PromptFormat(), get_codec("quantized", key_bits=2, value_bits=2))
        lossless = generation_loss(adapter, sender, receiver, records, modes, PromptFormat(), get_codec("lossless"))
    assert coarse > clean + 0.05
    assert abs(lossless - clean) < 0.05

    sender, receiver = tiny_pair
    config = Phase2Config(steps=4, batch_size=3, eval_every=4, input_codec="quantized",
                          input_codec_params={"key_bits": 4, "value_bits": 3}, p_input_codec=1.0)
    history = train_phase2(fresh_adapter(tiny_pair), sender, receiver, records, config, progress=False)
    assert history[-1]["step"] == 4 and torch.isfinite(torch.tensor(history[-1]["train_loss"]))


def test_scrambled_phase1_texts_keep_the_vocabulary_and_length_and_nothing_else():
    """p_scrambled replaces texts by shuffled words of the training contexts (same word count), deterministically
    per step; 0 draws exactly the paper's batch, and each worker's shard is its part of the same global batch."""
    from collections import Counter

    from densecomm_core.training.phase1 import phase1_batch

    plain = phase1_batch(CONTEXTS, Phase1Config(batch_size=16), step=5)
    assert plain == phase1_batch(CONTEXTS, Phase1Config(batch_size=16, p_scrambled=0.0), step=5) and set(plain) <= set(CONTEXTS)
    config = Phase1Config(batch_size=16, p_scrambled=0.5)
    mixed = phase1_batch(CONTEXTS, config, step=5)
    assert mixed == phase1_batch(CONTEXTS, config, step=5) and mixed != phase1_batch(CONTEXTS, config, step=6)
    vocabulary = {w for c in CONTEXTS for w in c.split()}
    changed = [(m, p) for m, p in zip(mixed, plain) if m != p]
    assert 0 < len(changed) < 16  # about half
    for text, original in changed:
        assert len(text.split()) == len(original.split()) and set(text.split()) <= vocabulary and text not in CONTEXTS
    assert all(m == p for m, p in zip(mixed, plain) if m in CONTEXTS)  # the others are the paper's texts, in place
    assert Counter(w for t, _ in changed for w in t.split()) != Counter(w for _, o in changed for w in o.split())  # mixed in another context's words
    left, right = (phase1_batch(CONTEXTS, config, 5, rank, 2) for rank in (0, 1))
    assert (left, right) == (mixed[0::2], mixed[1::2])


def test_vocabulary_phase1_texts_are_random_words_of_the_whole_vocabulary():
    """p_vocabulary replaces texts by words drawn from the tokenizer's vocabulary (same word count), deterministically
    per step; 0 draws exactly the paper's batch; a vocabulary is required and the error names the field."""
    from densecomm_core.training.phase1 import phase1_batch, vocabulary_words
    from densecomm_core.zoo.tasks_v2 import OUT_OF_DOMAIN, VOCABULARY_V2
    from densecomm_core.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(VOCABULARY_V2)
    words = vocabulary_words(tokenizer)
    assert set(words) == set(VOCABULARY_V2) - set(tokenizer.all_special_tokens)  # every word, no special token
    assert set(OUT_OF_DOMAIN) <= set(words) and len(words) == len(set(words))

    plain = phase1_batch(CONTEXTS, Phase1Config(batch_size=16), step=5)
    assert plain == phase1_batch(CONTEXTS, Phase1Config(batch_size=16, p_vocabulary=0.0), step=5, vocabulary=words)
    config = Phase1Config(batch_size=16, p_vocabulary=0.5)
    mixed = phase1_batch(CONTEXTS, config, step=5, vocabulary=words)
    assert mixed == phase1_batch(CONTEXTS, config, step=5, vocabulary=words) != phase1_batch(CONTEXTS, config, 6, vocabulary=words)
    changed = [(m, p) for m, p in zip(mixed, plain) if m != p]
    assert 0 < len(changed) < 16 and all(m == p for m, p in zip(mixed, plain) if m in CONTEXTS)
    for text, original in changed:
        assert len(text.split()) == len(original.split()) and set(text.split()) <= set(words)
    drawn = {w for t, _ in changed for w in t.split()}
    assert drawn - {w for c in CONTEXTS for w in c.split()}  # words no training context has
    assert tokenizer(mixed)["input_ids"] and all(tokenizer.unk_token_id not in ids for ids in tokenizer(mixed)["input_ids"])
    left, right = (phase1_batch(CONTEXTS, config, 5, rank, 2, words) for rank in (0, 1))
    assert (left, right) == (mixed[0::2], mixed[1::2])
    with pytest.raises(ValueError, match="p_vocabulary = 0.5 needs the tokenizer's words"):
        phase1_batch(CONTEXTS, config, step=5)


def test_mismatched_aware_examples_read_another_examples_cache(tiny_pair):
    """p_mismatch swaps the sender's input of context-aware examples only, deterministically per step; 0 keeps
    every example's own input (and the batch the paper's recipe draws)."""
    from densecomm_core.training.phase2 import phase2_batch

    records = [TraceRecord(e.context, e.answer, e.trace) for e in EXAMPLES]
    plain = phase2_batch(records, Phase2Config(batch_size=16, p_aware=0.5), step=3)
    assert plain[3] == [r.context for r in plain[0]]
    mixed = phase2_batch(records, Phase2Config(batch_size=16, p_aware=0.5, p_mismatch=1.0), step=3)
    assert mixed[:3] == plain[:3] and mixed == phase2_batch(records, Phase2Config(batch_size=16, p_aware=0.5, p_mismatch=1.0), step=3)
    for record, mode, context in zip(mixed[0], mixed[1], mixed[3]):
        own = record.context
        assert (context != own and context in CONTEXTS) if mode is ContextMode.AWARE else context == own
    assert ContextMode.AWARE in mixed[1] and ContextMode.UNAWARE in mixed[1]
    left, right = (phase2_batch(records, Phase2Config(batch_size=16, p_aware=0.5, p_mismatch=1.0), 3, rank, 2) for rank in (0, 1))
    assert (left[3], right[3]) == (mixed[3][0::2], mixed[3][1::2])  # each worker's shard keeps its examples' inputs
    sender, receiver = tiny_pair
    adapter = fresh_adapter(tiny_pair)
    records, modes, _, contexts = mixed
    assert ContextMode.AWARE in modes[:4]
    swapped = generation_loss(adapter, sender, receiver, records[:4], modes[:4], PromptFormat(), sender_contexts=contexts[:4])
    own = generation_loss(adapter, sender, receiver, records[:4], modes[:4], PromptFormat())
    assert torch.isfinite(swapped) and swapped.item() != own.item()


def test_checkpoints_carry_and_restore_the_gpus_generators(tmp_path, monkeypatch):
    """C2C's gate noise draws on the fuser's GPU: a resumed run needs that generator back, not a re-seeded one.
    No GPU here: CUDA's state calls are recorded."""
    from densecomm_core.training import loop

    saved = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    path = tmp_path / "c2c.pt"
    loop.TrainingState("c2c", 3, {}, {}, [], torch.get_rng_state(), {}, loop.cuda_rng_state()).save(path)
    state = loop.TrainingState.load(path, "c2c")  # weights_only: a list of tensors loads
    loop.restore_rng(state)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, saved))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # another machine: the GPUs' states do not apply
    restored.clear()
    loop.restore_rng(state)
    assert restored == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert loop.cuda_rng_state() is None  # a CPU run saves none


def test_phase2_reconstruction_anchor_adds_phase1s_loss_on_what_the_sender_read(tiny_pair):
    """recon_weight w adds w x eq. 5 between the transformed cache and the receiver's own cache of the sender's
    input (another example's with p_mismatch), and its gradient reaches the adapter; w = 0 is the paper's loss."""
    sender, receiver = tiny_pair
    adapter = fresh_adapter(tiny_pair)
    records = [TraceRecord(e.context, e.answer, e.trace) for e in EXAMPLES[:4]]
    modes = [ContextMode.UNAWARE, ContextMode.AWARE] * 2
    read = [records[1].context, records[0].context, records[3].context, records[2].context]
    for contexts in (None, read):
        plain = generation_loss(adapter, sender, receiver, records, modes, PromptFormat(), sender_contexts=contexts)
        assert generation_loss(adapter, sender, receiver, records, modes, PromptFormat(), sender_contexts=contexts,
                               recon_weight=0.0).item() == plain.item()
        anchored = generation_loss(adapter, sender, receiver, records, modes, PromptFormat(), sender_contexts=contexts,
                                   recon_weight=0.5)
        with torch.no_grad():
            recon = batch_loss(adapter, sender, receiver, contexts or [r.context for r in records])
        assert recon.item() > 0
        torch.testing.assert_close(anchored, plain + 0.5 * recon, rtol=1e-5, atol=1e-6)
    adapter.zero_grad()
    (anchored - plain.detach()).backward()  # the anchor's own gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_phase2_step_passes_its_configs_recon_weight(tiny_pair):
    from densecomm_core.training.phase2 import phase2_batch, phase2_step

    sender, receiver = tiny_pair
    adapter = fresh_adapter(tiny_pair)
    records = [TraceRecord(e.context, e.answer, e.trace) for e in EXAMPLES[:8]]
    config = Phase2Config(batch_size=4, p_aware=0.5)
    batch = phase2_batch(records, config, step=1)
    plain = phase2_step(adapter, sender, receiver, batch, PromptFormat(), None, config).loss
    anchored = phase2_step(adapter, sender, receiver, batch, PromptFormat(), None, Phase2Config(batch_size=4, p_aware=0.5,
                                                                                                 recon_weight=2.0)).loss
    with torch.no_grad():
        recon = batch_loss(adapter, sender, receiver, [r.context for r in batch[0]])
    torch.testing.assert_close(anchored, plain + 2.0 * recon, rtol=1e-5, atol=1e-6)
