"""`densecomm eval`: methods x modes x task sets in one run; accuracy, per-side tokens and FLOPs, issue 10's targets.

    EvalOptions                    the command's typed options (built once by the CLI)
    load_pair(options)             the zoo pair and adapter, or local checkpoints
    run(options, progress)         -> EvalReport: cells, FLOPs on the zoo's models and projected onto Qwen3 pairs
    render_accuracy / render_tokens / render_projected / render_targets   Markdown for the terminal
    check_targets(report)          issue 10's targets, each ok / missed (or skipped when a method is absent)
    write_outputs(report, targets, directory)   accuracy.csv, tokens.csv, predictions.jsonl, eval.json
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_METHODS = ("sender", "receiver", "receiver-without-input", "t2t", "dense", "c2c")


@dataclass
class EvalOptions:
    methods: tuple[str, ...] = DEFAULT_METHODS
    modes: tuple[str, ...] = ("aware", "unaware")
    tasks: str = "zoo"  # parse_task_specs: zoo and FORMAT=PATH items
    zoo: str = "v1"  # the zoo suite: its pair, adapter, fuser and prompt layouts, and the families "zoo" means
    split: str = "test"  # zoo split
    limit: int | None = None  # examples per task set (zoo: per family; default 200 there, all of a file)
    seed: int | None = None  # None: the first `limit` examples; else a seeded random subset
    codec: str = ""
    codec_params: dict = field(default_factory=dict)
    sender: str = ""  # local checkpoints instead of the zoo pair
    receiver: str = ""
    adapter: str = ""
    c2c: str = ""  # a C2C fuser directory (`densecomm baseline c2c`); the zoo's committed one for the zoo pair
    device: str = "cpu"
    dtype: str = ""  # weights of local checkpoints (a name of densecomm_core.models.DTYPES); "" = bfloat16 on CUDA, float32 on the CPU. Not the zoo's
    batch_size: int = 64
    max_new_tokens: int = 24  # the receiver's (or a lone model's) answer budget
    message_tokens: int = 24  # the T2T sender's message budget
    prompt_format: dict = field(default_factory=dict)  # PromptFormat field overrides
    output_dir: str = "runs/eval"


@dataclass
class EvalReport:
    options: EvalOptions
    pair_name: str
    task_sets: list  # TaskSet
    results: list  # CellResult
    methods: dict  # name -> Method
    costs: dict  # pair name -> PairCost ("zoo" first, then the projections)
    tokens: dict  # (method, mode label) -> {pair name: TokenRow}
    seconds: float = 0.0


def load_pair(options: EvalOptions):
    """An ``EvalPair`` from the options: the zoo (weights in the package) unless --sender/--receiver are given."""
    import torch

    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.evaluation.methods import EvalPair, EvaluationError
    from densecomm_core.generation import GenerationConfig
    from densecomm_core.models import DTYPES, load_model
    from densecomm_core.relay import PromptFormat

    if bool(options.sender) != bool(options.receiver):
        raise EvaluationError("--sender and --receiver go together (local checkpoints); give both or neither")
    if options.dtype and options.dtype not in DTYPES:
        raise EvaluationError(f"--dtype must be one of {tuple(DTYPES)}, got {options.dtype!r}")
    if options.dtype and not options.sender:
        raise EvaluationError(f"--dtype applies to --sender/--receiver checkpoints; the zoo pair runs as committed, got {options.dtype!r}")
    if options.sender:
        dtype = DTYPES[options.dtype or ("bfloat16" if torch.device(options.device).type == "cuda" else "float32")]
        sender = load_model(options.sender, dtype=dtype, device=options.device)
        receiver = load_model(options.receiver, dtype=dtype, device=options.device)
        adapter_dir = Path(options.adapter) if options.adapter else None
    else:
        from densecomm_core.zoo.pair import load_zoo_pair, zoo_adapter_dir

        sender, receiver = load_zoo_pair(suite=options.zoo)
        sender.model.to(options.device)
        receiver.model.to(options.device)
        adapter_dir = Path(options.adapter) if options.adapter else zoo_adapter_dir(suite=options.zoo)
    adapter = None
    if adapter_dir is not None:
        adapter = DenseAdapter.load(adapter_dir, sender.geometry, receiver.geometry).to(options.device)
        adapter.eval()
    fuser = None
    c2c_dir = Path(options.c2c) if options.c2c else None
    if c2c_dir is None and not options.sender:
        from densecomm_core.zoo.pair import zoo_c2c_dir

        committed = zoo_c2c_dir(suite=options.zoo)
        c2c_dir = committed if committed.is_dir() else None
    if c2c_dir is not None:
        from densecomm_core.baselines.c2c import C2CFuser

        fuser = C2CFuser.load(c2c_dir, sender.geometry, receiver.geometry).to(options.device)
        fuser.eval()
    from dataclasses import replace

    from densecomm_core.zoo.suite import get_suite

    base = get_suite(options.zoo).prompt_format if not options.sender else PromptFormat()  # the zoo LMs' layouts
    try:
        prompt_format = replace(base, **options.prompt_format)
    except TypeError as exc:
        raise EvaluationError(f"--prompt-format: {exc}; fields are {list(PromptFormat.__dataclass_fields__)}") from None
    return EvalPair(sender, receiver, adapter, adapter_dir, prompt_format,
                    GenerationConfig(max_new_tokens=options.max_new_tokens, seed=options.seed or 0),
                    GenerationConfig(max_new_tokens=options.message_tokens, seed=options.seed or 0),
                    options.codec, options.codec_params, fuser)


def run(options: EvalOptions, progress: Callable[[str, str, int, int], None] | None = None) -> EvalReport:
    from densecomm_core.evaluation.flops import (
        PROJECTIONS,
        ModelLayout,
        PairCost,
        add_counts,
        qwen3_pair,
        token_row,
    )
    from densecomm_core.evaluation.methods import EvaluationError, build_methods
    from densecomm_core.evaluation.runner import evaluate, mode_label
    from densecomm_core.evaluation.tasksets import parse_task_specs
    from densecomm_core.relay import ContextMode, TokenCounts
    from services.config import check_device

    started = time.perf_counter()
    try:
        modes = tuple(ContextMode(m) for m in options.modes)
    except ValueError:
        raise EvaluationError(f"--modes takes aware and/or unaware; got {list(options.modes)}") from None
    check_device(options.device, "--device")
    if options.limit is not None and options.limit < 1:
        raise EvaluationError(f"--limit must be >= 1 example per task set; got {options.limit}")
    from densecomm_core.evaluation.methods import METHODS, check_method_names

    if not options.methods:
        raise EvaluationError(f"--methods names no method; give some of {list(METHODS)}")
    check_method_names(options.methods, "--methods: ")  # before any model loads
    task_sets = parse_task_specs(options.tasks, options.split, options.limit, options.seed, options.zoo)
    pair = load_pair(options)
    names = list(options.methods)
    if pair.fuser is None and "c2c" in names and tuple(options.methods) == DEFAULT_METHODS:
        names.remove("c2c")  # the default list runs C2C where a fuser exists (the zoo's); asked for by name, it must
    if options.codec and "dense-codec" not in names:
        names.append("dense-codec")
    methods = build_methods(names, pair)
    results = evaluate(methods, task_sets, modes, options.batch_size, progress)

    expansion = pair.adapter.config.expansion if pair.adapter is not None else 16
    c2c_hidden = {"c2c_hidden": pair.fuser.config.hidden} if pair.fuser is not None else {}
    costs = {"zoo" if not options.sender else "local": PairCost(ModelLayout.of(pair.sender, "sender"),
                                                               ModelLayout.of(pair.receiver, "receiver"), expansion, **c2c_hidden)}
    for s, r in PROJECTIONS:
        cost = qwen3_pair(s, r, expansion)
        costs[cost.name] = cost
    by_name = {m.name: m for m in methods}
    tokens: dict = {}
    for cell in results:
        key = (cell.method, mode_label(cell.mode))
        total, n = tokens.get(key, (TokenCounts(), 0))
        tokens[key] = (add_counts(total, cell.counts), n + cell.requests)
    rows = {key: {name: token_row(counts, n, by_name[key[0]].flops(counts, cost)) for name, cost in costs.items()}
            for key, (counts, n) in tokens.items()}
    pair_name = f"{pair.sender.path} -> {pair.receiver.path}"
    return EvalReport(options, pair_name, task_sets, results, by_name, costs, rows, time.perf_counter() - started)


# ---- tables ---------------------------------------------------------------------------------------------------


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cell_order(report: EvalReport) -> list[tuple[str, str]]:
    from densecomm_core.evaluation.runner import mode_label

    seen: list[tuple[str, str]] = []
    for cell in report.results:
        key = (cell.method, mode_label(cell.mode))
        if key not in seen:
            seen.append(key)
    return seen


def accuracy_table(report: EvalReport) -> dict[tuple[str, str], dict[str, float]]:
    """(method, mode) -> {task set: accuracy}."""
    from densecomm_core.evaluation.runner import mode_label

    table: dict = {}
    for cell in report.results:
        table.setdefault((cell.method, mode_label(cell.mode)), {})[cell.task] = cell.accuracy
    return table


def mean_accuracy(accuracy: dict[str, float], names: list[str]) -> float | None:
    values = [accuracy[n] for n in names if n in accuracy]
    return sum(values) / len(values) if values else None


def render_accuracy(report: EvalReport) -> str:
    """Accuracy (%) per task set, like the paper's Tables 1-2, plus in-domain / OOD means."""
    table = accuracy_table(report)
    in_domain = [t.name for t in report.task_sets if t.in_domain]
    ood = [t.name for t in report.task_sets if not t.in_domain]
    header = ["method", "mode", *(t.name + ("" if t.in_domain else " (OOD)") for t in report.task_sets)]
    header += ["in-domain mean"] * bool(in_domain) + ["OOD mean"] * bool(ood)
    projected = list(report.costs)[1]  # the paper's FLOPs column, on the first projected pair
    header.append(f"TFLOPs/req {projected}")
    rows = []
    for key in _cell_order(report):
        acc = table[key]
        row = [key[0], key[1], *(f"{100 * acc[t.name]:.1f}" for t in report.task_sets)]
        for names in (in_domain, ood):
            if names:
                row.append(f"{100 * mean_accuracy(acc, names):.1f}")
        row.append(f"{report.tokens[key][projected].flops['total'] / 1e12:.3f}")
        rows.append(row)
    return markdown(header, rows)


