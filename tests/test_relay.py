"""The in-process relay: identity sanity check, explicit positions, batched = one at a time, both modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.errors import GeometryMismatchError
from densecomm_core.generation import GenerationConfig, forward_after_cache
from densecomm_core.relay import (
    ContextMode,
    DenseRelay,
    encode,
    receiver_generate,
    sender_prefill,
)
from densecomm_core.rope import restore_rope, strip_rope
from densecomm_core.zoo import tasks

EXAMPLES = tasks.make_split("test", 4)
CONTEXTS = [e.context for e in EXAMPLES]


def test_own_cache_through_the_relay_path_gives_plain_forward_logits(zoo_pair):
    """Identity sanity check: receiver's own cache, stripped and restored, then '=>' == one plain forward."""
    _, receiver = zoo_pair
    tok = receiver.tokenizer
    cache = restore_rope(strip_rope(sender_prefill(receiver, CONTEXTS), receiver), receiver)
    ids, mask = encode(tok, ["=>"] * len(CONTEXTS), "left", add_special_tokens=False)
    logits, _ = forward_after_cache(receiver.model, ids, mask, cache.to_dynamic_cache(), cache.mask)
    for i, context in enumerate(CONTEXTS):
        full = tok(f"{context} =>", return_tensors="pt")["input_ids"]
        plain = receiver.model(input_ids=full).logits[0, -1]
        torch.testing.assert_close(logits[i, -1], plain, atol=1e-4, rtol=1e-4)


def test_generation_after_own_cache_equals_generation_from_text(zoo_pair):
    _, receiver = zoo_pair
    config = GenerationConfig(max_new_tokens=20)
    cached = receiver_generate(receiver, sender_prefill(receiver, CONTEXTS), ["=>"] * len(CONTEXTS), config)
    from_text = receiver_generate(receiver, None, [f"{c} =>" for c in CONTEXTS], config)
    assert cached.texts == from_text.texts
    assert all(tasks.extract_answer(t) is not None for t in cached.texts)


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_ids_are_read_as_they_are(zoo_pair, side):
    """A caller that tokenized an input already (the services, to check its limits) passes the ids: the
    padded batch, the sender's cache and the receiver's answer are those of the texts."""
    sender, receiver = zoo_pair
    tok = sender.tokenizer
    ids = [tok(c, add_special_tokens=True)["input_ids"] for c in CONTEXTS]
    for given in (ids, [ids[0], *CONTEXTS[1:]], [np.array(ids[0]), *map(tuple, ids[1:])]):  # ids; mixed; other sequences
        got, want = encode(tok, given, side, True), encode(tok, iter(CONTEXTS), side, True)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert (want[1][:, -1 if side == "left" else 0] == 1).all() and not want[1].all()  # padded on that side
    a, b = sender_prefill(sender, ids), sender_prefill(sender, CONTEXTS)
    assert all(torch.equal(x, y) for x, y in zip([*a.keys, *a.values, a.mask], [*b.keys, *b.values, b.mask]))
    prompts = [f"{c} =>" for c in CONTEXTS]
    config = GenerationConfig(max_new_tokens=12)
    from_ids = receiver_generate(receiver, None, [tok(p, add_special_tokens=True)["input_ids"] for p in prompts], config)
    assert from_ids.texts == receiver_generate(receiver, None, prompts, config).texts


def test_threads_sharing_a_tokenizer_pad_on_their_own_side(zoo_pair):
    """A sender and a receiver of one checkpoint share its tokenizer; a fast tokenizer that padded in its
    backend kept the side there, and a thread could tokenize with another thread's side."""
    from concurrent.futures import ThreadPoolExecutor

    tok = zoo_pair[0].tokenizer

    def worker(side: str) -> int:
        wrong = 0
        for _ in range(150):
            _, mask = encode(tok, CONTEXTS, side, True)
            wrong += int(not (mask[:, -1 if side == "left" else 0] == 1).all())
        return wrong

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(worker, ["left", "right"] * 2)) == 0


