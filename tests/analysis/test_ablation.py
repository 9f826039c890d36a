"""Head ablation on Qwen3 and Llama attention, and the KV-group filters of the top-K sweep."""

from __future__ import annotations

import copy

import pytest
import torch

from densecomm_core.analysis import AnalysisError
from densecomm_core.analysis.ablation import ablate_heads, attention_modules, head_layout, keep_kv_groups, receiver_keep
from densecomm_core.relay import encode, sender_prefill


def logits(loaded, texts):
    ids, mask = encode(loaded.tokenizer, texts, "right", add_special_tokens=True)
    with torch.no_grad():
        return loaded.model(input_ids=ids, attention_mask=mask).logits


def zero_columns(loaded, ablated: torch.Tensor):
    """The manual reference: a copy of the model whose o_proj weight columns of the ablated heads are zero."""
    model = copy.deepcopy(loaded.model)
    _, _, head_dim = head_layout(model)
    with torch.no_grad():
        for layer, attention in enumerate(attention_modules(model)):
            for head in ablated[layer].nonzero().flatten().tolist():
                attention.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
    return model


@pytest.mark.parametrize("side", [0, 1], ids=["qwen3", "llama"])
def test_ablation_zeroes_exactly_the_chosen_heads_and_exit_restores(tiny_pair, side):
    loaded = tiny_pair[side]
    layers, heads, head_dim = head_layout(loaded.model)
    assert (layers, heads) == (loaded.geometry.num_layers, loaded.geometry.num_heads)
    texts = ["recall ann 3 , bob 7 . bob ?", "math 2 + 3 - 1 ?"]
    ablated = torch.zeros(layers, heads, dtype=torch.bool)
    ablated[0, 1] = ablated[layers - 1, heads - 1] = ablated[layers - 1, 0] = True
    before = logits(loaded, texts)

    seen = {}  # o_proj inputs as attention hands them over, after the ablation hook (registered later, runs later)
    first = attention_modules(loaded.model)[0].o_proj
    with ablate_heads(loaded.model, ablated):
        probe = first.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].clone()))
        during = logits(loaded, texts)
        probe.remove()
    after = logits(loaded, texts)

    x = seen["x"].unflatten(-1, (heads, head_dim))  # (B, T, H, d)
    assert torch.count_nonzero(x[:, :, 1]) == 0
    assert torch.count_nonzero(x[:, :, [h for h in range(heads) if h != 1]].abs() > 0) > 0

    manual = zero_columns(loaded, ablated)
    ids, mask = encode(loaded.tokenizer, texts, "right", add_special_tokens=True)
    with torch.no_grad():
        expected = manual(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(during, expected, rtol=1e-5, atol=1e-5)
    assert (during - before).abs().max() > 1e-4  # the ablation did something
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # hooks removed: bit-equal to the original
    assert all(not a.o_proj._forward_pre_hooks for a in attention_modules(loaded.model))


def test_ablation_changes_only_later_layers_of_the_cache(tiny_pair):
    sender = tiny_pair[0]
    layers, heads, _ = head_layout(sender.model)
    ablated = torch.zeros(layers, heads, dtype=torch.bool)
    ablated[1, 2] = True
    clean = sender_prefill(sender, ["recall ann 3 , bob 7 . bob ?"])
    with ablate_heads(sender.model, ablated):
        hit = sender_prefill(sender, ["recall ann 3 , bob 7 . bob ?"])
    for layer in range(2):  # K/V of layers 0 and 1 are computed before layer 1's o_proj
        torch.testing.assert_close(hit.keys[layer], clean.keys[layer], rtol=0, atol=0)
    assert (hit.values[2] - clean.values[2]).abs().max() > 1e-6


def test_ablation_rejects_a_wrong_shape_and_removes_hooks_after_errors(tiny_pair):
    sender = tiny_pair[0]
    with pytest.raises(AnalysisError, match=r"\(layers, query heads\) = \(3, 4\)"), ablate_heads(sender.model, torch.zeros(2, 4, dtype=torch.bool)):
        pass
    with pytest.raises(RuntimeError, match="boom"), ablate_heads(sender.model, torch.ones(3, 4, dtype=torch.bool)):
        raise RuntimeError("boom")
    assert all(not a.o_proj._forward_pre_hooks for a in attention_modules(sender.model))


def test_keep_kv_groups_and_receiver_keep(tiny_pair):
    cache = sender_prefill(tiny_pair[0], ["recall ann 3 , bob 7 . bob ?", "math 2 + 3 ?"])
    keep = torch.tensor([[True, False], [False, False], [True, True]])
    kept = keep_kv_groups(cache, keep)
    for layer in range(3):
        for group in range(2):
            for new, old in ((kept.keys, cache.keys), (kept.values, cache.values)):
                want = old[layer][:, group] if keep[layer, group] else torch.zeros_like(old[layer][:, group])
                torch.testing.assert_close(new[layer][:, group], want, rtol=0, atol=0)
    assert torch.equal(kept.mask, cache.mask)
    with pytest.raises(AnalysisError, match="keep must be"):
        keep_kv_groups(cache, torch.ones(3, 3, dtype=torch.bool))
    # zoo maps: receiver layers 0..4 read sender layers [0, 1, 2, 2, 3], receiver groups 0..2 read sender groups [0, 0, 1]
    sender_keep = torch.tensor([[True, False], [False, True], [True, False], [False, False]])
    assert receiver_keep(sender_keep, [0, 1, 2, 2, 3], [0, 0, 1]).tolist() == [
        [True, True, False], [False, False, True], [True, True, False], [True, True, False], [False, False, False]]