def _tokens(row) -> list[str]:
    return [f"{row.sender_prefill:.1f}", f"{row.sender_decode:.1f}", f"{row.receiver_prefill:.1f}",
            f"{row.receiver_decode:.1f}", f"{row.all_tokens:.1f}"]


def render_tokens(report: EvalReport) -> str:
    """Mean per-request tokens per side and FLOPs of the models as they are (MFLOPs: tiny models)."""
    name = next(iter(report.costs))
    header = ["method", "mode", "S_pre", "S_dec", "R_pre", "R_dec", "all tok",
              "sender MFLOPs", "adapter MFLOPs", "receiver MFLOPs", "total MFLOPs", "total TFLOPs"]
    rows = []
    for key in _cell_order(report):
        row = report.tokens[key][name]
        f = row.flops
        rows.append([*key, *_tokens(row), *(f"{f[s] / 1e6:.2f}" for s in ("sender", "adapter", "receiver", "total")),
                     f"{f['total'] / 1e12:.3g}"])
    return markdown(header, rows)


def render_projected(report: EvalReport) -> str:
    """The same measured tokens, TFLOPs per request on real Qwen3 geometries (sender -> receiver)."""
    projected = list(report.costs)[1:]
    header = ["method", "mode", "S_pre", "S_dec", "R_pre", "R_dec", "all tok", *(f"TFLOPs {p}" for p in projected)]
    rows = []
    for key in _cell_order(report):
        cells = report.tokens[key]
        rows.append([*key, *_tokens(cells[projected[0]]), *(f"{cells[p].flops['total'] / 1e12:.3f}" for p in projected)])
    return markdown(header, rows)


