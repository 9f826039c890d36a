"""`densecomm analyze cs|pca` end to end on the zoo with tiny counts; bad flags refused before any work."""

from __future__ import annotations

import json

import pytest

from services.cli import main


def test_analyze_cs_and_pca_cli(tmp_path, capsys):
    assert main(["analyze", "cs", "--masks", "2", "--examples", "1", "--topk", "0,8", "--seeds", "1",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "masks 2/2" in out and "| K (of 8) |" in out and "Spearman" in out
    assert (tmp_path / "cs_topk.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "cs.json").read_text())
    assert [row["k"] for row in data["sweep"]] == [0, 8] and len(data["mask_accuracy"]["unaware"]) == 2

    assert main(["analyze", "pca", "--examples", "2", "--layers", "0,4", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 0 |" in out and "| 4 | 3 |" in out
    assert (tmp_path / "pca_values.png").stat().st_size > 1024


@pytest.mark.parametrize("argv, message", [
    (["cs", "--masks", "0"], "--masks: must be >= 1, got 0"),
    (["cs", "--examples", "-2"], "--examples: must be >= 1, got -2"),
    (["cs", "--topk", "1,x"], "--topk: must be a comma list of integers, got '1,x'"),
    (["cs", "--topk", "-1"], "--topk: must be a comma list of integers >= 0, got '-1'"),
    (["pca", "--examples", "0"], "--examples: must be >= 1, got 0"),
    (["pca", "--layers", "a"], "--layers: must be a comma list of integers, got 'a'"),
])
def test_bad_counts_and_lists_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
