"""`densecomm eval` on the zoo pair with a handful of examples: tables printed, CSV and JSON written."""

from __future__ import annotations

import csv
import json

from services.cli import main


def test_eval_command_writes_csv_json_and_prints_tables(tmp_path, capsys):
    code = main(["eval", "--limit", "4", "--codec", "quantized", "--output-dir", str(tmp_path), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    for heading in ("## Accuracy (%)", "## Tokens and FLOPs per request on the zoo models", "qwen3-14b->qwen3-4b",
                    "## Targets (issue 10)"):
        assert heading in printed
    assert "| t2t | aware |" in printed and "| dense+quantized | unaware |" in printed
    rows = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    # sender, receiver, receiver-without-input: 1 mode; t2t, dense, c2c (the zoo's committed fuser),
    # dense+quantized: 2 modes; 3 zoo families
    assert len(rows) == (3 + 4 * 2) * 3 and all(int(r["requests"]) == 4 for r in rows)
    report = json.loads((tmp_path / "eval.json").read_text())
    tokens = {(t["method"], t["mode"], t["pair"]): t for t in report["tokens"]}
    assert tokens[("t2t", "aware", "zoo")]["S_dec"] > 0 and tokens[("dense", "aware", "zoo")]["S_dec"] == 0
    assert tokens[("c2c", "unaware", "zoo")]["S_dec"] == 0 and tokens[("c2c", "aware", "qwen3-14b->qwen3-4b")]["flops_adapter"] > 0
    assert tokens[("dense", "unaware", "qwen3-14b->qwen3-4b")]["flops_adapter"] > 0
    assert {t["status"] for t in report["targets"]} <= {"ok", "missed", "info"}
    assert any(t["name"].startswith("C2C unaware") for t in report["targets"])
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").open()]
    assert len(predictions) == len(rows) * 4
    assert all(("message" in p) == (p["method"] == "t2t") for p in predictions)


def test_eval_on_zoo_v2_marks_ood_and_uses_the_suites_t2t_layout(tmp_path, capsys):
    from densecomm_core.zoo import tasks_v2
    from services.eval import EvalOptions, load_pair

    pair = load_pair(EvalOptions(zoo="v2"))
    assert (pair.prompt_format.t2t_aware, pair.prompt_format.t2t_unaware) == (tasks_v2.MESSAGE_AWARE, tasks_v2.MESSAGE_UNAWARE)
    assert pair.receiver.geometry.num_layers == 3 and pair.fuser is not None  # the v2 pair's committed fuser
    code = main(["eval", "--zoo", "v2", "--limit", "2", "--methods", "receiver,t2t,dense", "--output-dir", str(tmp_path), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "compare (OOD)" in printed and "owner (OOD)" in printed and "OOD mean" in printed
    rows = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    assert len(rows) == (1 + 2 + 2) * 6
    assert {r["task"] for r in rows if r["in_domain"] == "False"} == {"compare", "owner"}
    assert any(t["name"].endswith("on compare (OOD, reported)") for t in json.loads((tmp_path / "eval.json").read_text())["targets"])


def test_eval_dtype_of_local_checkpoints_defaults_by_device(monkeypatch, capsys):
    """--dtype reaches load_model for both models; unset it is bfloat16 on CUDA and float32 (as before) on the
    CPU. The models load on the CPU here: the recording load_model only notes the device it was asked for."""
    import pytest
    import torch

    import densecomm_core.models as models
    from densecomm_core.evaluation.methods import EvaluationError
    from densecomm_core.zoo.pair import zoo_model_dirs
    from services import eval as evaluation
    from services.eval import EvalOptions, load_pair

    real, calls = models.load_model, []

    def recording_load_model(path, dtype=None, device="cpu"):
        calls.append((str(path), dtype, str(device)))
        return real(path, dtype=dtype)

    monkeypatch.setattr(models, "load_model", recording_load_model)
    sender, receiver = (str(d) for d in zoo_model_dirs())
    for device, dtype, want in (("cpu", "", torch.float32), ("cuda:1", "", torch.bfloat16), ("cpu", "float16", torch.float16)):
        calls.clear()
        pair = load_pair(EvalOptions(sender=sender, receiver=receiver, device=device, dtype=dtype))
        assert calls == [(sender, want, device), (receiver, want, device)]
        assert pair.sender.model.dtype == pair.receiver.model.dtype == want and pair.adapter is None
    with pytest.raises(EvaluationError, match=r"--dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'int8'"):
        load_pair(EvalOptions(sender=sender, receiver=receiver, dtype="int8"))
    calls.clear()
    with pytest.raises(EvaluationError, match="--dtype applies to --sender/--receiver checkpoints; the zoo pair runs as committed"):
        load_pair(EvalOptions(dtype="bfloat16"))
    assert calls == []
    assert load_pair(EvalOptions()).receiver.model.dtype == torch.float32 and calls == []  # the zoo pair: as before

    class Ran(Exception):
        pass

    def fake_run(options, progress=None):
        raise Ran(options)

    monkeypatch.setattr(evaluation, "run", fake_run)
    for argv, want in (([], ""), (["--dtype", "bfloat16"], "bfloat16")):
        with pytest.raises(Ran) as caught:
            main(["eval", "--sender", sender, "--receiver", receiver, "--device", "cuda", *argv, "--quiet"])
        assert (caught.value.args[0].dtype, caught.value.args[0].device) == (want, "cuda")
    with pytest.raises(SystemExit):
        main(["eval", "--dtype", "int8"])
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err