def describe_costs(report: EvalReport) -> str:
    from densecomm_core.evaluation.flops import dense_adapter_params

    lines = []
    for name, cost in report.costs.items():
        lines.append(f"- {name}: N_S {cost.sender.non_embedding_params:,}, N_R {cost.receiver.non_embedding_params:,}, "
                     f"dense adapter |θ| {dense_adapter_params(cost):,} (expansion {cost.expansion}: "
                     f"{2 * dense_adapter_params(cost) / 1e9:.4g} GFLOPs per transferred token)")
    return "\n".join(lines)


# ---- targets ---------------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    status: str  # "ok", "missed", "skipped", "info"
    value: str


def check_targets(report: EvalReport) -> list[Target]:
    """Issue 10's targets on this run's figures."""
    table = accuracy_table(report)
    receiver, aware, unaware, t2t = (table.get(k) for k in
                                     (("receiver", "-"), ("dense", "aware"), ("dense", "unaware"), ("t2t", "aware")))
    out: list[Target] = []
    need = lambda *cells: all(c is not None for c in cells)

    # 1. dense context-unaware >= 95 % of receiver-with-input, in-domain; OOD side by side.
    if need(receiver, unaware):
        for task in report.task_sets:
            base = receiver[task.name]
            ratio = unaware[task.name] / base if base else float("nan")
            name = f"dense unaware >= 95% of receiver with input on {task.name}" + ("" if task.in_domain else " (OOD, reported)")
            status = ("ok" if ratio >= 0.95 else "missed") if task.in_domain else "info"
            out.append(Target(name, status, f"{100 * unaware[task.name]:.1f} vs {100 * base:.1f} ({ratio:.3f}x)"))
    else:
        out.append(Target("dense unaware >= 95% of receiver with input (in-domain)", "skipped", "needs methods receiver and dense (unaware)"))

    # 2. dense context-aware >= T2T context-aware accuracy at <= 0.5x T2T's TFLOPs (on the projections).
    if need(aware, t2t):
        names = [t.name for t in report.task_sets]
        acc_d, acc_t = mean_accuracy(aware, names), mean_accuracy(t2t, names)
        for cost in list(report.costs)[1:]:
            ratio = report.tokens[("dense", "aware")][cost].flops["total"] / report.tokens[("t2t", "aware")][cost].flops["total"]
            ok = acc_d >= acc_t and ratio <= 0.5
            out.append(Target(f"dense aware >= T2T aware accuracy at <= 0.5x T2T TFLOPs ({cost})", "ok" if ok else "missed",
                              f"accuracy {100 * acc_d:.1f} vs {100 * acc_t:.1f}, TFLOPs {ratio:.2f}x"))
        zoo = next(iter(report.costs))
        ratio = report.tokens[("dense", "aware")][zoo].flops["total"] / report.tokens[("t2t", "aware")][zoo].flops["total"]
        out.append(Target(f"dense aware vs T2T aware FLOPs on the {zoo} models as they are (reported)", "info", f"{ratio:.2f}x"))
    else:
        out.append(Target("dense aware >= T2T aware accuracy at <= 0.5x TFLOPs", "skipped", "needs methods t2t and dense (aware)"))

    # 3. dense context-aware never more than 2 points below the receiver with input, on any task set.
    if need(receiver, aware):
        for task in report.task_sets:
            gap = 100 * (aware[task.name] - receiver[task.name])
            out.append(Target(f"dense aware >= receiver with input - 2 points on {task.name}", "ok" if gap >= -2.0 else "missed",
                              f"{100 * aware[task.name]:.1f} vs {100 * receiver[task.name]:.1f} ({gap:+.1f})"))
    else:
        out.append(Target("dense aware >= receiver with input - 2 points", "skipped", "needs methods receiver and dense (aware)"))

    # 4. C2C-style context-unaware far (>= 20 points, in-domain mean) below dense context-unaware: the paper's collapse.
    c2c = table.get(("c2c", "unaware"))
    if need(c2c, unaware):
        names = [t.name for t in report.task_sets if t.in_domain]
        acc_c, acc_d = mean_accuracy(c2c, names), mean_accuracy(unaware, names)
        out.append(Target("C2C unaware >= 20 points below dense unaware (in-domain mean)", "ok" if acc_d - acc_c >= 0.2 else "missed",
                          f"{100 * acc_c:.1f} vs {100 * acc_d:.1f} ({100 * (acc_c - acc_d):+.1f})"))
    else:
        out.append(Target("C2C unaware far below dense unaware", "skipped", "needs methods c2c and dense (unaware)"))
    return out


