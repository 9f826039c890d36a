"""`analysis.recon`: the adapter's reconstruction loss per task set, and `densecomm analyze recon`."""

from __future__ import annotations

import json

import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.analysis import AnalysisError
from densecomm_core.analysis.recon import reconstruction_by_set
from densecomm_core.relay import sender_prefill, transform_cache
from densecomm_core.training.phase1 import reconstruction_loss
from densecomm_core.zoo import tasks
from services.cli import main

CONTEXTS = [e.context for e in tasks.make_split("test", 4)]


def adapter_for(pair):
    torch.manual_seed(0)
    return DenseAdapter(AdapterConfig(pair[0].geometry, pair[1].geometry, expansion=4))


def test_a_set_is_token_weighted_over_batches_like_one_batch(tiny_pair):
    sender, receiver = tiny_pair
    adapter = adapter_for(tiny_pair)
    sets = {"a": CONTEXTS[:5], "b": CONTEXTS[5:]}
    whole = reconstruction_by_set(sender, receiver, adapter, sets, batch_size=64)
    pieces = reconstruction_by_set(sender, receiver, adapter, sets, batch_size=2)
    for w, p in zip(whole, pieces):
        assert (w.task_set, w.examples, w.tokens) == (p.task_set, p.examples, p.tokens)
        assert p.loss == pytest.approx(w.loss, rel=1e-5) and p.relative == pytest.approx(w.relative, rel=1e-5)
    with torch.no_grad():  # one batch of a set is phase I's own loss on it
        target = sender_prefill(receiver, sets["a"])
        expected = reconstruction_loss(transform_cache(adapter, sender_prefill(sender, sets["a"]), sender, receiver,
                                                       dtype=torch.float32), target)
    assert whole[0].loss == pytest.approx(float(expected), rel=1e-5)
    assert whole[0].tokens == int(target.mask.sum()) and whole[0].examples == 5


def test_closed_gates_give_an_all_zero_cache_whose_relative_loss_is_one(tiny_pair):
    sender, receiver = tiny_pair
    adapter = adapter_for(tiny_pair)
    with torch.no_grad():
        adapter.gate_logit.fill_(-torch.inf)
    (row,) = reconstruction_by_set(sender, receiver, adapter, {"all": CONTEXTS})
    assert row.relative == pytest.approx(1.0) and row.loss > 0


def test_bad_requests_name_the_value(tiny_pair):
    sender, receiver = tiny_pair
    with pytest.raises(AnalysisError, match="task set 'empty' has no contexts"):
        reconstruction_by_set(sender, receiver, adapter_for(tiny_pair), {"empty": []})
    with pytest.raises(AnalysisError, match="batch_size must be >= 1, got 0"):
        reconstruction_by_set(sender, receiver, adapter_for(tiny_pair), {"a": CONTEXTS}, batch_size=0)


def test_analyze_recon_cli_reports_every_family_and_marks_ood(tmp_path, capsys):
    assert main(["analyze", "recon", "--zoo", "v2", "--examples", "2", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| compare (OOD) | 2 |" in out and "| owner (OOD) | 2 |" in out and "| recall | 2 |" in out
    data = json.loads((tmp_path / "recon.json").read_text())
    assert [r["task_set"] for r in data["rows"]] == ["recall", "math", "choice", "hops", "compare", "owner"]
    assert data["out_of_domain"] == ["compare", "owner"] and all(r["loss"] > 0 for r in data["rows"])


def test_analyze_recon_cli_refuses_a_count_below_one_before_loading_models(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "recon", "--examples", "0"])
    assert "--examples: must be >= 1, got 0" in capsys.readouterr().err
