"""The typed configuration of a `densecomm train` run, read once from TOML and checked before Ray starts.

Example (``densecomm train --config run.toml``; every field below is optional except where noted)::

    name = "qwen3-14b-to-4b"
    output_dir = "runs/qwen3-14b-to-4b"
    seed = 0

    [models]
    sender = "/models/Qwen3-14B"      # a local Hugging Face directory, or "zoo" for the embedded sender
    receiver = "/models/Qwen3-4B"
    dtype = "bfloat16"
    sender_device = "cuda:0"          # the worker's own GPUs, N < gpus_per_worker; "auto" = the worker's own device
    receiver_device = "cuda:1"

    [data]
    source = "gsm8k"
    train = "/data/gsm8k/train.jsonl"

    [workers]
    num_workers = 4
    use_gpu = true
    gpus_per_worker = 2

    [phase1]
    steps = 2000

Unknown keys and bad values raise ``TrainConfigError`` naming the field (``[phase1].lr``) and what it
accepts. ``--config zoo`` is the embedded pair's recipe (``services/train/zoo.toml``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from densecomm_core.errors import DenseCommError

DTYPES = ("float32", "bfloat16", "float16")
ZOO_SUITES = ("v1", "v2")  # densecomm_core.zoo.suite.SUITES (not imported: config parsing stays torch-free)
DATA_SOURCES = ("zoo", "gsm8k", "math", "arc", "mmlu-redux", "medqa", "openbookqa", "jsonl")  # densecomm_core.data.FORMATS
ANSWER_KINDS = ("word", "number", "letter", "boxed")
STAGES = ("traces", "phase1", "phase2", "finalize")
BUILTIN = {"zoo": Path(__file__).with_name("zoo.toml"), "zoo-v2": Path(__file__).with_name("zoo-v2.toml")}  # configs shipped with the package, by name


def zoo_config_name(suite: str) -> str:
    """The built-in config that trains the adapter of ``suite``'s zoo pair (v1: ``zoo``, v2: ``zoo-v2``)."""
    return "zoo" if suite == "v1" else f"zoo-{suite}"


class TrainConfigError(DenseCommError, ValueError):
    """A training config names a missing file, an unknown field or a bad value."""


@dataclass(frozen=True)
class ModelsConfig:
    sender: str = "zoo"  # local HF directory, or "zoo" (the committed embedded sender)
    receiver: str = "zoo"
    dtype: str = "float32"  # weights of both frozen models: float32 | bfloat16 | float16 (adapter math stays fp32)
    # Devices inside a worker. "auto": the worker's own device (its GPU with use_gpu, else cpu). A worker with
    # gpus_per_worker = 2 can hold the sender on "cuda:0" and the receiver on "cuda:1": indices are of the worker's
    # own GPUs (its ray.train.torch.get_devices(), not the node's), so N < gpus_per_worker. The adapter lives with
    # the receiver, whose cache it writes.
    sender_device: str = "auto"
    receiver_device: str = "auto"


@dataclass(frozen=True)
class PromptsConfig:
    """How inputs and answers are rendered ({context} is X, {answer} the gold answer). Defaults: the zoo's."""

    sender: str = "{context}"  # what the sender prefills
    aware: str = "{context} =>"  # receiver prompt after the cache, context-aware
    unaware: str = "=>"  # receiver prompt after the cache, context-unaware
    with_input: str = "{context} =>"  # a model answering from X alone
    guided: str = "{context} hint {answer} =>"  # receiver-self trace construction: X plus the gold answer
    # reading a final answer: word (the zoo's "answer X"), number (the last number), letter (the canonical
    # answer-letter form), boxed (the last \\boxed{}, else the last number)
    answer_kind: str = "word"
    answer_template: str = "answer {answer}"  # the canonical final answer statement (multiple-choice relabelling)


@dataclass(frozen=True)
class DataConfig:
    # zoo | gsm8k | math | arc | mmlu-redux | medqa | openbookqa (their public JSONL formats) | jsonl (generic
    # question/answer(/choices) rows). Files are read locally, every row checked; nothing is downloaded.
    source: str = "zoo"
    train: str = ""  # JSONL path (required unless source = "zoo")
    validation: str = ""  # JSONL path; empty = carved from train by a hash of the question
    test: str = ""  # JSONL path, evaluated once at the end (never used to choose anything)
    train_size: int = 9000  # training examples (zoo: generated, evenly over families; files: 0 = all)
    validation_size: int = 150  # validation examples used for evaluation and checkpoint selection
    test_size: int = 600
    validation_fraction: float = 0.05  # share of train carved out as validation when no file is given
    subject: str = ""  # math: keep only this subject (e.g. "Algebra"); empty = all
    # zoo: the task suite (densecomm_core.zoo.suite): its in-domain families are the data, and [models] "zoo"
    # names that suite's committed LMs. v1 = the committed default zoo, v2 = the generalising zoo.
    suite: str = "v1"


