"""FLOPs of appendix B.1 and the Qwen3 projections against hand counts."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.evaluation.flops import (
    QWEN3,
    ModelLayout,
    PairCost,
    Qwen3Config,
    dense_adapter_flops_per_token,
    dense_adapter_params,
    qwen3_pair,
    token_row,
)
from densecomm_core.evaluation.methods import Dense, EvalPair, SenderAlone
from densecomm_core.relay import TokenCounts


def test_qwen3_4b_non_embedding_params_hand_count():
    # One layer of Qwen3-4B (hidden 2560, 32 query heads and 8 KV heads of 128, MLP 9728), by hand:
    q = 2560 * 32 * 128  # 10,485,760
    k = v = 2560 * 8 * 128  # 2,621,440 each
    o = 32 * 128 * 2560  # 10,485,760
    qk_norm = 128 + 128
    mlp = 3 * 2560 * 9728  # gate, up, down: 74,711,040
    norms = 2 * 2560
    layer = q + k + v + o + qk_norm + mlp + norms
    assert layer == 100_930_816
    assert QWEN3["qwen3-4b"].non_embedding_params() == 36 * layer + 2560 == 3_633_511_936  # "3.6B non-embedding"
    assert QWEN3["qwen3-8b"].non_embedding_params() == 6_946_075_648  # model card: 6.95B
    assert QWEN3["qwen3-14b"].non_embedding_params() == 13_212_482_560  # model card: 13.2B


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b", "qwen3-14b"])
def test_qwen3_count_matches_transformers_model(name):
    """The formula equals the parameters of transformers' own Qwen3 built from the same numbers (meta device)."""
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM

    c = QWEN3[name]
    config = HFQwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                           num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    excluded = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert sum(p.numel() for p in model.parameters() if id(p) not in excluded) == c.non_embedding_params()


def test_qwen3_formula_matches_a_loaded_tiny_qwen3(tiny_pair):
    sender = tiny_pair[0]  # TINY_SENDER: 3 layers, hidden 32, 4 heads, 2 KV heads of 8, MLP 64
    assert Qwen3Config("tiny", 3, 32, 4, 2, 8, 64, len(sender.tokenizer)).non_embedding_params() == sender.non_embedding_params


def test_dense_adapter_params_hand_count(tiny_pair):
    sender, receiver = tiny_pair
    pair = PairCost(ModelLayout.of(sender), ModelLayout.of(receiver), expansion=16)
    # receiver 2 layers x 3 KV groups, K and V MLPs 8 -> 128 -> 4: (8*128 + 128 + 128*4 + 4) = 1668 params each
    assert dense_adapter_params(pair) == 2 * 1668 * 2 * 3 == 20_016
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=16))
    assert dense_adapter_flops_per_token(pair) == adapter.num_flops_per_token() == 40_032
    # 14B -> 4B: 36 receiver layers x 8 groups, 128 -> 2048 -> 128 twice
    one = 128 * 2048 + 2048 + 2048 * 128 + 128
    assert dense_adapter_params(qwen3_pair("qwen3-14b", "qwen3-4b")) == 2 * one * 36 * 8 == 303_243_264


def test_zoo_adapter_flops_formula_matches_the_adapter(zoo_pair, zoo_adapter):
    sender, receiver = zoo_pair
    pair = PairCost(ModelLayout.of(sender), ModelLayout.of(receiver), zoo_adapter.config.expansion)
    assert dense_adapter_flops_per_token(pair) == zoo_adapter.num_flops_per_token()


def test_method_flops_per_side_hand_count(tiny_pair):
    sender, receiver = tiny_pair
    pair = PairCost(ModelLayout("s", 100, 3, 2, 8), ModelLayout("r", 50, 2, 3, 4), expansion=16)
    counts = TokenCounts(sender_prefill=10, sender_decode=0, receiver_prefill=5, receiver_decode=3)
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry))
    dense = Dense(EvalPair(sender, receiver, adapter)).flops(counts, pair)
    assert dense == {"sender": 2 * 100 * 10, "adapter": 40_032 * 10, "receiver": 2 * 50 * 8, "total": 2000 + 400_320 + 800}
    alone = SenderAlone(EvalPair(sender, receiver)).flops(TokenCounts(sender_prefill=7, sender_decode=4), pair)
    assert alone == {"sender": 2 * 100 * 11, "adapter": 0, "receiver": 0, "total": 2200}


def test_token_row_means():
    row = token_row(TokenCounts(30, 12, 9, 6), 3, {"sender": 300, "adapter": 0, "receiver": 60, "total": 360})
    assert (row.sender_prefill, row.sender_decode, row.receiver_prefill, row.receiver_decode) == (10, 4, 3, 2)
    assert row.all_tokens == 19
    assert row.flops == {"sender": 100, "adapter": 0, "receiver": 20, "total": 120}
    with pytest.raises(ValueError, match="requests"):
        token_row(TokenCounts(), 0, {})
    with pytest.raises(ValueError, match="qwen3-2b"):
        qwen3_pair("qwen3-2b", "qwen3-4b")


def test_c2c_fuser_params_formula_matches_the_fuser(tiny_pair):
    from densecomm_core.baselines.c2c import C2CConfig, C2CFuser
    from densecomm_core.evaluation.flops import c2c_fuser_params

    sender, receiver = tiny_pair
    fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=12))
    cost = PairCost(ModelLayout.of(sender), ModelLayout.of(receiver), c2c_hidden=12)
    assert 2 * c2c_fuser_params(cost) == fuser.num_flops_per_token()
