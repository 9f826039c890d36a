"""`densecomm train` configs: every bad key or value is refused before Ray starts, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.train.config import TrainConfigError, config_from_dict, load_train_config
from services.train.job import plan


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_zoo_config_loads_and_round_trips():
    config = load_train_config("zoo")
    assert config.workers.num_workers == 2 and config.phase2.input_codec == "pca"
    assert config_from_dict(config.to_dict()) == config


def test_zoo_v2_config_trains_on_v2_in_domain_families_and_its_lms():
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.suite import get_suite
    from services.train.data import load_splits
    from services.train.worker import model_paths

    from densecomm_core.zoo.suite import SUITES
    from services.train.config import ZOO_SUITES, zoo_config_name

    assert ZOO_SUITES == tuple(SUITES)  # the torch-free copy the CLI and the config check use
    assert [zoo_config_name(s) for s in ZOO_SUITES] == ["zoo", "zoo-v2"]
    v1, v2 = load_train_config("zoo"), load_train_config("zoo-v2")
    assert v2.data.suite == "v2" and config_from_dict(v2.to_dict()) == v2
    from dataclasses import replace
    from pathlib import Path

    import services.train

    mismatch = load_train_config(Path(services.train.__file__).with_name("zoo-v2-mismatch.toml"))  # the experiment:
    assert v2.phase2.p_mismatch == 0 and mismatch.phase2.p_mismatch == 0.5  # zoo-v2 plus p_mismatch, nothing else
    assert replace(mismatch, name=v2.name, output_dir=v2.output_dir, phase2=replace(mismatch.phase2, p_mismatch=0.0)) == v2
    scrambled = load_train_config(Path(services.train.__file__).with_name("zoo-v2-scrambled.toml"))  # zoo-v2 plus p_scrambled
    assert v2.phase1.p_scrambled == 0 and scrambled.phase1.p_scrambled == 0.5
    assert replace(scrambled, name=v2.name, output_dir=v2.output_dir, phase1=replace(scrambled.phase1, p_scrambled=0.0)) == v2
    anchor = load_train_config(Path(services.train.__file__).with_name("zoo-v2-anchor.toml"))  # zoo-v2 plus recon_weight
    assert v2.phase2.recon_weight == 0 and anchor.phase2.recon_weight > 0
    assert replace(anchor, name=v2.name, output_dir=v2.output_dir, phase2=replace(anchor.phase2, recon_weight=0.0)) == v2
    from services.train.worker import phase_config

    assert phase_config(anchor, "phase2").recon_weight == anchor.phase2.recon_weight  # what the Ray Train worker trains with
    vocabulary = load_train_config(Path(services.train.__file__).with_name("zoo-v2-vocabulary.toml"))  # zoo-v2 plus p_vocabulary
    assert v2.phase1.p_vocabulary == 0 and vocabulary.phase1.p_vocabulary == 0.5
    assert replace(vocabulary, name=v2.name, output_dir=v2.output_dir, phase1=replace(vocabulary.phase1, p_vocabulary=0.0)) == v2
    splits = load_splits(v2)
    assert {e.family for e in splits.train} == set(get_suite("v2").in_domain)  # OOD families never trained on
    assert len(splits.validation) == v2.data.validation_size and len(splits.test) == v2.data.test_size
    assert {e.family for e in splits.train if e.multiple_choice} == {"choice"}
    assert model_paths(v2)["sender"].endswith("zoo2-qwen3-sender") and model_paths(v2)["receiver"].endswith("zoo2-llama-receiver")
    want = tasks.make_split("validation", 50)  # v1 is unchanged by the suite field
    assert [(e.family, e.question, e.answer) for e in load_splits(v1).validation] == [(e.family, e.context, e.answer) for e in want]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bogus = 1", r"unknown key\(s\) \['bogus'\] in the top level"),
        ("[phase1]\nstep = 10", r"unknown key\(s\) \['step'\] in \[phase1\]"),
        ("[nonsense]\na = 1", r"unknown key\(s\) \['nonsense'\]"),
        ("[phase1]\nlr = 'fast'", r"\[phase1\]\.lr must be float, got 'fast'"),
        ("[phase1]\nsteps = 2.5", r"\[phase1\]\.steps must be int"),
        ("[workers]\nuse_gpu = 1", r"\[workers\]\.use_gpu must be bool"),
        ("[phase1]\nlr = -1.0", r"\[phase1\]\.lr must be > 0, got -1.0"),
        ("[phase2]\nbatch_size = 31", r"\[phase2\]\.batch_size must be divisible by \[workers\]\.num_workers \(2\), got 31"),
        ("[phase1]\nsteps = 10\nwarmup_steps = 10", r"\[phase1\]\.warmup_steps must be in \[0, steps\), got 10"),
        ("[models]\nsender = '/no/such/model'", r"\[models\]\.sender must be 'zoo' or an existing local model directory"),
        ("[models]\ndtype = 'int8'", r"\[models\]\.dtype must be one of"),
        ("[models]\nreceiver_device = 'cuda:1'", r"\[models\]\.receiver_device is 'cuda:1' but \[workers\]\.use_gpu is false"),
        ("[models]\nsender_device = 'tpu'", r"\[models\]\.sender_device must be 'auto', 'cpu' or 'cuda\[:N\]'"),
        ("[models]\nsender_device = 'cuda:x'", r"\[models\]\.sender_device must be 'auto', 'cpu' or 'cuda\[:N\]', got 'cuda:x'"),
        ("[workers]\nuse_gpu = true\n[models]\nreceiver_device = 'cuda:1'",
         r"\[models\]\.receiver_device is 'cuda:1' but a worker has \[workers\]\.gpus_per_worker = 1 GPU\(s\).*must be < gpus_per_worker"),
        ("[workers]\nuse_gpu = true\ngpus_per_worker = 2\n[models]\nsender_device = 'cuda:2'",
         r"\[models\]\.sender_device is 'cuda:2' but a worker has \[workers\]\.gpus_per_worker = 2 GPU\(s\)"),
        ("[data]\nsource = 'gsm8k'", r"\[data\]\.train is required for source 'gsm8k'"),
        ("[data]\nsource = 'imagenet'", r"\[data\]\.source must be one of"),
        ("[data]\nsuite = 'v9'", r"\[data\]\.suite must be one of \('v1', 'v2'\), got 'v9'"),
        ("[data]\nsource = 'gsm8k'\ntrain = '/no/such.jsonl'", r"\[data\]\.train file '/no/such.jsonl' does not exist"),
        ("[prompts]\nguided = '{context} =>'", r"\[prompts\]\.guided must contain '\{answer\}'"),
        ("[prompts]\nanswer_kind = 'vibes'", r"\[prompts\]\.answer_kind must be one of"),
        ("[phase2]\ninput_codec = 'quantized'\ninput_codec_params = { key_bits = 5 }", r"\[phase2\]\.input_codec 'quantized'"),
        ("[adapter]\ngate_init = 1.0", r"\[adapter\]\.gate_init must be in \(0, 1\)"),
        ("[phase1]\np_scrambled = 1.5", r"\[phase1\]\.p_scrambled must be in \[0, 1\], got 1.5"),
        ("[phase1]\np_vocabulary = -0.1", r"\[phase1\]\.p_vocabulary must be in \[0, 1\], got -0.1"),
        ("[phase2]\np_aware = 2.0", r"\[phase2\]\.p_aware must be in \[0, 1\], got 2.0"),
        ("[phase2]\np_vocabulary = 0.5", r"\[phase2\]\.p_vocabulary applies to \[phase1\] only, got 0.5"),
        ("[phase1]\np_mismatch = 0.5", r"\[phase1\]\.p_mismatch applies to \[phase2\] only, got 0.5"),
        ("[phase2]\nrecon_weight = -1.0", r"\[phase2\]\.recon_weight must be >= 0, got -1.0"),
        ("[phase2]\nrecon_weight = inf", r"\[phase2\]\.recon_weight must be a finite number, got inf"),
        ("[phase1]\nrecon_weight = 0.1", r"\[phase1\]\.recon_weight applies to \[phase2\] only, got 0.1"),
        ("[phase1]\ninput_codec = 'pca'", r"\[phase1\]\.input_codec applies to \[phase2\] only, got 'pca'"),
        ("name = 'a b'", r"name must be letters, digits"),
        ("[fault]\nphase = 'phase3'", r"\[fault\]\.phase must be"),
        # found by fuzzing: a traceback, or a value that would fail mid-training or be ignored
        ("[workers]\nnum_workers = 0", r"\[workers\]\.num_workers must be >= 1, got 0"),
        ("[workers]\nuse_gpu = true\n[models]\nsender_device = 'cuda:\u00b2'", r"\[models\]\.sender_device must be 'auto', 'cpu' or 'cuda\[:N\]'"),
        ("[prompts]\nsender = '{context} {oops}'", r"\[prompts\]\.sender '\{context\} \{oops\}' must use only \{context\}.*KeyError"),
        ("[prompts]\naware = '{context} {'", r"\[prompts\]\.aware .* must use only \{context\}.*ValueError"),
        ("[prompts]\nguided = '{context} {answer} {0}'", r"\[prompts\]\.guided .* must use only \{context\}, \{answer\}.*IndexError"),
        ("[phase1]\nlr = inf", r"\[phase1\]\.lr must be a finite number, got inf"),
        ("[phase2]\ngate_lr_multiplier = nan", r"\[phase2\]\.gate_lr_multiplier must be a finite number"),
        ("[data]\nsubject = 'Algebra'", r"\[data\]\.subject selects MATH subjects: it needs source = 'math', got 'zoo'"),
        ("[phase2]\ninput_codec = ''\ninput_codec_params = { level = 3 }", r"\[phase2\]\.input_codec_params are set but \[phase2\]\.input_codec is not"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, match):
    with pytest.raises(TrainConfigError, match=match):
        load_train_config(write(tmp_path, text))


def test_cuda_indices_count_the_workers_own_gpus(tmp_path):
    """"cuda:N" names the N-th GPU of a worker (Ray Train's get_devices()), so N < gpus_per_worker is accepted."""
    two = load_train_config(write(tmp_path, "[workers]\nuse_gpu = true\ngpus_per_worker = 2\n"
                                            "[models]\nsender_device = 'cuda:0'\nreceiver_device = 'cuda:1'"))
    assert (two.models.sender_device, two.models.receiver_device) == ("cuda:0", "cuda:1")
    shared = load_train_config(write(tmp_path, "[workers]\nuse_gpu = true\ngpus_per_worker = 0.5\n"
                                               "[models]\nsender_device = 'cuda'\nreceiver_device = 'cuda:0'"))
    assert shared.models.receiver_device == "cuda:0"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_train_config(tmp_path / "absent.toml")
    with pytest.raises(TrainConfigError, match="not valid TOML"):
        load_train_config(write(tmp_path, "[phase1\nsteps = 3"))


def test_a_config_extends_another_key_by_key(tmp_path):
    """``extends`` reads the named config first (a built-in name, or a path relative to the file); the file's
    keys replace its keys section by section, so the other keys of a section it touches are kept."""
    from dataclasses import replace

    (tmp_path / "base.toml").write_text("seed = 3\n[phase1]\nsteps = 400\nlr = 0.01\n[phase2]\nsteps = 500\n")
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\nname = "child"\n[phase1]\nsteps = 200\n')
    config, base = load_train_config(child), load_train_config(tmp_path / "base.toml")
    assert (config.seed, config.phase1.steps, config.phase1.lr, config.phase2.steps) == (3, 200, 0.01, 500)
    assert replace(config, name=base.name, phase1=replace(config.phase1, steps=400)) == base
    v2 = load_train_config("zoo-v2")
    child.write_text('extends = "zoo-v2"\n[phase2]\np_aware = 0.5\n')  # a built-in name
    assert replace(load_train_config(child), phase2=replace(v2.phase2, p_aware=0.5)) == replace(v2, phase2=replace(v2.phase2, p_aware=0.5))
    child.write_text('extends = "absent.toml"\n')
    with pytest.raises(TrainConfigError, match="absent.toml' does not exist"):
        load_train_config(child)
    child.write_text('extends = "child.toml"\n')
    with pytest.raises(TrainConfigError, match="extends 'child.toml' leads back to .*cannot extend themselves"):
        load_train_config(child)
    child.write_text("extends = 3\n")
    with pytest.raises(TrainConfigError, match="extends must be a built-in config name or a path, got 3"):
        load_train_config(child)


def test_dry_run_plan_checks_the_data_and_starts_nothing(tmp_path):
    from dataclasses import replace

    import ray

    config = load_train_config("zoo", output_dir=str(tmp_path / "out"))
    text = plan(config)
    assert "train 9000, validation 150, test 600" in text
    assert "16 per worker" in text and "DDP over the adapter" in text
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
    assert "reconstruction anchor" not in text
    anchored = replace(config, phase2=replace(config.phase2, recon_weight=0.1))
    assert plan(anchored).splitlines()[-2].endswith(", reconstruction anchor x0.1")  # the phase2 line


def test_progress_line_shows_phase_twos_reconstruction_when_anchored():
    from services.train.job import progress_line

    record = {"phase": "phase2", "step": 600, "steps": 9000, "loss": 0.05, "tokens_per_s": 900.0, "seconds_per_step": 0.12,
              "eta_s": 61.0, "validation_aware_mean": 0.9, "validation_unaware_mean": 0.8}
    assert "reconstruction" not in progress_line(record)
    assert progress_line(record | {"validation_recon_loss": 0.1234}).endswith("unaware 0.800  reconstruction 0.1234")


def test_cli_dry_run_and_error_exit(tmp_path, capsys):
    from services.cli import main

    assert main(["train", "--config", "zoo", "--dry-run", "--output-dir", str(tmp_path / "o")]) == 0
    assert "phase2: 3600 steps" in capsys.readouterr().out
    assert main(["train", "--config", str(write(tmp_path, "[phase1]\nlr = 0.0"))]) == 2
    assert "[phase1].lr must be > 0" in capsys.readouterr().err


def test_gsm8k_file_config_plans_and_bad_rows_name_file_and_line(tmp_path, capsys):
    from services.cli import main

    text = f"""
[data]
source = "gsm8k"
train = "{tmp_path / 'train.jsonl'}"
validation = "tests/data/gsm8k.jsonl"
train_size = 0
[prompts]
sender = "Question: {{context}}"
aware = "Question: {{context}} Answer:"
unaware = "Answer:"
with_input = "Question: {{context}} Answer:"
guided = "Question: {{context}} The answer is {{answer}}. Solution:"
answer_kind = "number"
answer_template = "#### {{answer}}"
"""
    extra = '{"question": "Tom has 2 cats and gets 3 more. How many cats?", "answer": "2 + 3 = 5\\n#### 5"}\n'
    (tmp_path / "train.jsonl").write_text(Path("tests/data/gsm8k.jsonl").read_text() + extra)
    config = write(tmp_path, text)
    assert main(["train", "--config", str(config), "--dry-run", "--output-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    from densecomm_core.data import load_task_file

    n_validation = len(load_task_file("tests/data/gsm8k.jsonl", "gsm8k"))
    assert f"data: gsm8k; train 1, validation {n_validation}," in out  # the validation file's questions are never trained on
    (tmp_path / "train.jsonl").write_text(Path("tests/data/gsm8k.jsonl").read_text())
    assert main(["train", "--config", str(config), "--dry-run", "--output-dir", str(tmp_path / "o")]) == 2
    assert "yields no training examples" in capsys.readouterr().err
    (tmp_path / "train.jsonl").write_text('{"question": "q?", "answer": "no final marker"}\n')
    assert main(["train", "--config", str(config), "--dry-run", "--output-dir", str(tmp_path / "o")]) == 2
    assert "train.jsonl:1" in capsys.readouterr().err


def test_resume_refuses_a_run_whose_training_settings_changed_and_names_them(tmp_path):
    """A resumed phase would continue its checkpoint under another objective (e.g. a new recon_weight) and the
    adapter would record only the new recipe: --resume refuses every change but where and how the run executes."""
    from dataclasses import replace

    from services.train.job import RunState, RunStateError, changed_settings

    config = load_train_config("zoo-v2", output_dir=str(tmp_path / "run"))
    RunState.open(config, resume=False)  # a run started with this config
    assert RunState.open(config, resume=True).data["config"] == config.to_dict()
    moved = replace(config, workers=replace(config.workers, num_workers=1, cpus_per_worker=2.0),
                    models=replace(config.models, sender_device="cpu"), fault=replace(config.fault, phase="phase2", step=3))
    RunState.open(moved, resume=True)  # where and how it runs may change
    anchored = replace(config, phase2=replace(config.phase2, recon_weight=0.01), seed=1)
    with pytest.raises(RunStateError, match=r"settings other than the run in .*: seed 0 -> 1; "
                                            r"\[phase2\]\.recon_weight 0\.0 -> 0\.01\. A resumed run trains what it started"):
        RunState.open(anchored, resume=True)
    saved = config.to_dict()
    del saved["phase2"]["recon_weight"]  # a run started before the field existed: its default
    assert changed_settings(saved, config) == []
    assert changed_settings(saved, anchored)[-1] == "[phase2].recon_weight 0.0 -> 0.01"
    with pytest.raises(RunStateError, match=r"\[data\]\.train_size 12000 -> 100"):
        RunState.open(replace(config, data=replace(config.data, train_size=100)), resume=True)