@dataclass(frozen=True)
class TracesConfig:
    max_new_tokens: int = 32
    batch_size: int = 128  # guided prompts decoded together
    tasks: int = 0  # Ray tasks the requests are spread over (0 = num_workers)


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase. Batches are global: each of the N workers computes batch_size / N examples."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    gate_lr_multiplier: float = 10.0  # the gates' rate relative to the MLPs' (one scalar per layer and group)
    log_every: int = 25  # progress line + metrics.jsonl record every this many steps
    eval_every: int = 400  # validation (phase1: reconstruction loss; phase2: accuracy in both regimes)
    checkpoint_every: int = 200  # Ray Train checkpoint (adapter, optimizer, step, RNG, loss curve)
    eval_size: int = 0  # validation examples evaluated at each eval_every (0 = all of [data].validation_size)
    # phase 2 only
    p_aware: float = 0.5  # probability that an example is context-aware (paper appendix A)
    input_codec: str = ""  # codec-aware batches: registry name of a codec the sender cache goes through ("" = none)
    input_codec_params: dict = field(default_factory=dict)
    p_input_codec: float = 0.5
    # context-aware examples whose cache is the sender's cache of another example (0 = the paper's recipe)
    p_mismatch: float = 0.0
    # phase I's reconstruction loss kept in phase II with this weight, an anchor to the receiver's own cache (0 = the paper's recipe)
    recon_weight: float = 0.0
    # phase 1 only: texts replaced by their words and another context's, scrambled (0 = the paper's recipe)
    p_scrambled: float = 0.0
    # phase 1 only: texts replaced by random words of the tokenizer's whole vocabulary (0 = the paper's recipe)
    p_vocabulary: float = 0.0


# Data options of one phase; set in the other phase's section they are an error, not silently ignored.
PHASE_ONLY = {"phase1": ("p_scrambled", "p_vocabulary"), "phase2": ("p_mismatch", "input_codec", "input_codec_params", "recon_weight")}


@dataclass(frozen=True)
class AdapterSection:
    expansion: int = 16  # hidden width e·d_S of each K/V MLP (paper: 16)
    gate_init: float = 0.5  # initial γ (logit 0: where the gates receive the most gradient)


@dataclass(frozen=True)
class WorkersConfig:
    num_workers: int = 2  # data-parallel Ray Train workers (DDP over the adapter's parameters)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu; 2 lets sender and receiver sit on different GPUs
    torch_threads: int = 1  # intra-op threads per worker (CPU workers)
    max_failures: int = 2  # Ray Train restarts the worker group this often, resuming from the last checkpoint
    ray_address: str = ""  # join this cluster ("" = RAY_ADDRESS, else a local Ray on 127.0.0.1)


@dataclass(frozen=True)
class OutputConfig:
    calibrate_bases: bool = True  # fit the pca codec's basis of the adapter's output space into the adapter dir
    tensorboard: bool = True  # TensorBoard event files next to metrics.jsonl (needs tensorboardX)


@dataclass(frozen=True)
class FaultConfig:
    """Testing recovery: raise inside one worker once, at a given phase and step."""

    phase: str = ""  # "", "phase1" or "phase2"
    step: int = 0
    rank: int = 0


@dataclass(frozen=True)
class TrainConfig:
    name: str = "densecomm"
    output_dir: str = "runs/densecomm"
    seed: int = 0
    models: ModelsConfig = field(default_factory=ModelsConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    phase1: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=2400, lr=1e-3, eval_every=400))
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=3600, lr=3e-4, warmup_steps=30, eval_every=600))
    adapter: AdapterSection = field(default_factory=AdapterSection)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"models": ModelsConfig, "prompts": PromptsConfig, "data": DataConfig, "traces": TracesConfig,
            "phase1": PhaseConfig, "phase2": PhaseConfig, "adapter": AdapterSection, "workers": WorkersConfig,
            "output": OutputConfig, "fault": FaultConfig}