@pytest.mark.parametrize("mode", list(ContextMode))
def test_batched_equals_one_at_a_time(zoo_pair, zoo_adapter, mode):
    sender, receiver = zoo_pair
    relay = DenseRelay(sender, receiver, zoo_adapter)
    config = GenerationConfig(max_new_tokens=20)
    batched = relay.run(CONTEXTS, mode, config)
    singles = [relay.run([c], mode, config) for c in CONTEXTS]
    assert batched.texts == [s.texts[0] for s in singles]
    assert batched.counts.receiver_decode == sum(s.counts.receiver_decode for s in singles)
    assert batched.counts.sender_prefill == sum(s.counts.sender_prefill for s in singles)
    assert batched.payload_bytes == sum(s.payload_bytes for s in singles)


def test_receiver_tokens_continue_at_explicit_positions(zoo_pair, zoo_adapter):
    """A right-padded transferred cache: row i's first receiver token sits at logical position len_i."""
    sender, receiver = zoo_pair
    cache = DenseRelay(sender, receiver, zoo_adapter).transfer(CONTEXTS[:3])
    lengths = cache.lengths
    assert len(set(lengths.tolist())) > 1  # the rows really differ in length
    from densecomm_core.generation import continuation_positions

    positions = continuation_positions(lengths, torch.ones(3, 2, dtype=torch.long))
    assert positions[:, 0].tolist() == lengths.tolist()
    assert cache.fingerprint == receiver.geometry.fingerprint()


def test_sender_does_not_decode(zoo_pair, zoo_adapter):
    sender, receiver = zoo_pair
    out = DenseRelay(sender, receiver, zoo_adapter).run(CONTEXTS, ContextMode.UNAWARE, GenerationConfig(max_new_tokens=4))
    assert out.counts.sender_decode == 0
    assert out.counts.sender_prefill == sum(len(sender.tokenizer(c)["input_ids"]) for c in CONTEXTS)
    assert out.counts.receiver_prefill == len(CONTEXTS)  # just '=>' per row in the unaware regime


def test_run_reports_each_decoding_step_to_on_token(zoo_pair, zoo_adapter):
    sender, receiver = zoo_pair
    relay = DenseRelay(sender, receiver, zoo_adapter)
    steps = []
    out = relay.run(CONTEXTS, ContextMode.UNAWARE, GenerationConfig(max_new_tokens=6),
                    on_token=lambda step, tokens: steps.append((step, tokens.clone())))
    assert [step for step, _ in steps] == list(range(len(steps))) and len(steps) == int(out.lengths.max())
    assert torch.equal(torch.stack([t for _, t in steps], dim=1), out.tokens[:, : len(steps)])
    assert out.texts == relay.run(CONTEXTS, ContextMode.UNAWARE, GenerationConfig(max_new_tokens=6)).texts


def test_relay_refuses_an_adapter_for_another_pair(zoo_pair, tiny_pair):
    sender, receiver = zoo_pair
    wrong = DenseAdapter(AdapterConfig(tiny_pair[0].geometry, receiver.geometry, expansion=2))
    with pytest.raises(GeometryMismatchError, match="adapter expects sender"):
        DenseRelay(sender, receiver, wrong)


def test_sampling_is_seeded(zoo_pair, zoo_adapter):
    sender, receiver = zoo_pair
    relay = DenseRelay(sender, receiver, zoo_adapter)
    config = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    assert relay.run(CONTEXTS, ContextMode.AWARE, config).texts == relay.run(CONTEXTS, ContextMode.AWARE, config).texts
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


def _sliding_window_receiver(window: int):
    """A tiny Mistral whose every layer attends over a sliding window of ``window`` slots."""
    from transformers import MistralConfig, MistralForCausalLM

    from densecomm_core.models import wrap_model
    from densecomm_core.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                           max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return wrap_model(MistralForCausalLM(config), tokenizer, path="tiny-mistral")


