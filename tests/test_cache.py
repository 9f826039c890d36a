"""KVCache layout checks and the transformers DynamicCache round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from densecomm_core.cache import KVCache
from densecomm_core.errors import CacheLayoutError
from densecomm_core.relay import sender_prefill


def random_cache(layers=3, batch=2, heads=2, tokens=5, dim=4) -> KVCache:
    keys = [torch.randn(batch, heads, tokens, dim) for _ in range(layers)]
    values = [torch.randn(batch, heads, tokens, dim) for _ in range(layers)]
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, 3:] = False
    return KVCache(keys, values, mask, torch.arange(tokens).expand(batch, tokens).clone())


def test_dynamic_cache_round_trip_keeps_tensors():
    cache = random_cache()
    dynamic = cache.to_dynamic_cache()
    assert isinstance(dynamic, DynamicCache)
    assert len(dynamic.layers) == 3 and dynamic.get_seq_length() == 5
    back = KVCache.from_dynamic_cache(dynamic, cache.mask, cache.positions)
    for a, b in zip(back.keys + back.values, cache.keys + cache.values):
        assert torch.equal(a, b)
    assert torch.equal(back.lengths, torch.tensor([5, 3]))


def test_prefill_cache_round_trips_through_dynamic_cache(tiny_pair):
    sender, _ = tiny_pair
    cache = sender_prefill(sender, ["math 1 + 2 ?", "recall ann 3 . ann ?"])
    assert cache.num_layers == sender.geometry.num_layers
    assert cache.keys[0].shape[1:] == (sender.geometry.num_kv_heads, cache.num_tokens, sender.geometry.head_dim)
    assert cache.lengths.tolist() == [6, 7]  # BOS + words, right-padded
    back = KVCache.from_dynamic_cache(cache.to_dynamic_cache(), cache.mask, cache.positions)
    assert all(torch.equal(a, b) for a, b in zip(back.keys, cache.keys))


def test_valid_bytes_excludes_padding():
    cache = random_cache(layers=1, batch=2, heads=2, tokens=5, dim=4)
    per_token = 2 * 2 * 4 * 4  # K and V, 2 heads, dim 4, float32
    assert cache.valid_nbytes() == (5 + 3) * per_token
    assert cache.nbytes == 10 * per_token


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.keys.pop(), "same non-zero number"),
        (lambda c: c.keys.__setitem__(0, c.keys[0][:, :, :4]), "disagree with mask"),
        (lambda c: c.values.__setitem__(1, c.values[1][:, :1]), "differ in heads"),
        (lambda c: setattr(c, "positions", c.positions[:, :2]), "positions shape"),
        (lambda c: setattr(c, "mask", c.mask.long()), "bool tensor"),
    ],
)
def test_layout_errors_name_the_problem(mutate, message):
    cache = random_cache()
    mutate(cache)
    with pytest.raises(CacheLayoutError, match=message):
        cache.validate()


def test_rows_and_trim():
    cache = random_cache()
    one = cache.rows([1]).trimmed()
    assert one.num_tokens == 3 and one.batch_size == 1
    assert torch.equal(one.keys[2], cache.keys[2][1:, :, :3])


def test_stack_rows_rebuilds_the_padded_batch():
    cache = random_cache()
    rows = [cache.rows([b]).trimmed() for b in range(cache.batch_size)]
    stacked = KVCache.stack_rows(rows)
    assert torch.equal(stacked.mask, cache.mask)
    assert torch.equal(stacked.positions[cache.mask], cache.positions[cache.mask])
    for got, want in zip((*stacked.keys, *stacked.values), (*cache.keys, *cache.values)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1, :, :3], want[1, :, :3])
        assert not got[1, :, 3:].any()  # padding is zeros, never another row's data
    with pytest.raises(CacheLayoutError, match="one cache space"):
        KVCache.stack_rows([rows[0], KVCache(rows[1].keys, rows[1].values, rows[1].mask, rows[1].positions, fingerprint="other")])
