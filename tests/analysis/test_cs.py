"""Compressed-sensing pieces: masks, Lasso recovery of planted heads, group scores, gates, the whole run on a tiny pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.analysis import AnalysisError
from densecomm_core.analysis.cs import (
    CSConfig,
    default_topk,
    fit_head_importance,
    gates_by_sender_group,
    group_scores,
    group_table,
    random_groups,
    rank_correlation,
    run_cs,
    stratified_masks,
    sweep_table,
    top_groups,
)
from densecomm_core.zoo import tasks


def test_masks_are_stratified_over_layers_and_heads():
    masks = stratified_masks(4, 8, 40, fraction=0.1, seed=3)  # 32 heads: 3 per mask
    assert masks.shape == (40, 4, 8) and (masks.sum(axis=(1, 2)) == 3).all()
    per_layer = masks.sum(axis=2)
    assert (per_layer <= 1).all()  # k < L: at most one head per layer per mask
    hits = per_layer.sum(axis=0)
    assert hits.sum() == 120 and hits.max() - hits.min() <= 1  # every layer hit equally often (±1)
    per_head = masks.sum(axis=0)  # (L, H)
    assert (per_head.max(axis=1) - per_head.min(axis=1) <= 1).all()  # and every head within its layer
    tiny = stratified_masks(4, 4, 8, fraction=0.05)  # 5 % of 16 rounds to 0: one head per mask
    assert (tiny.sum(axis=(1, 2)) == 1).all() and tiny.sum(axis=(0, 2)).tolist() == [2, 2, 2, 2]
    with pytest.raises(AnalysisError, match="fraction"):
        stratified_masks(4, 4, 8, fraction=0.0)


def test_lasso_recovers_planted_important_heads():
    layers, heads = 4, 16
    masks = stratified_masks(layers, heads, 200, fraction=0.05, seed=0).reshape(200, -1)  # 3 heads per mask
    planted = {5: 0.30, 21: 0.20, 60: 0.15}  # flat head index -> accuracy lost when ablated
    rng = np.random.default_rng(1)
    y = 0.9 - sum(w * masks[:, h] for h, w in planted.items()) + rng.normal(0, 0.01, 200)
    importance = fit_head_importance(masks, y, baseline=0.9, alpha=1e-4)
    assert set(np.argsort(-importance)[:3].tolist()) == set(planted)
    for head, weight in planted.items():
        assert importance[head] == pytest.approx(weight, abs=0.03)
    others = np.delete(importance, list(planted))
    assert np.abs(others).max() < 0.03
    cv = fit_head_importance(masks, y, baseline=0.9, alpha=None)
    assert set(np.argsort(-cv)[:3].tolist()) == set(planted)
    assert not fit_head_importance(masks, np.full(200, 0.5), 0.5).any()  # no signal: all zero


def test_group_scores_top_random_and_gates():
    importance = np.arange(8, dtype=float).reshape(2, 4)  # 2 layers x 4 query heads, 2 KV groups
    scores = group_scores(importance, kv_heads=2)
    assert scores.tolist() == [[1.0, 5.0], [9.0, 13.0]]
    assert top_groups(scores, 2).tolist() == [[False, False], [True, True]]
    assert top_groups(scores, 0).sum() == 0 and top_groups(scores, 4).all()
    picks = random_groups((2, 2), 3, seed=0)
    assert picks.sum() == 3 and picks.tolist() == random_groups((2, 2), 3, seed=0).tolist()
    with pytest.raises(AnalysisError):
        top_groups(scores, 5)
    gates = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    mapped = gates_by_sender_group(gates, [0, 1, 2, 2, 3], [0, 0, 1], (4, 2))
    np.testing.assert_allclose(mapped, [[0.15, 0.3], [0.45, 0.6], [(0.7 + 0.8 + 1.0 + 0.0) / 4, (0.9 + 0.5) / 2], [0.2, 0.2]])
    assert math.isnan(gates_by_sender_group(gates[:1], [0], [0, 0, 1], (2, 2))[1, 0])
    rho, _ = rank_correlation(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 45.0]))
    assert rho == pytest.approx(1.0)
    assert math.isnan(rank_correlation(np.ones(4), np.arange(4.0))[0])
    assert default_topk(8) == tuple(range(9)) and default_topk(288) == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 288)


def test_run_cs_on_a_tiny_pair(tiny_pair):
    sender, receiver = tiny_pair
    torch.manual_seed(0)
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))
    lines = []
    config = CSConfig(masks=3, examples_per_family=2, topk=(0, 2, 6), seeds=2, max_new_tokens=3)
    result = run_cs(sender, receiver, adapter, config, progress=lines.append)
    assert result.masks.shape == (3, 3, 4) and result.heads_per_mask == 1 and result.examples == 6
    assert result.distinct_masks == 3  # one head in each of the three layers
    assert [row.k for row in result.sweep] == [0, 2, 6]
    assert result.sweep[-1].cs == result.baseline  # all groups kept = the unfiltered relay
    assert result.group_scores["ranking"].shape == (3, 2) and result.gates.shape == (3, 2)
    assert any(line.startswith("masks 3/3") for line in lines)
    assert sweep_table(result).count("\n") == 2 + 3 - 1 and "| 2 |" in sweep_table(result)
    assert group_table(result).count("\n") == 2 + 6 - 1
    with pytest.raises(AnalysisError, match="outside"):
        run_cs(sender, receiver, adapter, CSConfig(masks=1, examples_per_family=1, topk=(7,), max_new_tokens=1),
               examples=tasks.make_split("test", 1))
    with pytest.raises(AnalysisError, match="filter_site"):
        CSConfig(filter_site="middle")