def render_codec_bytes(report: EvalReport) -> str:
    """Raw and wire KV bytes per request of the codec rows (both hops), when there are any."""
    from densecomm_core.evaluation.methods import DenseThroughCodec

    requests = {}
    for cell in report.results:
        requests[cell.method] = requests.get(cell.method, 0) + cell.requests
    lines = []
    for name, method in report.methods.items():
        if isinstance(method, DenseThroughCodec) and method.wire_bytes:
            n = requests[name]
            lines.append(f"- {name}: {method.raw_bytes / n / 1024:.1f} KiB raw -> {method.wire_bytes / n / 1024:.1f} KiB "
                         f"on the wire per request, both hops ({method.raw_bytes / method.wire_bytes:.2f}x)")
    return "\n".join(lines)


def render_targets(targets: list[Target]) -> str:
    return "\n".join(f"- [{t.status}] {t.name}: {t.value}" for t in targets)


# ---- files -----------------------------------------------------------------------------------------------------


def write_outputs(report: EvalReport, targets: list[Target], directory: str | Path) -> list[Path]:
    """accuracy.csv, tokens.csv, predictions.jsonl and eval.json (everything) in ``directory``."""
    from densecomm_core.evaluation.runner import mode_label

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    accuracy_rows = [{"method": c.method, "mode": mode_label(c.mode), "task": c.task, "in_domain": c.in_domain,
                      "requests": c.requests, "correct": c.correct, "accuracy": round(c.accuracy, 6),
                      "payload_bytes_per_request": round(c.payload_bytes / c.requests, 1) if c.requests else 0}
                     for c in report.results]
    token_rows = []
    for (method, mode), by_cost in report.tokens.items():
        for cost, row in by_cost.items():
            token_rows.append({"method": method, "mode": mode, "pair": cost, "requests": row.requests,
                               "S_pre": row.sender_prefill, "S_dec": row.sender_decode, "R_pre": row.receiver_prefill,
                               "R_dec": row.receiver_decode, "all_tokens": row.all_tokens,
                               **{f"flops_{side}": value for side, value in row.flops.items()}})
    paths = [out / "accuracy.csv", out / "tokens.csv", out / "predictions.jsonl", out / "eval.json"]
    for path, rows in zip(paths[:2], (accuracy_rows, token_rows)):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    examples = {t.name: t.examples for t in report.task_sets}
    with paths[2].open("w") as handle:
        for c in report.results:
            messages = c.messages or [None] * len(c.texts)
            for example, text, message in zip(examples[c.task], c.texts, messages, strict=True):
                row = {"method": c.method, "mode": mode_label(c.mode), "task": c.task, "source": example.source,
                       "answer": example.answer, "output": text}
                handle.write(json.dumps(row | ({"message": message} if message is not None else {})) + "\n")
    costs = {name: {"sender": asdict(cost.sender), "receiver": asdict(cost.receiver), "expansion": cost.expansion}
             for name, cost in report.costs.items()}
    options = asdict(report.options) | {"methods": list(report.options.methods), "modes": list(report.options.modes)}
    paths[3].write_text(json.dumps({
        "pair": report.pair_name, "options": options, "costs": costs,
        "task_sets": [{"name": t.name, "examples": len(t.examples), "kind": t.kind, "in_domain": t.in_domain, "source": t.source}
                      for t in report.task_sets],
        "accuracy": accuracy_rows, "tokens": token_rows,
        "targets": [asdict(t) for t in targets], "seconds": round(report.seconds, 1),
    }, indent=2) + "\n")
    return paths
