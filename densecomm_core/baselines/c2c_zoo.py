"""The C2C-style baseline on the embedded zoo: train the fuser, keep the best on validation, score validation and test.

    ZooC2COptions                   what `densecomm baseline c2c` sets (output dir, steps, seed, traces file, sizes)
    run_zoo_c2c(options, progress)  traces -> train_c2c -> fuser saved to OUTPUT/fuser -> report (also OUTPUT/report.json)
    score_split(...)                accuracy per family and mean per-side tokens of every method on one split
    render_report(report)           the tables the CLI prints

The checkpoint is chosen on the zoo's validation split only; the test split is scored once, at the end, with the
chosen fuser, beside the receiver with its input (the ceiling) and without it (the floor).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from densecomm_core.baselines.c2c import C2CConfig, C2CFuser, c2c_run
from densecomm_core.baselines.c2c_training import GREEDY, C2CTrainConfig, train_c2c, zoo_trace_records
from densecomm_core.evaluation.accuracy import accuracy_by_family
from densecomm_core.models import LoadedModel
from densecomm_core.relay import ContextMode, RelayOutput, TokenCounts, answer_with_input, answer_without_input
from densecomm_core.training.traces import traces_fingerprint
from densecomm_core.zoo import tasks

log = logging.getLogger(__name__)

FUSER_DIR = "fuser"
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class ZooC2COptions:
    output_dir: Path
    steps: int = 1200
    seed: int = 0
    traces: Path | None = None  # a `densecomm train` traces.jsonl of the zoo; None: build them (guided decoding)
    train_per_family: int = 3000  # trace requests per family (zoo.toml's train_size / 3)
    validation_per_family: int = 50  # model selection (zoo.toml's validation_size / 3)
    test_per_family: int = 200  # scored once at the end (the demo's test size)
    hidden: int = 128
    batch_size: int = 32
    lr: float = 1e-3
    p_aware: float = 0.5
    eval_every: int = 200
    batch_eval: int = 128
    suite: str = "v1"  # the zoo suite: its committed pair; trained, selected and scored on its in-domain families


def _run_batches(fn: Callable[[list[str]], RelayOutput], contexts: list[str], size: int) -> tuple[list[str], TokenCounts]:
    texts, total = [], TokenCounts()
    for start in range(0, len(contexts), size):
        out = fn(contexts[start : start + size])
        texts += out.texts
        for name in ("sender_prefill", "sender_decode", "receiver_prefill", "receiver_decode"):
            setattr(total, name, getattr(total, name) + getattr(out.counts, name))
    return texts, total


def score_split(sender: LoadedModel, receiver: LoadedModel, fuser: C2CFuser, examples: list[tasks.Example],
                batch_size: int = 128) -> list[dict]:
    """One row per method: accuracy per family, mean, and per-request tokens per side and FLOPs (appendix B.1)."""
    contexts, n = [e.context for e in examples], len(examples)
    n_s, n_r, fuser_flops = sender.non_embedding_params, receiver.non_embedding_params, fuser.num_flops_per_token()
    methods: list[tuple[str, Callable[[list[str]], RelayOutput], Callable[[TokenCounts], int]]] = [
        ("receiver with input", lambda c: answer_with_input(receiver, c, GREEDY),
         lambda t: 2 * n_r * (t.receiver_prefill + t.receiver_decode)),
        ("receiver without input", lambda c: answer_without_input(receiver, len(c), GREEDY),
         lambda t: 2 * n_r * (t.receiver_prefill + t.receiver_decode)),
    ]
    for mode in ContextMode:
        methods.append((f"C2C context-{mode.value}", lambda c, mode=mode: c2c_run(sender, receiver, fuser, c, mode, GREEDY),
                        lambda t: t.flops(n_s, n_r, fuser_flops)["total"]))
    rows = []
    for name, fn, flops in methods:
        texts, counts = _run_batches(fn, contexts, batch_size)
        accuracy = accuracy_by_family(examples, texts)
        rows.append({"method": name, "accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy),
                     "tokens_per_request": {k: v / n for k, v in asdict(counts).items()}, "flops_per_request": flops(counts) / n})
    return rows


def run_zoo_c2c(options: ZooC2COptions, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Train, select on validation, save the fuser under ``options.output_dir``, score both splits; returns the report."""
    from densecomm_core.zoo.pair import load_zoo_pair
    from densecomm_core.zoo.suite import get_suite

    started = time.perf_counter()
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = get_suite(options.suite)
    sender, receiver = load_zoo_pair(suite=options.suite)
    records = zoo_trace_records(receiver, options.traces, options.train_per_family, suite=options.suite)
    progress(f"{len(records)} usable receiver-self traces ({'read from ' + str(options.traces) if options.traces else 'built'})")
    torch.manual_seed(options.seed)
    fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=options.hidden))
    config = C2CTrainConfig(steps=options.steps, batch_size=options.batch_size, lr=options.lr, p_aware=options.p_aware,
                            seed=options.seed, eval_every=options.eval_every)
    validation = suite.adapter_split("validation", options.validation_per_family)

    def on_record(record: dict) -> None:
        line = f"step {record['step']}/{options.steps}  loss {record['loss']:.4f}  {record['seconds_per_step']:.2f} s/step"
        if "validation/score" in record:
            figures = "  ".join(f"{k.removeprefix('validation/')} {100 * v:.0f}" for k, v in record.items()
                                if k.startswith("validation/") and k != "validation/score")
            line += f"  | validation {figures}  open gates {record['open_gates']}/{fuser.gate_logit.numel()}"
        progress(line)

    train_started = time.perf_counter()
    history = train_c2c(fuser, sender, receiver, records, config, validation=validation, on_record=on_record)
    train_seconds = time.perf_counter() - train_started
    test = suite.adapter_split("test", options.test_per_family)
    report = {
        "fuser": str((out / FUSER_DIR).resolve()),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "selected_step": fuser.config.recipe.get("selected_step"),
        "open_gates": {"keys": fuser.open_gates[0].tolist(), "values": fuser.open_gates[1].tolist()},
        "fuser_params": sum(p.numel() for p in fuser.parameters()),
        "fuser_flops_per_token": fuser.num_flops_per_token(),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "validation": {"per_family": options.validation_per_family, "rows": score_split(sender, receiver, fuser, validation, options.batch_eval)},
        "test": {"per_family": options.test_per_family, "rows": score_split(sender, receiver, fuser, test, options.batch_eval)},
        "history": history,
    }
    fuser.config.data_fingerprint = traces_fingerprint(records)
    fuser.config.metrics = {split: {r["method"]: r["accuracy"] for r in report[split]["rows"] if r["method"].startswith("C2C")}
                            for split in ("validation", "test")}
    fuser.save(out / FUSER_DIR)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def render_report(report: dict) -> str:
    """Both splits as tables: accuracy % per family and mean, per-request tokens per side, MFLOPs per request."""
    families = list(report["test"]["rows"][0]["accuracy"])
    lines = []
    for split in ("validation", "test"):
        header = ["method", *families, "mean", "S_pre", "S_dec", "R_pre", "R_dec", "MFLOPs/req"]
        table = [header]
        for row in report[split]["rows"]:
            t = row["tokens_per_request"]
            table.append([row["method"], *(f"{100 * row['accuracy'][f]:.1f}" for f in families), f"{100 * row['mean']:.1f}",
                          *(f"{t[k]:.1f}" for k in ("sender_prefill", "sender_decode", "receiver_prefill", "receiver_decode")),
                          f"{row['flops_per_request'] / 1e6:.2f}"])
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        render = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        lines += [f"{split} split, {report[split]['per_family']} examples per family; accuracy in %", render(table[0]),
                  render(["-" * w for w in widths]), *(render(r) for r in table[1:]), ""]
    gates = report["open_gates"]
    lines.append(f"selected step {report['selected_step']} (best validation mean over both regimes); open gates "
                 f"keys {sum(gates['keys'])}/{len(gates['keys'])}, values {sum(gates['values'])}/{len(gates['values'])}; "
                 f"fuser {report['fuser_params']:,} parameters")
    lines.append(f"fuser saved to {report['fuser']}")
    return "\n".join(lines)
