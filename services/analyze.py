"""`densecomm analyze cs | pca | recon`: run an analysis on a pair (default: the embedded zoo pair and its committed adapter), print its tables, write PNG, Markdown and JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from services.train.config import ZOO_SUITES


def load_pair(adapter_dir: str | None, suite: str = "v1"):
    from densecomm_core.adapter import DenseAdapter
    from densecomm_core.zoo.pair import load_zoo_pair, zoo_adapter_dir

    sender, receiver = load_zoo_pair(suite=suite)
    adapter = DenseAdapter.load(Path(adapter_dir) if adapter_dir else zoo_adapter_dir(suite=suite), sender.geometry, receiver.geometry)
    return sender, receiver, adapter


def zoo_test_examples(suite: str, per_family: int):
    """``per_family`` test examples of each in-domain family of the zoo ``suite`` (v1: ``tasks.make_split``)."""
    from densecomm_core.zoo.suite import get_suite

    return get_suite(suite).adapter_split("test", per_family)


def alpha_arg(text: str) -> float | None:
    """--alpha: a positive float, or 'cv' for LassoCV."""
    if text == "cv":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--alpha takes a positive number or 'cv', got {text!r}")
    return value


def progress_printer(enabled: bool):
    started = time.perf_counter()
    return (lambda line: print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)) if enabled else (lambda line: None)


def cmd_cs(args: argparse.Namespace) -> int:
    from densecomm_core.analysis.cs import CSConfig, group_table, run_cs, spearman_lines, sweep_table
    from densecomm_core.analysis.plots import plot_cs

    config = CSConfig(masks=args.masks, examples_per_family=args.examples, fraction=args.fraction, alpha=args.alpha,
                      topk=tuple(args.topk), seeds=args.seeds, rank_by=args.rank_by,
                      filter_site=args.filter_at, seed=args.seed, batch_size=args.batch_size)
    sender, receiver, adapter = load_pair(args.adapter, args.zoo)
    result = run_cs(sender, receiver, adapter, config, progress_printer(not args.json), zoo_test_examples(args.zoo, args.examples))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_cs(result, out / "cs_topk.png")
    layers, heads, kv_heads = result.sender_layout
    summary = (
        f"# Compressed-sensing head importance\n\nSender: {layers} layers x {heads} query heads ({kv_heads} KV groups per layer); "
        f"{config.masks} masks ({result.distinct_masks} distinct) ablating {result.heads_per_mask} head(s) each; {result.examples} test examples; "
        f"Lasso alpha {'LassoCV' if args.alpha is None else args.alpha}; groups ranked by the {config.rank_by} scores; "
        f"dropped groups zeroed at the {config.filter_site} side.\n\n"
        f"Unfiltered relay: aware {result.baseline['aware']:.3f}, unaware {result.baseline['unaware']:.3f}. "
        f"Receiver with input {result.receiver_alone['with input']:.3f}, without input {result.receiver_alone['without input']:.3f}."
    )
    report = "\n\n".join([
        summary,
        "## Top-K sweep\n\n" + sweep_table(result),
        "## Sender KV groups\n\n" + group_table(result),
        "## Gates vs CS scores\n\n" + spearman_lines(result),
    ])
    (out / "cs.md").write_text(report + "\n")
    (out / "cs.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print("\n" + report + f"\n\nwrote {png}, {out / 'cs.md'}, {out / 'cs.json'} ({result.seconds:.0f} s)")
    return 0


def cmd_pca(args: argparse.Namespace) -> int:
    from densecomm_core.analysis.pca import run_pca
    from densecomm_core.analysis.plots import plot_pca
    sender, receiver, adapter = load_pair(args.adapter, args.zoo)
    examples = zoo_test_examples(args.zoo, args.examples)
    layers = tuple(args.layers) if args.layers else None
    progress = progress_printer(not args.json)
    progress(f"prefilling sender and receiver on {len(examples)} test contexts")
    result = run_pca(sender, receiver, adapter, [e.context for e in examples], layers, raw_sender=args.raw_sender)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_pca(result, out / "pca_values.png")
    report = (f"# PCA of value vectors\n\n{result.tokens} tokens per cloud (BOS left out); value widths sender {result.widths[0]}, "
              f"receiver {result.widths[1]}; raw sender: {result.raw_sender}. Centroid shift: distance of a cloud's centroid from "
              "the receiver's on its two PCs, in units of the receiver's spread there; spread: a cloud's RMS spread on that plane over the receiver's; paired error: mean ‖v_T − v_R‖ over "
              "tokens / mean ‖v_R − mean‖, full width.\n\n" + result.table())
    (out / "pca.md").write_text(report + "\n")
    (out / "pca.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    print(json.dumps(result.to_dict()) if args.json else "\n" + report + f"\n\nwrote {png}, {out / 'pca.md'}")
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    from densecomm_core.analysis.recon import recon_table, reconstruction_by_set
    from densecomm_core.zoo.suite import get_suite

    suite = get_suite(args.zoo)
    sender, receiver, adapter = load_pair(args.adapter, args.zoo)
    sets = {family: [e.context for e in suite.make_split("test", args.examples, [family])] for family in suite.family_names}
    progress_printer(not args.json)(f"reconstruction loss on {args.examples} test contexts of each of {len(sets)} task sets")
    rows = reconstruction_by_set(sender, receiver, adapter, sets, suite.prompt_format, args.batch_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ("# Reconstruction loss by task set\n\nThe adapter's output against the receiver's own cache of the same input "
              "(phase I's loss, eq. 5), on the test split; OOD sets are never in adapter training.\n\n"
              + recon_table(rows, suite.out_of_domain))
    data = {"zoo": args.zoo, "adapter": str(args.adapter or "committed"), "rows": [r.to_dict() for r in rows],
            "out_of_domain": list(suite.out_of_domain)}
    (out / "recon.md").write_text(report + "\n")
    (out / "recon.json").write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data) if args.json else "\n" + report + f"\n\nwrote {out / 'recon.md'}, {out / 'recon.json'}")
    return 0


def add_parser(sub) -> None:
    """`densecomm analyze cs|pca|recon` on the subparsers of the main CLI."""
    from services.cli import at_least, int_list  # this module is imported by services.cli, after they are defined

    analyze = sub.add_parser("analyze", help="post-hoc analyses: CS head importance (Figure 5), PCA of caches (Figure 7), "
                                             "reconstruction by task set")
    kinds = analyze.add_subparsers(dest="analyze_command", required=True)
    cs = kinds.add_parser("cs", help="compressed-sensing head importance, top-K group sweep vs random, gates vs scores")
    cs.add_argument("--zoo", default="v1", choices=ZOO_SUITES, help="the zoo suite whose pair and adapter are analysed")
    cs.add_argument("--masks", type=at_least(1), default=48, help="M random ablation masks")
    cs.add_argument("--examples", type=at_least(1), default=40, help="test examples per task family, scored for every mask")
    cs.add_argument("--fraction", type=float, default=0.05, help="share of sender query heads ablated per mask (at least one)")
    cs.add_argument("--alpha", type=alpha_arg, default=1e-4, help="Lasso penalty (paper 1e-4), or 'cv' for LassoCV")
    cs.add_argument("--topk", type=int_list(0), default=[], help="K levels, e.g. 0,1,2,4,8 (default: every K up to 16 groups, else powers of 2)")
    cs.add_argument("--seeds", type=at_least(1), default=3, help="random-selection repeats per K")
    cs.add_argument("--rank-by", choices=["unaware", "aware", "both"], default="unaware", help="regime whose scores rank the groups")
    cs.add_argument("--filter-at", choices=["sender", "receiver"], default="sender",
                    help="zero dropped groups in the transmitted sender cache (paper C.3) or in the adapter's output")
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--batch-size", type=at_least(1), default=128)
    cs.add_argument("--adapter", help="adapter directory (default: the committed zoo adapter)")
    cs.add_argument("--output-dir", default="runs/analyze", help="where cs_topk.png, cs.md and cs.json go")
    cs.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    cs.set_defaults(func=cmd_cs)
    pca = kinds.add_parser("pca", help="receiver / transformed sender / raw sender value vectors on the receiver's PCs")
    pca.add_argument("--zoo", default="v1", choices=ZOO_SUITES, help="the zoo suite whose pair and adapter are analysed")
    pca.add_argument("--examples", type=at_least(1), default=100, help="test contexts per task family")
    pca.add_argument("--layers", type=int_list(0), default=[], help="receiver layers, e.g. 1,4 (default: an early and a late one, as the paper's L7/L34 of 36)")
    pca.add_argument("--raw-sender", choices=["pad", "own"], default="pad",
                     help="raw sender values zero-padded onto the receiver's PCs (paper), or on their own PCs")
    pca.add_argument("--adapter", help="adapter directory (default: the committed zoo adapter)")
    pca.add_argument("--output-dir", default="runs/analyze", help="where pca_values.png, pca.md and pca.json go")
    pca.add_argument("--json", action="store_true")
    pca.set_defaults(func=cmd_pca)
    recon = kinds.add_parser("recon", help="the adapter's reconstruction loss against the receiver's own cache, per task set (OOD included)")
    recon.add_argument("--zoo", default="v1", choices=ZOO_SUITES, help="the zoo suite whose pair and adapter are analysed")
    recon.add_argument("--examples", type=at_least(1), default=100, help="test contexts per task family")
    recon.add_argument("--batch-size", type=at_least(1), default=64)
    recon.add_argument("--adapter", help="adapter directory (default: the committed zoo adapter)")
    recon.add_argument("--output-dir", default="runs/analyze", help="where recon.md and recon.json go")
    recon.add_argument("--json", action="store_true")
    recon.set_defaults(func=cmd_recon)
