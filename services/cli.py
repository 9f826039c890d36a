"""`densecomm`: the command line. One subcommand per job; heavy imports happen inside each job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from services.train.config import ZOO_SUITES  # torch-free: the CLI parses before any heavy import


def at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def int_list(low: int, high: int | None = None):
    """An argparse type: a comma list of integers in [low, high], e.g. '1,2'."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a comma list of integers, got {text!r}") from None
        if not values or any(v < low or (high is not None and v > high) for v in values):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be a comma list of integers {bound}, got {text!r}")
        return values

    parse.__name__ = "integer list"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def table_text(rows, families: list[str]) -> str:
    header = ["method", *families, "mean", "KV raw KB/req", "KV wire KB/req", "MFLOPs/req"]
    lines = [header]
    for row in rows:
        lines.append(
            [row.method, *(f"{100 * row.accuracy[f]:.1f}" for f in families), f"{100 * row.mean:.1f}",
             f"{row.payload_bytes_per_request / 1024:.1f}" if row.payload_bytes_per_request else "-",
             f"{row.wire_bytes_per_request / 1024:.1f}" if row.wire_bytes_per_request else "-",
             f"{row.flops_per_request / 1e6:.2f}"]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([render(lines[0]), render(["-" * w for w in widths])] + [render(line) for line in lines[1:]])


def target_checks(rows, suite: str = "v1") -> list[tuple[str, bool, str]]:
    """The demo's targets on the measured table: dense unaware >= 0.95x the receiver with input on every in-domain
    family (OOD families: adapter never trained on them, not a target), dense aware >= the receiver with input
    on the in-domain mean, the receiver without input near chance everywhere."""
    from densecomm_core.zoo.suite import get_suite

    zoo = get_suite(suite)
    by = {row.method: row for row in rows}
    with_input, aware, unaware, without = (by[m] for m in
        ("receiver with input", "dense context-aware", "dense context-unaware", "receiver without input"))
    mean = lambda row: sum(row.accuracy[f] for f in zoo.in_domain) / len(zoo.in_domain)
    checks = []
    for family in zoo.in_domain:
        acc = with_input.accuracy[family]
        ratio = unaware.accuracy[family] / acc if acc else 0.0
        checks.append((f"unaware/with-input on {family} >= 0.95", ratio >= 0.95, f"{ratio:.3f}"))
    checks.append(("dense aware >= receiver with input (in-domain mean)", mean(aware) >= mean(with_input),
                   f"{mean(aware):.3f} vs {mean(with_input):.3f}"))
    for family, acc in without.accuracy.items():
        chance = zoo.chance[family]
        checks.append((f"without input near chance on {family}", acc <= chance + 0.15, f"{acc:.3f} (chance {chance:.2f})"))
    return checks


def cmd_demo(args: argparse.Namespace) -> int:
    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.zoo.pair import evaluate_pair, load_zoo_pair, zoo_adapter_dir
    from densecomm_core.zoo.suite import get_suite

    started = time.perf_counter()
    sender, receiver = load_zoo_pair(suite=args.zoo)
    adapter_dir = Path(args.adapter) if args.adapter else zoo_adapter_dir(suite=args.zoo)
    if args.retrain or not adapter_dir.exists():
        from services.train.config import zoo_config_name
        from services.train.job import train_zoo_adapter

        adapter_dir = train_zoo_adapter(args.work_dir, resume=args.resume, suite=args.zoo)
        if not args.json:
            print(f"adapter trained (densecomm train --config {zoo_config_name(args.zoo)}) and saved to {adapter_dir}")
    adapter = DenseAdapter.load(adapter_dir, sender.geometry, receiver.geometry)
    rows = evaluate_pair(sender, receiver, adapter, per_family=args.per_family, suite=args.zoo)
    agreement = {}
    if not args.in_process:
        rows, agreement = dense_rows_through_services(rows, adapter_dir, args.per_family, use_ray=not args.no_ray,
                                                      suite=args.zoo)
    checks = target_checks(rows, args.zoo)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({
            "sender": sender.geometry.to_dict(), "receiver": receiver.geometry.to_dict(),
            "examples_per_family": args.per_family,
            "rows": [{"method": r.method, "accuracy": r.accuracy, "mean": r.mean,
                      "payload_bytes_per_request": r.payload_bytes_per_request, "wire_bytes_per_request": r.wire_bytes_per_request,
                      "flops_per_request": r.flops_per_request} for r in rows],
            "targets": [{"target": name, "met": ok, "value": value} for name, ok, value in checks],
            "via": "in-process" if args.in_process else ("local gRPC stack" if args.no_ray else "Ray-hosted gRPC stack"),
            "service_matches_in_process": agreement,
            "seconds": round(seconds, 1),
        }, indent=2))
    else:
        s, r = sender.geometry, receiver.geometry
        print(f"sender   {s.model_type:6s} {s.num_layers} layers, {s.num_kv_heads} KV heads x {s.head_dim}, hidden {s.hidden_size}, rope {s.rope}")
        print(f"receiver {r.model_type:6s} {r.num_layers} layers, {r.num_kv_heads} KV heads x {r.head_dim}, hidden {r.hidden_size}, rope {r.rope}")
        zoo = get_suite(args.zoo)
        ood = f" ({', '.join(zoo.out_of_domain)}: out of domain, never trained on by the adapter)" if zoo.out_of_domain else ""
        print(f"zoo {args.zoo}, test split: {args.per_family} examples per family{ood}; accuracy in %\n")
        print(table_text(rows, list(zoo.family_names)))
        print()
        if agreement:
            via = "local gRPC stack" if args.no_ray else "Ray-hosted gRPC stack"
            print(f"dense rows went through the {via}; answers identical to the in-process relay: "
                  + ", ".join(f"{mode} {same}/{total}" for mode, (same, total) in agreement.items()))
        for name, ok, value in checks:
            print(f"[{'ok' if ok else 'MISSED'}] {name}: {value}")
        print(f"\n{seconds:.0f} s")
    return 1 if args.check and not all(ok for _, ok, _ in checks) else 0


