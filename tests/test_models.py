"""load_model: real HF directories load with their geometry; bad directories give ModelLoadError."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig

from densecomm_core.errors import IncompatiblePairError, ModelLoadError
from densecomm_core.models import check_shared_tokenizer, load_model, wrap_model
from densecomm_core.zoo.tokenizer import build_tokenizer
from tests.conftest import TINY_RECEIVER, TINY_SENDER, tiny_model


@pytest.mark.parametrize("spec", [TINY_SENDER, TINY_RECEIVER], ids=lambda s: s.family)
def test_load_from_local_directory(tmp_path, spec):
    original = tiny_model(spec)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.geometry == original.geometry
    assert loaded.geometry.num_kv_heads == spec.num_kv_heads and loaded.geometry.head_dim == spec.head_dim
    assert str(spec.rope_theta) in loaded.geometry.rope
    assert loaded.non_embedding_params > 0
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_qwen2_loads(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    geometry = load_model(tmp_path).geometry
    assert (geometry.model_type, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == ("qwen2", 2, 2, 8)


def test_missing_directory():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_not_a_causal_lm(tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_model(tmp_path)


def test_no_rotary_embedding(tmp_path):
    tokenizer = build_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no rotary position embedding"):
        load_model(tmp_path)


def test_pair_needs_a_shared_tokenizer(tiny_pair):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    sender, receiver = tiny_pair
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>")))
    stranger = wrap_model(receiver.model, other)
    check_shared_tokenizer(sender, receiver)
    with pytest.raises(IncompatiblePairError, match="different tokenizers"):
        check_shared_tokenizer(sender, stranger)


def test_rope_model_from_config_alone_matches_the_loaded_model(tmp_path):
    import torch

    from densecomm_core.models import load_rope_model
    from densecomm_core.rope import rotary_cos_sin

    original = tiny_model(TINY_RECEIVER)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # no weights needed
    rope_only = load_rope_model(tmp_path)
    assert rope_only.geometry == original.geometry
    positions = torch.arange(30)[None]
    for a, b in zip(rotary_cos_sin(rope_only, positions), rotary_cos_sin(original, positions)):
        torch.testing.assert_close(a, b)


def test_weights_are_read_straight_onto_the_device(tmp_path, monkeypatch):
    """No load on the host and then a move: the weights land on the requested device as they are read
    (``meta`` here, which holds no data, so nothing was materialised on the CPU first)."""
    import torch

    original = tiny_model(TINY_SENDER)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    moves = []
    to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: moves.append(args) or to(self, *args, **kwargs))
    loaded = load_model(tmp_path, dtype=torch.bfloat16, device="meta")
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert moves == []  # (loading on the CPU and then calling .to("meta") would also end on meta)
    assert loaded.geometry == original.geometry


def test_a_shared_vocabulary_cut_differently_is_refused(tiny_pair):
    """Byte-identical tokenizer files can load as two classes that cut text differently (transformers picks the
    class by model type): comparing vocabularies accepted such a pair, and phase I then failed on a shape."""
    import copy

    from tokenizers import pre_tokenizers

    sender, receiver = tiny_pair
    other = copy.deepcopy(receiver.tokenizer)
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(",", behavior="removed")  # drops the commas
    assert other.get_vocab() == sender.tokenizer.get_vocab()
    with pytest.raises(IncompatiblePairError, match="share a vocabulary but tokenize text differently"):
        check_shared_tokenizer(sender, wrap_model(receiver.model, other))


def test_a_multimodal_wrapper_is_refused_as_such():
    """Gemma-3 4B-27B checkpoints are Gemma3ForConditionalGeneration: refused for what they are (the message
    used to say the model had no rotary embedding)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from densecomm_core.models import rope_parts

    config = Gemma3Config(text_config=Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64),
                          vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=28, patch_size=14))
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    with pytest.raises(ModelLoadError, match="wraps a language model with other modalities"):
        rope_parts(model)
