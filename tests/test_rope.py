"""strip_rope / restore_rope: exact inverses of the model's own RoPE, position invariance, scaled variants."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.cache import KVCache
from densecomm_core.errors import CacheLayoutError
from densecomm_core.models import wrap_model
from densecomm_core.relay import sender_prefill
from densecomm_core.rope import restore_rope, rotary_cos_sin, strip_rope
from densecomm_core.zoo.tokenizer import build_tokenizer
from tests.conftest import TINY_RECEIVER, TINY_SENDER, tiny_model

TEXTS = ["recall ann 1 , bob 2 . ann ?", "math 3 + 4 - 1 ?", "choice cat red . cat ? A red B blue C pink D gold"]


@pytest.mark.parametrize("spec", [TINY_SENDER, TINY_RECEIVER], ids=lambda s: s.family)
def test_strip_then_restore_is_identity(spec):
    model = tiny_model(spec)
    cache = sender_prefill(model, TEXTS)
    stripped = strip_rope(cache, model)
    assert not stripped.rope_applied
    restored = restore_rope(stripped, model)
    for a, b in zip(restored.keys, cache.keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(restored.values, cache.values):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_stripped_keys_do_not_depend_on_absolute_position():
    """Shifting every position by 13 changes rotated keys but not stripped ones (RoPE is relative)."""
    model = tiny_model(TINY_SENDER)
    ids = model.tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    caches = []
    for offset in (0, 13):
        positions = torch.arange(ids.shape[1])[None] + offset
        out = model.model(input_ids=ids, position_ids=positions, use_cache=True)
        mask = torch.ones_like(ids, dtype=torch.bool)
        caches.append(KVCache.from_dynamic_cache(out.past_key_values, mask, positions))
    assert not torch.allclose(caches[0].keys[1], caches[1].keys[1], atol=1e-3)
    a, b = strip_rope(caches[0], model), strip_rope(caches[1], model)
    for ka, kb in zip(a.keys, b.keys):
        torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=lambda p: p["rope_type"],
)
def test_scaled_rope_variants_round_trip(rope_parameters):
    """The model's own rotary embedding (incl. YaRN's attention scaling) is inverted exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         rope_parameters=rope_parameters)
    torch.manual_seed(0)
    model = wrap_model(LlamaForCausalLM(config), tokenizer)
    positions = torch.arange(40)[None]
    cos, sin = rotary_cos_sin(model, positions)
    if rope_parameters["rope_type"] == "yarn":
        assert not torch.allclose(cos * cos + sin * sin, torch.ones_like(cos))  # scaled: m² != 1
    cache = sender_prefill(model, [" ".join(["math 1 + 2 ?"] * 7)])
    restored = restore_rope(strip_rope(cache, model), model)
    for a, b in zip(restored.keys, cache.keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_strip_twice_is_refused(tiny_pair):
    sender, _ = tiny_pair
    stripped = strip_rope(sender_prefill(sender, TEXTS), sender)
    with pytest.raises(CacheLayoutError, match="already stripped"):
        strip_rope(stripped, sender)


def test_strip_with_the_wrong_model_is_refused(tiny_pair):
    sender, receiver = tiny_pair
    with pytest.raises(CacheLayoutError, match="expects"):
        strip_rope(sender_prefill(sender, TEXTS), receiver)


@pytest.mark.parametrize("spec", [TINY_SENDER, TINY_RECEIVER], ids=lambda s: s.family)
def test_keys_rotate_bit_for_bit_as_the_models_own_function_rotates_them(spec):
    """rotate_keys hands the model's apply_rotary_pos_emb one head as the (discarded) query: the keys come
    out exactly as when the keys themselves are the query."""
    from densecomm_core.rope import rotate_keys, unrotate_keys

    model = tiny_model(spec)
    keys = torch.randn(2, model.geometry.num_kv_heads, 9, model.geometry.head_dim)
    cos, sin = rotary_cos_sin(model, torch.arange(9).repeat(2, 1) + torch.tensor([[0], [5]]))
    assert torch.equal(rotate_keys(keys, cos, sin, model), model.apply_rotary(keys, keys, cos, sin)[1])
    scale = (cos * cos + sin * sin).unsqueeze(1)
    assert torch.equal(unrotate_keys(keys, cos, sin, model), model.apply_rotary(keys, keys, cos, -sin)[1] / scale)


def _architecture(name: str):
    """A tiny random model of an architecture whose layers are not all rotated alike, with the zoo's tokenizer."""
    from transformers import (
        AutoModelForCausalLM,
        Cohere2Config,
        Exaone4Config,
        Gemma3TextConfig,
        Phi3Config,
        PhiConfig,
        SmolLM3Config,
    )

    tokenizer = build_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = {
        # sliding and full layers rotate with their own bases: the rotary's forward takes a layer_type
        "gemma3": lambda: Gemma3TextConfig(num_hidden_layers=3, head_dim=40, sliding_window=8, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"], **common),
        # no_rope_layers: layers 1 and 3 carry no rotation at all
        "smollm3": lambda: SmolLM3Config(num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0], **common),
        # the first half of each head's coordinates rotate, the rest pass through
        "phi3-partial": lambda: Phi3Config(num_hidden_layers=2, partial_rotary_factor=0.5, **common),
        # the attention splits the head itself before calling apply_rotary_pos_emb
        "phi-partial": lambda: PhiConfig(num_hidden_layers=2, partial_rotary_factor=0.5, **common),
        # RoPE only on the sliding layers, decided in the attention code (no config field says so)
        "cohere2": lambda: Cohere2Config(num_hidden_layers=4, sliding_window=8, layer_types=[
            "sliding_attention"] * 3 + ["full_attention"], **common),
        "exaone4": lambda: Exaone4Config(num_hidden_layers=4, sliding_window=8, layer_types=[
            "sliding_attention"] * 3 + ["full_attention"], **common),
    }[name]()
    torch.manual_seed(0)
    return wrap_model(AutoModelForCausalLM.from_config(config), tokenizer)


@pytest.mark.parametrize("name, kinds", [("gemma3", ("sliding_attention", "full_attention", "sliding_attention")),
                                         ("smollm3", ("", None, "", None)), ("phi3-partial", ("", "")),
                                         ("phi-partial", ("", "")), ("cohere2", ("", "", "", None)),
                                         ("exaone4", ("", "", "", None))])
def test_layers_rotated_differently_are_stripped_to_the_keys_the_model_rotated(name, kinds, monkeypatch):
    """strip_rope gives, layer by layer, the keys the model handed its own apply_rotary_pos_emb (a layer without
    RoPE: its cached keys unchanged), and restore_rope gives the cache back."""
    import sys

    from densecomm_core.rope import layer_rope_kinds

    model = _architecture(name)
    assert layer_rope_kinds(model) == kinds
    module = sys.modules[type(model.model).__module__]
    original, seen = module.apply_rotary_pos_emb, []
    monkeypatch.setattr(module, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: (seen.append(k.clone()), original(q, k, cos, sin, *a, **kw))[1])
    cache = sender_prefill(model, TEXTS)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", original)
    rotated = iter(seen)
    stripped = strip_rope(cache, model)
    for layer, kind in enumerate(layer_rope_kinds(model)):
        truth = next(rotated) if kind is not None else cache.keys[layer]
        width = truth.shape[-1]  # narrower than the head where the attention hands over only the rotated part
        if width < stripped.keys[layer].shape[-1]:
            assert torch.equal(stripped.keys[layer][..., width:], cache.keys[layer][..., width:].float())
        real = cache.mask[:, None, :, None].expand_as(truth)
        torch.testing.assert_close(stripped.keys[layer][..., :width][real], truth.float()[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(restore_rope(stripped, model).keys, cache.keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_model_that_rotates_other_layers_than_its_config_says_is_refused(monkeypatch):
    """Loading traces which layers the model rotates: an architecture whose rule densecomm does not know (here:
    the Cohere-2 rule forgotten) is refused instead of having its NoPE layers silently rotated."""
    from densecomm_core import rope
    from densecomm_core.errors import ModelLoadError

    monkeypatch.setattr(rope, "layers_without_rope", lambda config, layers, path="": [False] * layers)
    with pytest.raises(ModelLoadError, match=r"rotates the keys of layers \[0, 1, 2\] but its config says \[0, 1, 2, 3\]"):
        _architecture("cohere2")