def dense_rows_through_services(rows, adapter_dir: Path, per_family: int, use_ray: bool, suite: str = "v1"):
    """Replace the dense rows by the same requests sent through the service stack; count identical answers."""
    from densecomm_core.zoo.suite import get_suite
    from services.config import load_config, zoo_route
    from services.demo import service_rows
    from services.stack import LocalStack, RayStack

    route = zoo_route(suite)
    config = load_config(None, relay_port=0, routes=[{**route.__dict__, "adapter": str(adapter_dir.resolve())}])
    examples = get_suite(suite).make_split("test", per_family)
    with (RayStack(config) if use_ray else LocalStack(config)) as stack:
        served = {row.method: row for row in service_rows(stack.relay_address, examples)}
    agreement = {}
    merged = []
    for row in rows:
        if row.method in served:
            new = served[row.method]
            agreement[row.method.removeprefix("dense context-")] = (sum(a == b for a, b in zip(new.texts, row.texts)), len(row.texts))
            merged.append(new)
        else:
            merged.append(row)
    return merged, agreement


def cmd_eval(args: argparse.Namespace) -> int:
    from services import eval as evaluation

    def parse_json(text: str, flag: str) -> dict:
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{flag} must be a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise SystemExit(f"{flag} must be a JSON object, got {text!r}")
        return value

    options = evaluation.EvalOptions(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), tasks=args.tasks, zoo=args.zoo, split=args.split,
        limit=args.limit, seed=args.seed, codec=args.codec, codec_params=parse_json(args.codec_params, "--codec-params"),
        sender=args.sender or "", receiver=args.receiver or "", adapter=args.adapter or "", c2c=args.c2c or "", device=args.device,
        dtype=args.dtype or "", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, message_tokens=args.message_tokens,
        prompt_format=parse_json(args.prompt_format, "--prompt-format"), output_dir=args.output_dir)

    def progress(label: str, task: str, done: int, total: int) -> None:
        if not args.quiet:
            print(f"[eval] {label:28s} {task:16s} {done:5d}/{total}", file=sys.stderr, flush=True)

    report = evaluation.run(options, progress)
    targets = evaluation.check_targets(report)
    paths = evaluation.write_outputs(report, targets, args.output_dir)
    sizes = ", ".join(f"{t.name} {len(t.examples)}" for t in report.task_sets)
    print(f"pair: {report.pair_name}\ntask sets (examples): {sizes}\n")
    print("## Accuracy (%)\n")
    print(evaluation.render_accuracy(report))
    print(f"\n## Tokens and FLOPs per request on the {next(iter(report.costs))} models as they are\n")
    print(evaluation.render_tokens(report))
    print("\n## The same measured tokens projected onto Qwen3 geometries (sender->receiver)\n")
    print(evaluation.render_projected(report))
    print("\n" + evaluation.describe_costs(report))
    codec_bytes = evaluation.render_codec_bytes(report)
    if codec_bytes:
        print("\n" + codec_bytes)
    print("\n## Targets (issue 10)\n")
    print(evaluation.render_targets(targets))
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({report.seconds:.0f} s)")
    return 1 if args.check and any(t.status == "missed" for t in targets) else 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    import shutil

    from densecomm_core.codec.transform import BASIS_FILE
    from densecomm_core.zoo.pair import (
        fit_zoo_bases,
        load_zoo_pair,
        zoo_adapter_dir,
        zoo_root,
    )
    from services.train.job import train_zoo_adapter

    from densecomm_core.zoo.build import build_zoo, zoo_recipe

    smoke = args.max_steps is not None
    # v1 builds into the package by default; v2 and smoke builds into runs/zoo-SUITE (a full v2 build may be
    # pointed at the package: its models have their own names). A smoke build never goes there.
    root = Path(args.out) if args.out else (zoo_root() if args.suite == "v1" and not smoke else Path(f"runs/zoo-{args.suite}"))
    if smoke and (args.adapter_only or root.resolve() == zoo_root().resolve()):
        raise SystemExit("--max-steps builds LMs into their own --out directory, never the committed zoo, and has no adapter")
    started = time.perf_counter()
    if not args.adapter_only:
        full = {spec.name: config for spec, config in zoo_recipe(args.suite)}
        for result in build_zoo(root, seed=args.seed, suite=args.suite, max_steps=args.max_steps):
            t = result.tally
            print(f"{result.spec.name}: {result.steps} steps, {result.seconds:.0f} s wall / {t.cpu_seconds:.0f} s CPU "
                  f"({t.eval_seconds:.0f} / {t.eval_cpu_seconds:.0f} s in {t.evaluations} validation runs), "
                  f"validation {result.validation_accuracy}", flush=True)
            if smoke:
                config = full[result.spec.name]
                print(f"  full recipe ({config.max_steps} steps) projected: {result.projected_seconds(config) / 60:.1f} min "
                      f"at these wall rates, {result.projected_seconds(config, cpu=True) / 60:.1f} min at these CPU rates")
        sender, receiver = load_zoo_pair(root, args.suite)
        fit_zoo_bases(sender, receiver, suite=args.suite)[0].save(Path(sender.path) / BASIS_FILE)  # the sender space's pca basis
    if smoke:
        print(f"LMs saved under {root} (a smoke build: no adapter)")
        return 0
    trained = train_zoo_adapter(args.work_dir or f"runs/zoo-build-{args.suite}", root, resume=args.resume, suite=args.suite)
    shutil.copytree(trained, zoo_adapter_dir(root, args.suite), dirs_exist_ok=True)
    print(f"adapter saved to {zoo_adapter_dir(root, args.suite)}; the whole build {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from services.train.config import STAGES, load_train_config
    from services.train.job import plan, run

    overrides = {"output_dir": args.output_dir, "seed": args.seed, "name": args.name}
    config = load_train_config(args.config, **overrides)
    if args.dry_run:
        print(plan(config))
        return 0
    stages = tuple(args.stage) if args.stage else STAGES
    state = run(config, stages, resume=args.resume)
    done = state["stages"]
    if "finalize" in done:
        print(f"adapter ready: {done['finalize']['adapter']}  (densecomm serve loads it as a route's adapter)")
    print(f"run state: {config.output_path / 'run_state.json'}")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from services.bench import train as bench
    from services.train.config import load_train_config

    config = load_train_config(args.config)
    rows = bench.measure(config, args.steps, tuple(args.workers))
    print(f"\n{args.config}: {args.steps} steps per phase, global batch {config.phase1.batch_size} / "
          f"{config.phase2.batch_size}, {config.workers.cpus_per_worker} CPU and {config.workers.torch_threads} thread(s) per worker\n")
    print(bench.render(rows))
    return 0


def cmd_bench_resume(args: argparse.Namespace) -> int:
    from services.bench import resume as bench
    from services.train.config import load_train_config

    if not 0.0 < args.at < 1.0:
        raise SystemExit(f"--at is a fraction of the run's steps in (0, 1), got {args.at}")
    config = load_train_config(args.config, seed=args.seed)
    out = Path(args.output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if args.reference:
        bench.check_reference(config, Path(args.reference))
        reference = bench.summarize("uninterrupted", Path(args.reference))
    else:
        reference = bench.run_reference(args.config, out / "uninterrupted", args.seed)
    killed = bench.run_killed(args.config, config, out / "killed", args.seed, args.at, print)
    print(f"\n{args.config}: {config.phase1.steps} + {config.phase2.steps} steps, seed {args.seed}, "
          f"SIGKILL at {args.at:.0%} of them\n")
    print(bench.render([reference, killed]))
    return 0


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from services.bench import codec as bench

    torch_threads(args.workers)
    stand_in, big = bench.qwen3_4b_geometry(args.tokens)
    caches = {"zoo": (*bench.zoo_caches(), bench.load_zoo_bases()), "qwen3-4b": (stand_in, [big], bench.calibrate_stand_in(stand_in))}
    rows = [row for name, (model, cache, bases) in caches.items() for row in bench.measure(name, model, cache, args.repeats, args.workers, bases)]
    hops = tuple(sorted(set(args.hops)))  # 0: sender -> adapter, 1: adapter -> receiver
    accuracy = [] if args.skip_accuracy else bench.accuracy_through_codecs(args.per_family, hops)
    goals = bench.targets(rows)
    if args.json:
        print(json.dumps({"throughput": [asdict(r) for r in rows], "accuracy": accuracy,
                          "targets": [{**asdict(t), "ok": t.ok} for t in goals]}, indent=2))
        return 0
    print(f"codec throughput: MB/s of raw KV, best of {args.repeats}, {args.workers} worker thread(s); µs/req: encode + decode per request\n")
    print(bench.render(rows))
    print("\ncodec targets (issue 11), this run:\n")
    print(bench.render_targets(goals))
    if accuracy:
        through = {(0, 1): "every hop", (0,): "only the sender -> adapter hop", (1,): "only the adapter -> receiver hop"}[hops]
        print(f"\nzoo test split ({args.per_family} per family), {through} through the codec (bf16 on the wire)\n")
        print(bench.render_accuracy(accuracy))
    if args.profile:
        print("\nwhere encode / decode time goes: cProfile self time per stage, one thread\n")
        (zoo_model, zoo, zoo_bases), (_, _, big_bases) = caches["zoo"], caches["qwen3-4b"]
        print(bench.profiles(big, stand_in, big_bases, zoo, zoo_model, zoo_bases))
        print("\nprofile of lossless encode + decode on the qwen3-4b cache (1 thread), top functions:\n")
        print(bench.profile_lossless(big, args.workers))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.config import load_config
    from services.stack import LocalStack, RayStack

    config = load_config(args.config, relay_port=args.port, host=args.host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(config) if args.no_ray else RayStack(config)
    try:
        ports = ", ".join(f"{kind} {port}" for kind, port in stack.metrics_ports.items())
        print(f"densecomm relay ready at {stack.relay_address}  (metrics on {config.host}: {ports})", flush=True)
        stop.wait()
    finally:
        print("shutting down", flush=True)
        stack.close()
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from services.client import TLSOptions, relay_once

    token = args.token or os.environ.get("DENSECOMM_TOKEN") or None
    tls = TLSOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name, enabled=args.tls)
    stats = asyncio.run(relay_once(
        args.address, args.text, mode=args.mode, route=args.route, codec=args.codec, codec_params=args.codec_params,
        receiver_codec=args.receiver_codec, receiver_codec_params=args.receiver_codec_params,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        receiver_prompt=args.receiver_prompt, timeout=args.timeout, on_text=lambda t: print(t, end="", flush=True),
        token=token, tls=tls, on_cache_failure=args.on_cache_failure,
    ))
    print()
    ratio = f"{stats.compression_ratio:.2f}x" if stats.compression_ratio else "-"
    print(f"\nroute {stats.route}  codec {stats.codec}  KV {stats.raw_bytes / 1e3:.1f} kB raw -> {stats.wire_bytes / 1e3:.1f} kB wire ({ratio})")
    for hop in stats.hops:
        print(f"  {hop.hop:18s} {hop.codec:10s} {hop.raw_bytes / 1e3:8.1f} kB raw -> {hop.wire_bytes / 1e3:8.1f} kB wire, {hop.chunks} chunks")
    print(f"tokens: sender prefill {stats.sender_prefill_tokens}, decode {stats.sender_decode_tokens}; "
          f"receiver prefill {stats.receiver_prefill_tokens}, decode {stats.receiver_decode_tokens}")
    total = stats.sender_flops + stats.adapter_flops + stats.receiver_flops
    print(f"FLOPs: sender {stats.sender_flops:.3g}, adapter {stats.adapter_flops:.3g}, receiver {stats.receiver_flops:.3g}, "
          f"total {total:.3g} (text-to-text {stats.t2t_flops:.3g})")
    print("latency: " + ", ".join(f"{l.stage} {1e3 * l.seconds:.1f} ms" for l in stats.latencies))
    return 0


def cmd_codec_calibrate(args: argparse.Namespace) -> int:
    import torch

    from densecomm_core.codec.calibrate import calibrate
    from densecomm_core.codec.transform import BASIS_FILE
    from densecomm_core.models import load_model
    from densecomm_core.zoo import tasks
    from densecomm_core.zoo.pair import (
        BASIS_CALIBRATION_PER_FAMILY,
        zoo_adapter_dir,
        zoo_model_dirs,
    )

    dtype = getattr(torch, args.dtype)
    if args.sender is None:  # the embedded pair, exactly as `densecomm zoo build` fits it
        sender_dir, receiver_dir = zoo_model_dirs()
        args.sender, args.adapter, args.receiver = str(sender_dir), str(zoo_adapter_dir()), str(receiver_dir)
    if bool(args.adapter) != bool(args.receiver):
        raise SystemExit("--adapter and --receiver go together")
    if args.texts:
        texts = [line.strip() for line in Path(args.texts).read_text().splitlines() if line.strip()]
    else:
        texts = [e.context for e in tasks.make_split("train", BASIS_CALIBRATION_PER_FAMILY)]
    texts = texts[: args.limit]
    sender = load_model(args.sender, dtype=dtype, device=args.device)
    adapter = receiver = None
    if args.adapter:
        from densecomm_core.adapter import DenseAdapter

        receiver = load_model(args.receiver, dtype=dtype, device=args.device)
        adapter = DenseAdapter.load(args.adapter, sender.geometry, receiver.geometry).to(sender.model.device)
    sender_basis, receiver_basis = calibrate(sender, texts, adapter, receiver, strip_rope=not args.keep_rope)
    for basis, directory in ((sender_basis, args.sender), (receiver_basis, args.adapter)):
        if basis is not None:
            basis.save(Path(directory) / BASIS_FILE)
            print(f"{Path(directory) / BASIS_FILE}: basis {basis.fingerprint} ({basis.num_layers} layers, "
                  f"RoPE {'applied' if basis.rope_applied else 'stripped'}, {len(texts)} texts)")
    return 0


def cmd_bench_relay(args: argparse.Namespace) -> int:
    from services.bench import relay as bench

    torch_threads(args.workers)
    report = bench.run(args.repeats, args.workers, args.tokens, args.requests, args.no_ray, args.chunk_tokens, args.frame_bytes or None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(bench.render(report, args.repeats, args.requests, args.tokens))
    if args.profile:
        from services.bench import codec as bench_codec
        from services.bench import hop_profile

        cache = bench_codec.qwen3_4b_geometry_cache(args.tokens)
        print("\nprofile: one hop's stages, each timed alone on the hop's own frames (best of "
              f"{args.repeats}; frame_bytes {report['frame_bytes'] // 1024} KiB)\n")
        with bench.SinkProcess() as sink:  # the bare stream and the hop cross processes, as in the hop table
            for label, name, params in bench.HOP_CODECS[:2]:
                rows = hop_profile.stage_table(cache, name, params, report["frame_bytes"], args.workers, args.repeats, sink.address)
                print(hop_profile.render_stages(label, rows))
                print(hop_profile.render_budget(hop_profile.hop_budget(cache, name, params, report["frame_bytes"], args.workers,
                                                                       sink.address, sink.pid)))
                print()
        print("cProfile of one raw hop (encode + gRPC stream + verify/decode, client and sink in one process):\n")
        print(hop_profile.cprofile_hop(cache, args.workers, report["frame_bytes"]))
    return 0


def cmd_bench_load(args: argparse.Namespace) -> int:
    from services.bench import load

    quiet = lambda *_: None  # noqa: E731
    report = load.run_bench(args.requests, args.concurrency, not args.no_ray, args.faults, args.fault_requests,
                            args.tls_requests, args.timeout, args.max_seconds, progress=quiet if args.json else print)
    print(json.dumps(report, indent=2) if args.json else "\n" + load.render_report(report))
    return 0


def cmd_baseline_c2c(args: argparse.Namespace) -> int:
    from densecomm_core.baselines.c2c_zoo import ZooC2COptions, render_report, run_zoo_c2c

    torch_threads(args.threads)
    options = ZooC2COptions(Path(args.output_dir), steps=args.steps, seed=args.seed,
                            traces=Path(args.traces) if args.traces else None, hidden=args.hidden, p_aware=args.p_aware,
                            eval_every=args.eval_every, suite=args.zoo)
    report = run_zoo_c2c(options, progress=lambda line: print(line, flush=True))
    print()
    print(render_report(report))
    print(f"\n{report['seconds']:.0f} s (training {report['train_seconds']:.0f} s, {report['torch_threads']} torch thread(s))")
    return 0


def torch_threads(workers: int) -> None:
    import torch

    torch.set_num_threads(max(1, workers))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densecomm", description="Dense KV-cache communication between heterogeneous LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="score the embedded pair: baselines and dense relay in both regimes")
    demo.add_argument("--zoo", default="v1", choices=ZOO_SUITES, help="the zoo suite whose committed pair and adapter run")
    demo.add_argument("--retrain", action="store_true", help="train the adapter again instead of loading the committed one")
    demo.add_argument("--adapter", help="adapter checkpoint directory (default: the committed zoo adapter)")
    demo.add_argument("--per-family", type=at_least(1), default=200, help="test examples per task family")
    demo.add_argument("--work-dir", default="runs/demo", help="output_dir of the --retrain run (densecomm train --config zoo)")
    demo.add_argument("--resume", action="store_true", help="with --retrain: continue the run in --work-dir")
    demo.add_argument("--json", action="store_true", help="print the table as JSON")
    demo.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    demo.add_argument("--in-process", action="store_true", help="relay in this process instead of through the gRPC services")
    demo.add_argument("--no-ray", action="store_true", help="host the services in this process rather than as Ray actors")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="methods x modes x task sets: accuracy, per-side tokens and FLOPs, issue 10's targets")
    ev.add_argument("--methods", default="sender,receiver,receiver-without-input,t2t,dense,c2c",
                    help="comma list of: sender, receiver, receiver-without-input, t2t, dense, dense-codec, c2c "
                         "(the default list skips c2c when the pair has no fuser)")
    ev.add_argument("--modes", default="aware,unaware", help="regimes of the methods that have them: aware, unaware")
    ev.add_argument("--tasks", default="zoo", help="comma list of 'zoo' and FORMAT=PATH (gsm8k, math, arc, mmlu-redux, "
                    "medqa, openbookqa, jsonl), e.g. zoo,gsm8k=gsm8k.jsonl")
    ev.add_argument("--zoo", default="v1", choices=ZOO_SUITES, help="the zoo suite: its committed pair, adapter, "
                    "fuser and prompt layouts, and the families 'zoo' names (v2: four in-domain, two OOD)")
    ev.add_argument("--split", default="test", choices=["test", "validation"], help="the zoo's split")
    ev.add_argument("--limit", type=int, help="examples per task set (zoo: per family; default 200 there, a whole file)")
    ev.add_argument("--seed", type=int, help="draw a seeded random subset of each task set (default: the first --limit)")
    ev.add_argument("--codec", default="", help="also run dense through this registered codec (both hops)")
    ev.add_argument("--codec-params", default="", help='JSON parameters of --codec, e.g. \'{"key_bits": 4}\'')
    ev.add_argument("--sender", help="local sender checkpoint directory (default: the zoo pair)")
    ev.add_argument("--receiver", help="local receiver checkpoint directory (with --sender)")
    ev.add_argument("--adapter", help="adapter checkpoint directory (default: the zoo adapter)")
    ev.add_argument("--c2c", help="C2C fuser directory from `densecomm baseline c2c` (default: the zoo's committed one)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="weights of --sender/--receiver (default: bfloat16 on CUDA, float32 on the CPU; the zoo pair runs as committed)")
    ev.add_argument("--batch-size", type=at_least(1), default=64)
    ev.add_argument("--max-new-tokens", type=at_least(1), default=24, help="answer budget of the answering model")
    ev.add_argument("--message-tokens", type=at_least(1), default=24, help="T2T: the sender's message budget")
    ev.add_argument("--prompt-format", default="", help="JSON overrides of PromptFormat fields (default: the zoo's layouts)")
    ev.add_argument("--output-dir", default="runs/eval", help="where accuracy.csv, tokens.csv, predictions.jsonl, eval.json go")
    ev.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    ev.add_argument("--quiet", action="store_true", help="no progress lines")
    ev.set_defaults(func=cmd_eval)

    zoo = sub.add_parser("zoo", help="the embedded model zoo").add_subparsers(dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="train the tiny LM pair from scratch and its adapter (seeded)")
    build.add_argument("--out", "--output", help="output root (default: the package's committed weights; runs/zoo-SUITE for --suite v2)")
    build.add_argument("--suite", choices=ZOO_SUITES, default="v1", help="task suite (v2: the generalising zoo with OOD families)")
    build.add_argument("--max-steps", type=at_least(1), help="smoke build: one stage of this many steps per LM, into --out")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--adapter-only", action="store_true", help="keep the LMs, retrain only the adapter")
    build.add_argument("--work-dir", help="output_dir of the adapter's training run (default: runs/zoo-build-SUITE)")
    build.add_argument("--resume", action="store_true", help="continue the adapter's training run in --work-dir")
    build.set_defaults(func=cmd_zoo_build)

    train = sub.add_parser("train", help="train an adapter for a local model pair: traces, phase I, phase II as Ray Train jobs")
    train.add_argument("--config", required=True, help="TOML run config (services/train/config.py; zoo)")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.add_argument("--dry-run", action="store_true", help="check the config and the data, print the plan, start nothing")
    train.add_argument("--stage", action="append", choices=["traces", "phase1", "phase2", "finalize"],
                       help="run only this stage (repeatable); default: all, in order")
    train.add_argument("--output-dir", help="override output_dir")
    train.add_argument("--seed", type=int, help="override seed")
    train.add_argument("--name", help="override name")
    train.set_defaults(func=cmd_train)

    codec_cmd = sub.add_parser("codec", help="KV codec tools").add_subparsers(dest="codec_command", required=True)
    calibrate = codec_cmd.add_parser("calibrate", help="fit the pca codec's KV bases beside a sender (and its adapter)")
    calibrate.add_argument("--sender", help="sender checkpoint directory (default: the embedded zoo sender)")
    calibrate.add_argument("--adapter", help="adapter directory: also fit the receiver space it writes (needs --receiver)")
    calibrate.add_argument("--receiver", help="receiver checkpoint directory (with --adapter)")
    calibrate.add_argument("--texts", help="calibration texts, one per line (default: the zoo's train-split contexts)")
    calibrate.add_argument("--limit", type=at_least(1), default=900, help="at most this many texts")
    calibrate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    calibrate.add_argument("--device", default="cpu", help="where both models run the calibration prefills (cpu, cuda, cuda:N)")
    calibrate.add_argument("--keep-rope", action="store_true", help="fit on RoPE-applied keys (for strip_rope=false)")
    calibrate.set_defaults(func=cmd_codec_calibrate)

    serve = sub.add_parser("serve", help="start sender, adapter, receiver and the Relay ingress (on Ray)")
    serve.add_argument("--config", help="TOML service config (default: the embedded zoo route on loopback)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=at_least(0), help="Relay port (default 50051)")
    serve.add_argument("--no-ray", action="store_true", help="host all services in this process instead of Ray actors")
    serve.set_defaults(func=cmd_serve)

    relay = sub.add_parser("relay", help="send one input through a running stack and stream the receiver's answer")
    relay.add_argument("text", help="the sender's input X")
    relay.add_argument("--address", default="127.0.0.1:50051")
    relay.add_argument("--mode", choices=["aware", "unaware"], default="unaware")
    relay.add_argument("--route", default="")
    relay.add_argument("--codec", default="")
    relay.add_argument("--codec-params", default="", help='JSON, e.g. \'{"key_bits": 4}\'')
    relay.add_argument("--receiver-codec", default="", help="codec of the adapter -> receiver hop (default: --codec's)")
    relay.add_argument("--receiver-codec-params", default="", help="JSON parameters of --receiver-codec")
    relay.add_argument("--receiver-prompt", default="", help="the receiver's own prompt after the cache (--mode aware only)")
    relay.add_argument("--max-new-tokens", type=at_least(0), default=0)
    relay.add_argument("--temperature", type=float, default=0.0)
    relay.add_argument("--top-p", type=float, default=0.0)
    relay.add_argument("--seed", type=int, default=0)
    relay.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    relay.add_argument("--on-cache-failure", choices=["", "error", "text"], default="",
                       help="when the cache path fails: error, or text (the receiver reads the input); empty = the route's policy")
    relay.add_argument("--token", default="", help="bearer token (default: $DENSECOMM_TOKEN)")
    relay.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    relay.add_argument("--tls-ca", default="", help="PEM CA that signed the Relay's certificate (implies --tls)")
    relay.add_argument("--tls-cert", default="", help="PEM client certificate, for a Relay that asks for mTLS")
    relay.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    relay.add_argument("--tls-server-name", default="", help="name to verify in the Relay's certificate (default: the address's host)")
    relay.set_defaults(func=cmd_relay)

    baseline = sub.add_parser("baseline", help="train the paper's baselines on the embedded zoo")
    baseline_sub = baseline.add_subparsers(dest="baseline_command", required=True)
    c2c = baseline_sub.add_parser("c2c", help="C2C-style fuser: generation loss only, checkpoint chosen on validation, scored on test")
    c2c.add_argument("--output-dir", required=True, help="gets fuser/ (the checkpoint) and report.json")
    c2c.add_argument("--zoo", default="v1", choices=ZOO_SUITES, help="the zoo suite whose committed pair it fuses")
    c2c.add_argument("--steps", type=at_least(1), default=1200)
    c2c.add_argument("--seed", type=int, default=0)
    c2c.add_argument("--traces", help="receiver-self traces of the zoo (a `densecomm train` traces.jsonl); default: build them")
    c2c.add_argument("--hidden", type=at_least(1), default=128, help="width of each layer's fuser MLP")
    c2c.add_argument("--p-aware", type=fraction, default=0.5, help="share of context-aware training examples")
    c2c.add_argument("--eval-every", type=at_least(1), default=200, help="validation (model selection) interval in steps")
    c2c.add_argument("--threads", type=at_least(1), default=1, help="torch threads")
    c2c.set_defaults(func=cmd_baseline_c2c)

    bench = sub.add_parser("bench", help="benchmarks that print ours vs the baseline, measured in one run")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    codec = bench_sub.add_parser("codec", help="ratio and MB/s of every codec vs zstd -1; accuracy through lossy codecs")
    codec.add_argument("--repeats", type=at_least(1), default=10)
    codec.add_argument("--workers", type=at_least(1), default=2, help="threads for chunk-parallel encode/decode")
    codec.add_argument("--tokens", type=at_least(1), default=180, help="tokens of the Qwen3-4B-geometry cache")
    codec.add_argument("--per-family", type=at_least(1), default=100, help="zoo test examples per family for the accuracy table")
    codec.add_argument("--skip-accuracy", action="store_true")
    codec.add_argument("--hops", type=int_list(0, 1), default="0,1", help="hops the accuracy table sends through the codec: 0, 1 or 0,1")
    codec.add_argument("--profile", action="store_true", help="also print where lossless encode/decode time goes")
    codec.add_argument("--json", action="store_true")
    codec.set_defaults(func=cmd_bench_codec)
    train_bench = bench_sub.add_parser("train", help="seconds per training step with 1 vs 2 Ray Train workers (same global batch)")
    train_bench.add_argument("--config", default="zoo")
    train_bench.add_argument("--steps", type=at_least(1), default=100, help="steps per phase and worker count")
    train_bench.add_argument("--workers", type=int_list(1), default="1,2", help="worker counts to compare")
    train_bench.set_defaults(func=cmd_bench_train)
    resume_bench = bench_sub.add_parser("resume", help="a training run SIGKILLed part way and --resumed vs an uninterrupted one")
    resume_bench.add_argument("--config", default="zoo")
    resume_bench.add_argument("--output-dir", required=True, help="holds the runs (uninterrupted/, killed/) and their logs")
    resume_bench.add_argument("--at", type=float, default=0.5, help="fraction of all optimizer steps at which to kill")
    resume_bench.add_argument("--seed", type=int, default=0)
    resume_bench.add_argument("--reference", help="a finished run of the same config to compare with, instead of running one")
    resume_bench.set_defaults(func=cmd_bench_resume)
    relay_bench = bench_sub.add_parser("relay", help="hop throughput vs a bare gRPC byte stream, Relay latency and overhead, KV handoff, targets")
    relay_bench.add_argument("--repeats", type=at_least(1), default=3)
    relay_bench.add_argument("--workers", type=at_least(1), default=2)
    relay_bench.add_argument("--tokens", type=at_least(1), default=180)
    relay_bench.add_argument("--requests", type=at_least(1), default=48, help="Relay calls per concurrency level")
    relay_bench.add_argument("--chunk-tokens", type=at_least(0), default=0)
    relay_bench.add_argument("--no-ray", action="store_true", help="host the services in this process")
    relay_bench.add_argument("--frame-bytes", type=at_least(0), default=0, help="KV stream message size (default: the services' frame_bytes)")
    relay_bench.add_argument("--profile", action="store_true", help="also print where one hop's time goes, stage by stage")
    relay_bench.add_argument("--json", action="store_true")
    relay_bench.set_defaults(func=cmd_bench_relay)
    load_bench = bench_sub.add_parser("load", help="Relay under load: throughput, p50/p95/p99, statuses, RSS, kills, TLS cost")
    load_bench.add_argument("--requests", type=at_least(1), default=2000, help="mixed calls (good, bad, client-cancelled), in two halves")
    load_bench.add_argument("--concurrency", type=at_least(1), default=32)
    load_bench.add_argument("--timeout", type=float, default=20.0, help="every call's deadline, s")
    load_bench.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock bound of the whole load")
    load_bench.add_argument("--faults", action="store_true", help="kill sender, adapter, receiver in turn under load (Ray only)")
    load_bench.add_argument("--fault-requests", type=at_least(1), default=300, help="calls per kill run")
    load_bench.add_argument("--tls-requests", type=at_least(0), default=300, help="good calls per side of TLS on vs off (0 = skip)")
    load_bench.add_argument("--no-ray", action="store_true", help="host the services in this process")
    load_bench.add_argument("--json", action="store_true")
    load_bench.set_defaults(func=cmd_bench_load)

    from services import analyze

    analyze.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from densecomm_core.errors import DenseCommError

    try:
        return args.func(args)
    except DenseCommError as exc:
        print(f"densecomm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"densecomm: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