def test_a_sliding_window_receiver_answers_a_batch_as_one_row_at_a_time():
    """transformers counts a sliding window in slots; the padding between a short row's cache and its prompt
    then pushed its own cache out of the window (an architecture sweep saw 5 of 8 batched rows differ)."""
    from densecomm_core.relay import padding_crosses_window
    from tests.conftest import TINY_SENDER, tiny_model

    sender, receiver = tiny_model(TINY_SENDER), _sliding_window_receiver(window=12)
    torch.manual_seed(0)
    relay = DenseRelay(sender, receiver, DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry)))
    contexts = ["recall ann 1 , bob 2 , cal 3 , dee 4 , eve 5 . cal ?", "math 3 + 4 ?", "recall ann 1 . ann ?"]
    config = GenerationConfig(max_new_tokens=6)
    cache = relay.transfer(contexts)
    assert padding_crosses_window(receiver, cache, torch.ones(3, 2))  # padded, and wider than the window
    unpadded = cache.rows([0, 0])
    assert not padding_crosses_window(receiver, unpadded, torch.ones(2, 2))  # no padding: slots are positions
    # (on this tiny model the unaware answers differ without the split; the aware ones happen to agree)
    for mode in (ContextMode.AWARE, ContextMode.UNAWARE):
        batched = relay.run(contexts, mode, config)
        alone = [relay.run([c], mode, config) for c in contexts]
        assert batched.texts == [a.texts[0] for a in alone], mode
        for i, a in enumerate(alone):
            assert torch.equal(batched.tokens[i, : batched.lengths[i]], a.tokens[0, : a.lengths[0]])
        assert batched.counts.receiver_prefill == sum(a.counts.receiver_prefill for a in alone)
    with pytest.raises(ValueError, match="row by row"):  # a token callback expects one call per step for the batch
        relay.run(contexts, ContextMode.UNAWARE, config, on_token=lambda step, tokens: None)


def test_training_losses_refuse_a_batch_that_crosses_the_receivers_sliding_window():
    from densecomm_core.errors import CacheLayoutError
    from densecomm_core.training.phase2 import generation_loss
    from densecomm_core.training.traces import TraceRecord
    from densecomm_core.relay import PromptFormat
    from tests.conftest import TINY_SENDER, tiny_model

    sender, receiver = tiny_model(TINY_SENDER), _sliding_window_receiver(window=8)
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry))
    records = [TraceRecord(context=c, answer="5", trace=" 5") for c in ("recall ann 1 , bob 2 , cal 3 . cal ?", "math 1 + 2 ?")]
    with pytest.raises(CacheLayoutError, match="sliding window of 8"):
        generation_loss(adapter, sender, receiver, records, [ContextMode.UNAWARE] * 2, PromptFormat())
    from densecomm_core.baselines.c2c import C2CFuser, C2CConfig
    from densecomm_core.baselines.c2c_training import c2c_generation_loss

    from densecomm_core.training.phase2 import check_records_fit_window

    with pytest.raises(CacheLayoutError, match="train with one row per worker"):  # refused before training starts
        check_records_fit_window(sender, receiver, records, rows=2)
    check_records_fit_window(sender, receiver, records, rows=1)  # one row: no padding
    # the check counts the slots as the loss lays them out (prompt and trace tokenized apart: joined, "=>5" was
    # one token and the check passed a batch the loss then refused)
    from densecomm_core.training.phase2 import receiver_batch, window_overflow

    glued = [TraceRecord(context=r.context, answer="5", trace="5") for r in records]
    cache = max(sender_prefill(sender, [PromptFormat().sender.format(context=r.context)]).mask.shape[1] for r in glued)
    tail = max(receiver_batch(receiver, [PromptFormat().receiver_prompt(ContextMode.AWARE, r.context)], [r.trace])[0].shape[1]
               for r in glued)
    assert window_overflow(sender.tokenizer, receiver.tokenizer, cache + tail - 1, glued, rows=2)
    assert window_overflow(sender.tokenizer, receiver.tokenizer, cache + tail, glued, rows=2) is None
    fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry))
    with pytest.raises(CacheLayoutError, match="sliding window of 8"):  # the C2C baseline's loss reads the same layout
        c2c_generation_loss(fuser, sender, receiver, records, [ContextMode.UNAWARE] * 2, PromptFormat())