def _typed(cls, data: Any, where: str, base=None):
    """Build dataclass ``cls`` from a TOML table, over ``base``'s values; every key and type checked."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where} must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TrainConfigError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    base = base if base is not None else cls()
    for key, value in data.items():
        want = type(getattr(base, key))
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise TrainConfigError(f"{where}.{key} must be {want.__name__}, got {value!r}")
        if want is float and not math.isfinite(value):  # TOML has nan and inf; no setting means them
            raise TrainConfigError(f"{where}.{key} must be a finite number, got {value!r}")
    return replace(base, **{k: (float(v) if type(getattr(base, k)) is float else v) for k, v in data.items()})


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise TrainConfigError(f"{field_name} {message}")


def validate(config: TrainConfig) -> TrainConfig:
    """Every value's range and every cross-field rule; files must exist. Returns ``config``."""
    m, d, p, w = config.models, config.data, config.prompts, config.workers
    _check(bool(config.name) and all(c.isalnum() or c in "-_." for c in config.name), "name",
           f"must be letters, digits, '-', '_' or '.', got {config.name!r}")
    _check(bool(config.output_dir), "output_dir", "must be set")
    for side in ("sender", "receiver"):
        path = getattr(m, side)
        _check(path == "zoo" or Path(path).expanduser().is_dir(), f"[models].{side}",
               f"must be 'zoo' or an existing local model directory, got {path!r}")
        device = getattr(m, f"{side}_device")
        index = device[5:] if device.startswith("cuda:") else "0"
        _check(device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", device) is not None, f"[models].{side}_device",
               f"must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
        _check(not device.startswith("cuda") or w.use_gpu, f"[models].{side}_device",
               f"is {device!r} but [workers].use_gpu is false")
        _check(not device.startswith("cuda") or int(index) < w.gpus_per_worker, f"[models].{side}_device",
               f"is {device!r} but a worker has [workers].gpus_per_worker = {w.gpus_per_worker:g} GPU(s): "
               f"N in 'cuda:N' counts the worker's own GPUs and must be < gpus_per_worker")
    _check(m.dtype in DTYPES, "[models].dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    for key in ("sender", "aware", "with_input", "guided"):
        _check("{context}" in getattr(p, key), f"[prompts].{key}", "must contain '{context}'")
    for key, slots in (("sender", ("context",)), ("aware", ("context",)), ("unaware", ("context",)),
                       ("with_input", ("context",)), ("guided", ("context", "answer")), ("answer_template", ("answer",))):
        try:  # a stray brace or another placeholder would fail in the middle of training
            getattr(p, key).format(**{slot: "" for slot in slots})
        except (KeyError, IndexError, ValueError) as exc:
            raise TrainConfigError(f"[prompts].{key} {getattr(p, key)!r} must use only {{{'}, {'.join(slots)}}} "
                                   f"(write a literal brace as {{{{ or }}}}): {type(exc).__name__}: {exc}") from exc
    _check("{answer}" in p.guided, "[prompts].guided", "must contain '{answer}'")
    _check("{answer}" in p.answer_template, "[prompts].answer_template", "must contain '{answer}'")
    _check(p.answer_kind in ANSWER_KINDS, "[prompts].answer_kind", f"must be one of {ANSWER_KINDS}, got {p.answer_kind!r}")
    _check(d.source in DATA_SOURCES, "[data].source", f"must be one of {DATA_SOURCES}, got {d.source!r}")
    _check(d.source == "zoo" or bool(d.train), "[data].train", f"is required for source {d.source!r}")
    _check(not d.subject or d.source == "math", "[data].subject", f"selects MATH subjects: it needs source = 'math', got {d.source!r}")
    _check(d.suite in ZOO_SUITES, "[data].suite", f"must be one of {ZOO_SUITES}, got {d.suite!r}")
    _check(d.suite == "v1" or d.source == "zoo", "[data].suite", f"is {d.suite!r}: a zoo suite needs source = 'zoo', got {d.source!r}")
    for key in ("train", "validation", "test"):
        path = getattr(d, key)
        _check(not path or Path(path).expanduser().is_file(), f"[data].{key}", f"file {path!r} does not exist")
    _check(d.train_size >= 0 and d.validation_size > 0 and d.test_size >= 0, "[data]",
           "train_size and test_size must be >= 0 and validation_size > 0")
    _check(0 < d.validation_fraction < 0.5, "[data].validation_fraction", f"must be in (0, 0.5), got {d.validation_fraction}")
    _check(config.traces.max_new_tokens > 0 and config.traces.batch_size > 0 and config.traces.tasks >= 0, "[traces]",
           "max_new_tokens and batch_size must be > 0, tasks >= 0")
    _check(w.num_workers >= 1, "[workers].num_workers", f"must be >= 1, got {w.num_workers}")  # before dividing by it
    for name in ("phase1", "phase2"):
        ph: PhaseConfig = getattr(config, name)
        _check(ph.steps > 0, f"[{name}].steps", f"must be > 0, got {ph.steps}")
        _check(ph.batch_size >= w.num_workers, f"[{name}].batch_size",
               f"must be >= [workers].num_workers ({w.num_workers}), got {ph.batch_size}")
        _check(ph.batch_size % w.num_workers == 0, f"[{name}].batch_size",
               f"must be divisible by [workers].num_workers ({w.num_workers}), got {ph.batch_size}")
        _check(ph.lr > 0, f"[{name}].lr", f"must be > 0, got {ph.lr}")
        _check(0 <= ph.warmup_steps < ph.steps, f"[{name}].warmup_steps", f"must be in [0, steps), got {ph.warmup_steps}")
        _check(ph.weight_decay >= 0 and ph.gate_lr_multiplier > 0, f"[{name}]", "weight_decay must be >= 0, gate_lr_multiplier > 0")
        for key in ("log_every", "eval_every", "checkpoint_every"):
            _check(getattr(ph, key) > 0, f"[{name}].{key}", f"must be > 0, got {getattr(ph, key)}")
        _check(0 <= ph.eval_size, f"[{name}].eval_size", f"must be >= 0, got {ph.eval_size}")
        _check(ph.recon_weight >= 0, f"[{name}].recon_weight", f"must be >= 0, got {ph.recon_weight}")
        for key in ("p_aware", "p_input_codec", "p_mismatch", "p_scrambled", "p_vocabulary"):
            _check(0 <= getattr(ph, key) <= 1, f"[{name}].{key}", f"must be in [0, 1], got {getattr(ph, key)}")
        other = "phase2" if name == "phase1" else "phase1"
        for key in PHASE_ONLY[other]:  # the other phase's data options would be silently ignored here
            _check(not getattr(ph, key), f"[{name}].{key}", f"applies to [{other}] only, got {getattr(ph, key)!r}")
    _check(config.phase2.input_codec or not config.phase2.input_codec_params, "[phase2].input_codec_params",
           "are set but [phase2].input_codec is not: name the codec they are for")
    if config.phase2.input_codec:
        from densecomm_core.codec import get_codec

        try:
            get_codec(config.phase2.input_codec, **config.phase2.input_codec_params)
        except (ValueError, TypeError) as exc:
            raise TrainConfigError(f"[phase2].input_codec {config.phase2.input_codec!r}: {exc}") from exc
    _check(config.adapter.expansion >= 1, "[adapter].expansion", f"must be >= 1, got {config.adapter.expansion}")
    _check(0 < config.adapter.gate_init < 1, "[adapter].gate_init", f"must be in (0, 1), got {config.adapter.gate_init}")
    _check(w.cpus_per_worker > 0 and w.torch_threads >= 1 and w.max_failures >= 0, "[workers]",
           "cpus_per_worker must be > 0, torch_threads >= 1, max_failures >= 0")
    _check(not w.use_gpu or w.gpus_per_worker > 0, "[workers].gpus_per_worker", "must be > 0 with use_gpu")
    _check(config.fault.phase in ("", "phase1", "phase2"), "[fault].phase", f"must be '', 'phase1' or 'phase2', got {config.fault.phase!r}")
    return config


def read_train_toml(path: str | Path | None, seen: tuple[str, ...] = ()) -> dict:
    """A config file's table (``path``: a file or a built-in name). With ``extends = "<built-in name or path,
    relative to this file>"``, the named config's table comes first and this file's keys replace its keys,
    section by section: an experiment states only what it changes."""
    from services.config import read_toml

    file = BUILTIN.get(str(path), path)
    data = read_toml(file, TrainConfigError)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    _check(isinstance(parent, str) and parent != "", "extends", f"must be a built-in config name or a path, got {parent!r}")
    parent_file = BUILTIN.get(parent, Path(file).parent / parent)
    _check(str(Path(parent_file).resolve()) not in (*seen, str(Path(file).resolve())), "extends",
           f"{parent!r} leads back to {str(file)!r}: configs cannot extend themselves")
    merged = read_train_toml(parent_file, (*seen, str(Path(file).resolve())))
    for key, value in data.items():
        merged[key] = merged.get(key, {}) | value if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_train_config(path: str | Path | None, **overrides) -> TrainConfig:
    """Defaults, then the TOML file (and the configs it ``extends``), then top-level overrides; validated."""
    data = read_train_toml(path)
    data |= {k: v for k, v in overrides.items() if v is not None}
    base = TrainConfig()
    sections = {name: _typed(cls, data.pop(name, {}), f"[{name}]", getattr(base, name)) for name, cls in SECTIONS.items()}
    top = _typed(TrainConfig, data, "the top level", base)
    # Absolute before anything runs: Ray Train workers start in their own working directory.
    top = replace(top, output_dir=str(Path(top.output_dir).expanduser().resolve()) if top.output_dir else "")
    return validate(replace(top, **sections))


def config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a config from ``TrainConfig.to_dict()`` (what a checkpoint and the workers receive)."""
    data = dict(data)
    sections = {name: cls(**data.pop(name)) for name, cls in SECTIONS.items()}
    return TrainConfig(**data, **sections)
