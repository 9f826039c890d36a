"""Where the caches lie (paper §5.3, Figure 7): per-token value vectors on the receiver's first two principal components.

    value_vectors(cache, layer, skip_first)      (N, G·d) value vectors of a cache layer's real tokens, heads concatenated
    principal_axes(x, k)                          mean (D,), top-k axes (k, D) and their explained-variance ratios
    run_pca(sender, receiver, adapter, contexts, layers)  PCAResult: three point clouds per receiver layer + figures

For receiver layer l the three clouds are, on the same inputs X: the receiver's own cache (its prefill
of X), the transformed sender cache T_θ(C_S(X)) (its values: RoPE touches keys only) and the raw sender
cache at the sender layer that feeds l, a(l) = layer_map[l]. As in the paper, all three are projected on
the axes of the receiver's native values, so they share one plane. The raw sender's per-token vector
has another width (G_S·d_S vs G_R·d_R); ``raw_sender="pad"`` zero-pads it to the receiver's width (the
paper projects it on the receiver's PCs, where it "occupies a disjoint region"); ``"own"`` puts it on its
own first two PCs instead (its coordinates are then not comparable with the other two clouds).
The BOS slot is left out by default: it is the same token in every row, one repeated point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.analysis import AnalysisError
from densecomm_core.cache import KVCache
from densecomm_core.models import LoadedModel
from densecomm_core.relay import DenseRelay, PromptFormat, sender_prefill, transform_cache

RAW_SENDER = ("pad", "own")


def value_vectors(cache: KVCache, layer: int, skip_first: bool = True) -> np.ndarray:
    """(N, G·d) float64: the values of ``layer`` at every real token (row-major over the batch), heads concatenated."""
    if not 0 <= layer < cache.num_layers:
        raise AnalysisError(f"layer {layer} is outside the cache's {cache.num_layers} layers")
    values = cache.values[layer].detach().float().cpu()  # (B, G, T, d)
    mask = cache.mask.detach().cpu().clone()
    if skip_first:
        mask[:, 0] = False
    per_token = values.permute(0, 2, 1, 3).flatten(2)  # (B, T, G·d)
    return per_token[mask].double().numpy()


def principal_axes(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (D,), the top-``k`` principal axes (k, D) and the share of variance each explains."""
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < k:
        raise AnalysisError(f"need at least 2 points of dimension >= {k}, got {x.shape}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s**2
    return mean, vt[:k], variance[:k] / variance.sum()


@dataclass
class LayerClouds:
    """The three 2-D point clouds of one receiver layer and how far apart they are."""

    receiver_layer: int
    sender_layer: int
    receiver: np.ndarray  # (N, 2) the receiver's own values on its PCs
    transformed: np.ndarray  # (N, 2) T_θ's values on the receiver's PCs
    raw_sender: np.ndarray  # (N, 2) raw sender values (padded onto the receiver's PCs, or on their own)
    explained: np.ndarray  # (2,) variance share of the receiver's two axes
    transformed_error: float  # mean ‖v_T − v_R‖ / mean ‖v_R − μ_R‖ over paired tokens, full width
    centroid_shift: dict[str, float]  # 2-D distance of each cloud's centroid from the receiver's, in receiver std units
    spread: dict[str, float]  # each cloud's RMS spread on the plane over the receiver's (1 = as wide as the native cloud)


@dataclass
class PCAResult:
    layers: list[LayerClouds]
    tokens: int  # points per cloud
    raw_sender: str  # "pad" or "own"
    widths: tuple[int, int]  # per-token value width of sender (G_S·d_S) and receiver (G_R·d_R)

    def table(self) -> str:
        """Markdown: per layer, explained variance and how far the transformed and raw clouds sit from the receiver's."""
        lines = ["| receiver layer | sender layer | PC1+PC2 variance | centroid shift transformed | centroid shift raw sender "
                 "| spread transformed | spread raw sender | paired error transformed |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in self.layers:
            lines.append(f"| {c.receiver_layer} | {c.sender_layer} | {c.explained.sum():.3f} | {c.centroid_shift['transformed']:.3f} | "
                         f"{c.centroid_shift['raw sender']:.3f} | {c.spread['transformed']:.3f} | {c.spread['raw sender']:.3f} | "
                         f"{c.transformed_error:.3f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "raw_sender": self.raw_sender, "widths": list(self.widths),
                "layers": [{"receiver_layer": c.receiver_layer, "sender_layer": c.sender_layer, "explained": c.explained.tolist(),
                            "transformed_error": c.transformed_error, "centroid_shift": c.centroid_shift, "spread": c.spread} for c in self.layers]}


def rms_spread(points: np.ndarray) -> float:
    """Root-mean-square distance of the points (N, 2) from their centroid."""
    return float(np.sqrt(points.var(axis=0).sum()))


def centroid_shift(points: np.ndarray, reference: np.ndarray) -> float:
    """Distance between the two clouds' centroids (N, 2), in units of the reference cloud's RMS spread."""
    return float(np.linalg.norm(points.mean(axis=0) - reference.mean(axis=0)) / rms_spread(reference))


def default_layers(num_layers: int) -> tuple[int, int]:
    """An early and a late layer at the paper's relative depths (L7 and L34 of Qwen3-4B's 36)."""
    early = min(num_layers - 1, max(0, round(7 / 35 * (num_layers - 1))))
    late = min(num_layers - 1, round(34 / 35 * (num_layers - 1)))
    return early, late


@torch.no_grad()
def run_pca(
    sender: LoadedModel,
    receiver: LoadedModel,
    adapter: DenseAdapter,
    contexts: Sequence[str],
    layers: Sequence[int] | None = None,
    raw_sender: str = "pad",
    skip_first: bool = True,
    prompt_format: PromptFormat = PromptFormat(),
) -> PCAResult:
    """Prefill both models on ``contexts``, map the sender's cache, and project the three value clouds per layer."""
    if raw_sender not in RAW_SENDER:
        raise AnalysisError(f"raw_sender must be one of {RAW_SENDER}, got {raw_sender!r}")
    if not contexts:
        raise AnalysisError("no contexts given")
    DenseRelay(sender, receiver, adapter, prompt_format)  # checks geometry and tokenizer
    layers = list(layers) if layers is not None else list(default_layers(receiver.geometry.num_layers))
    texts = [prompt_format.sender.format(context=c) for c in contexts]
    sent = sender_prefill(sender, texts)
    own = sender_prefill(receiver, texts)  # the receiver's native cache of the same tokens
    mapped = transform_cache(adapter, sent, sender, receiver)
    if not torch.equal(own.mask.cpu(), mapped.mask.cpu()):
        raise AnalysisError("sender and receiver tokenized the inputs differently; the clouds cannot be paired")
    s_width = sender.geometry.num_kv_heads * sender.geometry.head_dim
    r_width = receiver.geometry.num_kv_heads * receiver.geometry.head_dim
    if raw_sender == "pad" and s_width > r_width:
        raise AnalysisError(f"raw sender values are {s_width} wide, wider than the receiver's {r_width}: use raw_sender='own'")
    clouds = []
    for layer in layers:
        if not 0 <= layer < receiver.geometry.num_layers:
            raise AnalysisError(f"receiver layer {layer} is outside 0..{receiver.geometry.num_layers - 1}")
        source = adapter.config.layer_map[layer]
        native, transformed = value_vectors(own, layer, skip_first), value_vectors(mapped, layer, skip_first)
        raw = value_vectors(sent, source, skip_first)
        mean, axes, explained = principal_axes(native)
        if raw_sender == "pad":
            raw_2d = (np.pad(raw, ((0, 0), (0, r_width - s_width))) - mean) @ axes.T  # (N, 2)
        else:
            raw_mean, raw_axes, _ = principal_axes(raw)
            raw_2d = (raw - raw_mean) @ raw_axes.T
        native_2d, transformed_2d = (native - mean) @ axes.T, (transformed - mean) @ axes.T  # (N, 2)
        error = float(np.linalg.norm(transformed - native, axis=1).mean() / np.linalg.norm(native - mean, axis=1).mean())
        shifts = {"transformed": centroid_shift(transformed_2d, native_2d),
                  "raw sender": centroid_shift(raw_2d, native_2d) if raw_sender == "pad" else float("nan")}
        spreads = {"transformed": rms_spread(transformed_2d) / rms_spread(native_2d), "raw sender": rms_spread(raw_2d) / rms_spread(native_2d)}
        clouds.append(LayerClouds(layer, source, native_2d, transformed_2d, raw_2d, explained, error, shifts, spreads))
    return PCAResult(clouds, int(clouds[0].receiver.shape[0]), raw_sender, (s_width, r_width))
