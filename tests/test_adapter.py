"""DenseAdapter: depth and group maps, shapes across real-checkpoint layouts, gates, checkpoints."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from densecomm_core.adapter import (
    CONFIG_FILE,
    AdapterConfig,
    DenseAdapter,
    group_map,
    layer_map,
)
from densecomm_core.errors import CheckpointError, GeometryMismatchError
from densecomm_core.generation import forward_after_cache
from densecomm_core.relay import encode, sender_prefill, transform_cache
from densecomm_core.rope import strip_rope
from tests.conftest import QWEN3_LAYOUTS


def test_layer_map_matches_eq_10():
    assert layer_map(4, 5) == [0, 1, 2, 2, 3]  # 0, .75, 1.5, 2.25, 3 rounded half up
    assert layer_map(36, 40)[0] == 0 and layer_map(36, 40)[-1] == 35
    assert layer_map(40, 36) == [(2 * l * 39 + 35) // 70 for l in range(36)]  # floor(l·39/35 + 1/2), in integers
    assert layer_map(7, 7) == list(range(7))
    assert layer_map(5, 1) == [0]
    for ls, lr in itertools.product([1, 2, 3, 36, 40], [2, 5, 36, 40]):
        mapping = layer_map(ls, lr)
        assert len(mapping) == lr and mapping == sorted(mapping) and mapping[-1] == ls - 1


def test_group_map():
    assert group_map(8, 8) == list(range(8))
    assert group_map(2, 3) == [0, 0, 1]
    assert group_map(8, 4) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="KV group counts"):
        group_map(0, 4)


@pytest.mark.parametrize("src, dst", list(itertools.permutations(QWEN3_LAYOUTS, 2)))
def test_shapes_across_qwen3_layouts(qwen3_models, src, dst):
    """Every direction of {4B, 8B, 14B} layouts: the receiver can attend to the transformed cache."""
    sender, receiver = qwen3_models[src], qwen3_models[dst]
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))
    cache = transform_cache(adapter, sender_prefill(sender, ["math 1 + 2 ?", "recall ann 3 . ann ?"]), sender, receiver)
    g = receiver.geometry
    assert cache.num_layers == g.num_layers
    assert all(k.shape == (2, g.num_kv_heads, 7, g.head_dim) for k in cache.keys)
    ids, mask = encode(receiver.tokenizer, ["=>", "=>"], "left", add_special_tokens=False)
    logits, _ = forward_after_cache(receiver.model, ids, mask, cache.to_dynamic_cache(), cache.mask)
    assert logits.shape == (2, 1, len(receiver.tokenizer)) and torch.isfinite(logits).all()


def test_heterogeneous_head_dims_and_groups(tiny_pair):
    sender, receiver = tiny_pair
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=16))
    assert adapter.key_mlp.w1.shape == (2, 3, 8, 128)  # (L_R, G_R, d_S, 16·d_S)
    assert adapter.key_mlp.w2.shape == (2, 3, 128, 4)  # (..., d_R)
    gates = adapter.gates
    assert gates.shape == (2, 3) and bool(((gates >= 0) & (gates <= 1)).all())


def test_groups_use_their_own_parameters(tiny_pair):
    """Changing one (layer, group) MLP changes only that group's output."""
    sender, receiver = tiny_pair
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))
    stripped = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    before = adapter.transform_layer(1, *stripped)
    with torch.no_grad():
        adapter.value_mlp.b2[1, 2] += 1.0
    after = adapter.transform_layer(1, *stripped)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[1][:, :2], after[1][:, :2]) and not torch.equal(before[1][:, 2], after[1][:, 2])


