"""The analyses' PNGs, drawn with matplotlib (imported inside each function, Agg backend, no display needed).

    plot_cs(result, path)    like the paper's Figure 5: accuracy vs K kept KV groups, CS vs random, both regimes;
                             beside it, each sender group's CS score against its mean adapter gate
    plot_pca(result, path)   like Figure 7: receiver / transformed sender / raw sender values on the receiver's PCs
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from densecomm_core.analysis.cs import CSResult
from densecomm_core.analysis.pca import PCAResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cs(result: CSResult, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, side) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    ks = [row.k for row in result.sweep]
    total = result.group_scores["ranking"].size
    for mode, colour, label in (("aware", "tab:blue", "context-aware"), ("unaware", "tab:red", "context-unaware")):
        ax.plot(ks, [row.cs[mode] for row in result.sweep], "-o", color=colour, label=f"{label}: CS top-K")
        ax.errorbar(ks, [row.random_mean[mode] for row in result.sweep], yerr=[row.random_std[mode] for row in result.sweep],
                    fmt="s", mfc="none", color=colour, capsize=3, label=f"{label}: random K (mean ± sd, {result.config.seeds} seeds)")
    ax.axhline(result.receiver_alone["with input"], color="gray", ls="--", lw=1, label="receiver with input")
    ax.axhline(result.receiver_alone["without input"], color="gray", ls=":", lw=1, label="receiver without input")
    ax.set_xlabel(f"KV groups kept, K (of {total} sender groups; dropped groups zeroed at the {result.config.filter_site} side)")
    ax.set_ylabel(f"accuracy (mean over families, {result.examples} examples)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"CS head selection: {result.config.masks} masks x {result.heads_per_mask} head(s) ablated, ranked by {result.config.rank_by}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    layers, _, kv_heads = result.sender_layout
    scores, gates = result.group_scores["ranking"].ravel(), result.gates.ravel()
    side.scatter(scores, gates, c=np.repeat(np.arange(layers), kv_heads), cmap="viridis", s=40)
    for i, (x, y) in enumerate(zip(scores, gates)):
        if math.isfinite(y):
            side.annotate(f"L{i // kv_heads}G{i % kv_heads}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    rho, p = result.spearman["ranking"]
    side.set_xlabel(f"CS group score ({result.config.rank_by}): accuracy lost when ablated")
    side.set_ylabel("mean adapter gate γ of the receiver groups it feeds")
    side.set_title(f"gates vs CS scores: Spearman ρ = {rho:+.2f} (p = {p:.2f})")
    side.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pca(result: PCAResult, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(result.layers), figsize=(5.5 * len(result.layers), 5), squeeze=False)
    raw_label = "raw sender (zero-padded)" if result.raw_sender == "pad" else "raw sender (its own PCs)"
    for ax, clouds in zip(axes[0], result.layers):
        # the raw sender last: zero-padded onto the receiver's axes it is a tight blob the others would hide
        for points, colour, label in ((clouds.receiver, "tab:blue", "receiver (native)"), (clouds.transformed, "tab:orange", "transformed sender T_θ"),
                                      (clouds.raw_sender, "dimgray", raw_label)):
            ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.3, color=colour, label=label, rasterized=True)
        ax.set_title(f"receiver layer {clouds.receiver_layer} (sender layer {clouds.sender_layer}): value vectors")
        ax.set_xlabel(f"receiver PC1 ({100 * clouds.explained[0]:.0f} % var)")
        ax.set_ylabel(f"receiver PC2 ({100 * clouds.explained[1]:.0f} % var)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, markerscale=3)
    fig.suptitle(f"PCA of KV value vectors, {result.tokens} tokens per cloud")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
