"""PCA of value vectors on the zoo pair, and both PNGs written and non-empty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.analysis import AnalysisError
from densecomm_core.analysis.cs import CSConfig, run_cs
from densecomm_core.analysis.pca import default_layers, principal_axes, run_pca, value_vectors
from densecomm_core.analysis.plots import plot_cs, plot_pca
from densecomm_core.relay import sender_prefill
from densecomm_core.zoo import tasks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024


def test_value_vectors_and_axes(tiny_pair):
    cache = sender_prefill(tiny_pair[0], ["recall ann 3 , bob 7 . bob ?", "math 2 ?"])
    x = value_vectors(cache, 1)
    assert x.shape == (int(cache.lengths.sum()) - 2, 2 * 8)  # real tokens minus each row's BOS, heads concatenated
    row0 = cache.values[1][0, :, 1].flatten()  # first row, second token, both heads
    np.testing.assert_allclose(x[0], row0.double().numpy())
    _, axes, explained = principal_axes(x)
    assert axes.shape == (2, 16) and np.allclose(axes @ axes.T, np.eye(2)) and explained[0] >= explained[1]
    assert default_layers(36) == (7, 34) and default_layers(5) == (1, 4)


def test_pca_on_the_zoo_and_its_plot(zoo_pair, zoo_adapter, tmp_path):
    sender, receiver = zoo_pair
    contexts = [e.context for e in tasks.make_split("test", 4)]
    result = run_pca(sender, receiver, zoo_adapter, contexts)
    assert [c.receiver_layer for c in result.layers] == [1, 4] and [c.sender_layer for c in result.layers] == [1, 3]
    assert result.widths == (64, 72)
    for clouds in result.layers:
        assert clouds.receiver.shape == clouds.transformed.shape == clouds.raw_sender.shape == (result.tokens, 2)
        assert abs(clouds.receiver.mean(axis=0)).max() < 1e-8  # centred on the receiver's mean
    assert "| 4 | 3 |" in result.table()
    assert_png(plot_pca(result, tmp_path / "pca.png"))
    with pytest.raises(AnalysisError, match="outside"):
        run_pca(sender, receiver, zoo_adapter, contexts, layers=[5])


def test_pad_refuses_a_wider_sender_and_own_works(tiny_pair):
    sender, receiver = tiny_pair  # sender values 2x8 = 16 wide, receiver 3x4 = 12
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))
    contexts = ["recall ann 3 , bob 7 . bob ?", "math 2 + 3 ?"]
    with pytest.raises(AnalysisError, match="raw_sender='own'"):
        run_pca(sender, receiver, adapter, contexts)
    result = run_pca(sender, receiver, adapter, contexts, layers=[0, 1], raw_sender="own")
    assert np.isnan(result.layers[0].centroid_shift["raw sender"])


def test_cs_plot_is_written(tiny_pair, tmp_path):
    sender, receiver = tiny_pair
    torch.manual_seed(0)
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))
    result = run_cs(sender, receiver, adapter, CSConfig(masks=2, examples_per_family=1, topk=(0, 3, 6), seeds=2, max_new_tokens=2))
    assert_png(plot_cs(result, tmp_path / "cs.png"))
