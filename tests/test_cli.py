"""The `densecomm` CLI: the demo's JSON table on a small slice of the test split, and error exits."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("argv, message", [
    # each was a traceback, a check after minutes of work, or no check at all (fuzzing the CLI)
    (["eval", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1, got -1"),
    (["bench", "train", "--workers", "a"], "argument --workers: must be a comma list of integers, got 'a'"),
    (["bench", "codec", "--hops", "2"], "argument --hops: must be a comma list of integers in [0, 1], got '2'"),
    (["bench", "relay", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["bench", "relay", "--frame-bytes", "-1"], "argument --frame-bytes: must be >= 0, got -1"),
    (["baseline", "c2c", "--output-dir", "x", "--p-aware", "2"], "argument --p-aware: must be in [0, 1], got 2.0"),
])
def test_bad_arguments_are_refused_by_the_parser_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--methods", ","], "--methods names no method"),
    (["eval", "--methods", "nope"], "--methods: unknown method(s) ['nope']"),
    (["eval", "--methods", "receiver", "--device", "cuda:x"], "--device 'cuda:x' must be a torch device"),
])
def test_eval_refuses_methods_and_devices_before_loading_models(capsys, monkeypatch, argv, message):
    from services import eval as service_eval

    monkeypatch.setattr(service_eval, "load_pair", lambda options: pytest.fail("loaded the models first"))
    assert main(argv) == 2 and message in capsys.readouterr().err
