"""The `densecomm` CLI: the demo's JSON table on a small slice of the test split, and error exits."""

from __future__ import annotations

import json

from services.cli import main


def test_demo_json_table(capsys):
    code = main(["demo", "--json", "--per-family", "40", "--in-process"])
    report = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"sender with input", "receiver with input", "receiver without input",
                         "dense context-aware", "dense context-unaware"}
    assert report["examples_per_family"] == 40
    unaware, with_input = rows["dense context-unaware"], rows["receiver with input"]
    assert unaware["payload_bytes_per_request"] > 0 and with_input["payload_bytes_per_request"] == 0
    assert report["via"] == "in-process"
    without = rows["receiver without input"]
    for family in with_input["accuracy"]:
        # the transferred cache alone carries the input: far above the receiver without it
        assert unaware["accuracy"][family] >= without["accuracy"][family] + 0.25, (family, unaware, without)
        assert without["accuracy"][family] <= 0.45
    assert rows["dense context-aware"]["mean"] >= with_input["mean"]
    assert unaware["flops_per_request"] < rows["dense context-aware"]["flops_per_request"]  # no re-reading of X
    assert code == 0  # the table is the product; --check turns missed targets into a failing status
    # The committed pair meets every target (unaware >= 95 % of with-input on each family, ...).
    assert all(t["met"] for t in report["targets"]), [t for t in report["targets"] if not t["met"]]
    assert main(["demo", "--json", "--per-family", "40", "--in-process", "--check"]) == 0


def test_bad_adapter_directory_is_a_clear_error(capsys, tmp_path):
    assert main(["demo", "--adapter", str(tmp_path), "--per-family", "1"]) == 2
    assert "not an adapter checkpoint" in capsys.readouterr().err


def test_demo_through_the_services_matches_in_process(capsys):
    main(["demo", "--json", "--per-family", "8", "--no-ray"])
    report = json.loads(capsys.readouterr().out)
    assert report["via"] == "local gRPC stack"
    assert report["service_matches_in_process"] == {"aware": [24, 24], "unaware": [24, 24]}
    rows = {row["method"]: row for row in report["rows"]}
    assert 0 < rows["dense context-unaware"]["wire_bytes_per_request"] < rows["dense context-unaware"]["payload_bytes_per_request"]  # lossless shrinks it


def test_demo_on_zoo_v2_through_the_services_reports_ood_apart(capsys):
    """The v2 pair's demo: six families (two OOD), the dense rows through the local gRPC stack equal the
    in-process relay, and the unaware-vs-with-input targets are stated on the in-domain families only."""
    from densecomm_core.zoo.suite import get_suite

    v2 = get_suite("v2")
    main(["demo", "--zoo", "v2", "--json", "--per-family", "4", "--no-ray"])
    report = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows["dense context-unaware"]["accuracy"]) == set(v2.family_names)
    assert report["service_matches_in_process"] == {"aware": [24, 24], "unaware": [24, 24]}
    assert report["receiver"]["num_layers"] == 3 and report["sender"]["num_layers"] == 5
    ratio_targets = [t["target"] for t in report["targets"] if t["target"].startswith("unaware/with-input")]
    assert ratio_targets == [f"unaware/with-input on {f} >= 0.95" for f in v2.in_domain]