def test_padding_is_left_out_and_comes_out_as_zeros(tiny_pair):
    """A padded batch maps every real token as that request alone would (T_θ is token-wise), the padding to zeros,
    and the whole-cache path agrees with the per-layer (streaming) one."""
    sender, receiver = tiny_pair
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=4))
    texts = ["a short one", "a much longer prompt with many more words in it than the first"]
    with torch.no_grad():
        batch = strip_rope(sender_prefill(sender, texts), sender)
        assert not bool(batch.mask.all())
        out = adapter(batch)
        for row, text in enumerate(texts):
            alone = adapter(strip_rope(sender_prefill(sender, [text]), sender))
            real = batch.mask[row]
            for a, b in zip(out.keys + out.values, alone.keys + alone.values):
                torch.testing.assert_close(a[row][:, real], b[0], atol=1e-5, rtol=1e-5)
                assert not a[row][:, ~real].any()
        for layer, source in enumerate(adapter.config.layer_map):
            k, v = adapter.transform_layer(layer, batch.keys[source], batch.values[source])  # every position, no mask
            mask = batch.mask[:, None, :, None]
            torch.testing.assert_close(k * mask, out.keys[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v * mask, out.values[layer], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path, tiny_pair):
    sender, receiver = tiny_pair
    config = AdapterConfig(sender.geometry, receiver.geometry, expansion=4, recipe={"phase1": {"steps": 3}}, data_fingerprint="abc")
    adapter = DenseAdapter(config)
    adapter.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["sender"]["fingerprint"] == sender.geometry.fingerprint()
    assert saved["receiver"]["fingerprint"] == receiver.geometry.fingerprint()
    assert saved["recipe"] == {"phase1": {"steps": 3}} and saved["data_fingerprint"] == "abc"
    loaded = DenseAdapter.load(tmp_path, sender.geometry, receiver.geometry)
    for (name, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_for_the_wrong_pair_names_both_fingerprints(tmp_path, tiny_pair):
    sender, receiver = tiny_pair
    DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2)).save(tmp_path)
    with pytest.raises(GeometryMismatchError) as info:
        DenseAdapter.load(tmp_path, receiver.geometry, receiver.geometry)
    assert sender.geometry.fingerprint() in str(info.value) and receiver.geometry.fingerprint() in str(info.value)


def test_missing_or_corrupt_checkpoint(tmp_path, tiny_pair):
    with pytest.raises(CheckpointError, match="not an adapter checkpoint"):
        DenseAdapter.load(tmp_path)
    sender, receiver = tiny_pair
    DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2)).save(tmp_path)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    data["expansion"] = 3
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match"):
        DenseAdapter.load(tmp_path)
    data["format_version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format_version"):
        DenseAdapter.load(tmp_path)


def test_packed_token_buckets_are_few_and_tight():
    from densecomm_core.adapter import bucket

    sizes = [bucket(n) for n in range(1, 4097)]
    assert all(n <= b <= n + max(1, n // 8) for n, b in zip(range(1, 4097), sizes))
    assert len({b for b in sizes if 256 < b <= 512}) == 8  # 8 sizes per octave


@pytest.mark.parametrize("same_groups", [False, True])
def test_every_layer_and_group_is_its_own_gated_mlp(tiny_pair, same_groups):
    """The batched transform equals eq. 12 written out per (receiver layer, group): γ · MLP(x[a(l), π(g)]),
    with the group map a permutation-free copy (same group counts) or a repeat (3 receiver groups from 2)."""
    sender, receiver = tiny_pair
    geometry = sender.geometry if same_groups else receiver.geometry
    adapter = DenseAdapter(AdapterConfig(sender.geometry, geometry, expansion=2))
    with torch.no_grad():
        adapter.gate_logit.copy_(torch.randn_like(adapter.gate_logit))  # gates that differ per (layer, group)
        cache = strip_rope(sender_prefill(sender, ["one prompt", "and a second, longer prompt"]), sender)
        out = adapter(cache)
        gelu = torch.nn.functional.gelu
        for layer, source in enumerate(adapter.config.layer_map):
            for group, picked in enumerate(adapter.config.group_map):
                for mlp, x, y in ((adapter.key_mlp, cache.keys, out.keys), (adapter.value_mlp, cache.values, out.values)):
                    h = gelu(x[source][:, picked] @ mlp.w1[layer, group] + mlp.b1[layer, group])
                    want = adapter.gates[layer, group] * (h @ mlp.w2[layer, group] + mlp.b2[layer, group])
                    real = cache.mask[:, :, None]
                    torch.testing.assert_close(y[layer][:, group], want * real, atol=1e-5, rtol=1e-5)


def test_a_bf16_adapter_stays_within_bf16_rounding_of_fp32(tiny_pair):
    """Cast to bfloat16 (a route's ``adapter_dtype``), T_θ runs in bf16 and returns bf16, close to fp32's map."""
    sender, receiver = tiny_pair
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))
    with torch.no_grad():
        cache = strip_rope(sender_prefill(sender, ["a prompt of a few tokens"]), sender)
        full = adapter(cache)
        half = adapter.to(torch.bfloat16)(cache)
    for a, b in zip(full.keys + full.values, half.keys + half.values):
        assert b.dtype == torch.bfloat16
        assert float((a - b.float()).norm() / a.norm()) < 0.02
