"""Compressed-sensing head importance (paper §3.1, appendix C) on a heterogeneous pair, and the top-K group sweep.

    stratified_masks(layers, heads, M, fraction, seed)   (M, L, H) ablation masks, balanced over layers and heads
    fit_head_importance(ablated, y, y0, alpha)           Lasso of ỹ = y − y0 on the ablation indicators -> importance
    group_scores(importance, kv_heads)                   per-(layer, KV group) sums of query-head importances (eq. 3)
    top_groups(scores, k) / random_groups(shape, k, seed) keep masks of the sweep
    gates_by_sender_group(gates, layer_map, group_map, shape)  the adapter's γ mapped back to sender groups
    rank_correlation(a, b)                               Spearman ρ (scipy, imported inside)
    RelayScorer                                          accuracy of the dense relay in both regimes on a fixed set
    run_cs(sender, receiver, adapter, config)            masks -> accuracies -> Lasso -> scores -> sweep -> CSResult

Sign convention: the regressors are *ablation* indicators (1 = head zeroed), so a head whose removal
costs accuracy gets a negative coefficient; its importance is minus that coefficient (the expected
accuracy drop when it is ablated). With an intercept this equals the coefficient on the paper's
retention indicators (1 − ablated), so "larger positive = more important" holds as in §3.1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.analysis import AnalysisError
from densecomm_core.analysis.ablation import ablate_heads, head_layout, keep_kv_groups, receiver_keep
from densecomm_core.cache import KVCache
from densecomm_core.evaluation.accuracy import accuracy_by_family
from densecomm_core.generation import GenerationConfig
from densecomm_core.models import LoadedModel
from densecomm_core.relay import (
    ContextMode,
    DenseRelay,
    PromptFormat,
    answer_with_input,
    answer_without_input,
    receiver_generate,
    sender_prefill,
    transform_cache,
)
from densecomm_core.zoo import tasks

log = logging.getLogger(__name__)

MODES = (ContextMode.AWARE, ContextMode.UNAWARE)
FILTER_SITES = ("sender", "receiver")  # where the sweep zeroes dropped groups: the transmitted sender cache, or T_θ's output
RANK_BY = ("unaware", "aware", "both")


# ---- masks and regression ------------------------------------------------------------------------
def _take_distinct(queue: list[int], n: int, size: int, rng: np.random.Generator) -> list[int]:
    """Pop ``n`` distinct items from ``queue``, refilling it with fresh permutations of range(size)."""
    chosen: list[int] = []
    while len(chosen) < n:
        index = next((i for i, x in enumerate(queue) if x not in chosen), None)
        if index is None:
            queue.extend(int(x) for x in rng.permutation(size))
            continue
        chosen.append(queue.pop(index))
    return chosen


def stratified_masks(layers: int, heads: int, num_masks: int, fraction: float = 0.05, seed: int = 0) -> np.ndarray:
    """(M, L, H) bool ablation masks, each zeroing k = max(1, round(fraction·L·H)) query heads.

    Stratified over layers: every mask ablates floor(k/L) heads in each layer, and the k mod L extra
    heads go to layers drawn from a cycling random permutation, so over the masks every layer is hit
    equally often (±1). Within a layer the heads also come from a cycling permutation, so every head
    is ablated about M·k/(L·H) times. On the tiny zoo (16 heads) 5 % rounds to 0: k = 1 head per mask,
    one layer per mask in turn."""
    if num_masks < 1:
        raise AnalysisError(f"num_masks must be >= 1, got {num_masks}")
    if not 0.0 < fraction < 1.0:
        raise AnalysisError(f"fraction must be in (0, 1), got {fraction}")
    k = max(1, round(fraction * layers * heads))
    base, extra = divmod(k, layers)
    if base + (1 if extra else 0) > heads:
        raise AnalysisError(f"fraction {fraction} asks for {k} heads per mask, more than {heads} per layer allows")
    rng = np.random.default_rng(seed)
    layer_queue: list[int] = []
    head_queues: list[list[int]] = [[] for _ in range(layers)]
    masks = np.zeros((num_masks, layers, heads), dtype=bool)
    for m in range(num_masks):
        counts = np.full(layers, base)
        counts[_take_distinct(layer_queue, extra, layers, rng)] += 1
        for layer in range(layers):
            masks[m, layer, _take_distinct(head_queues[layer], int(counts[layer]), heads, rng)] = True
    return masks


def fit_head_importance(ablated: np.ndarray, y: np.ndarray, baseline: float, alpha: float | None = 1e-4) -> np.ndarray:
    """Lasso of ỹ = y − y0 on the ablation indicators (M, H) with an intercept (paper eq. 2, C.2).

    Returns importance (H,) = −coefficient: the accuracy a head's ablation costs. ``alpha`` None picks
    the penalty by 5-fold LassoCV (needs M >= 5); the paper uses α = 1e-4."""
    from sklearn.linear_model import Lasso, LassoCV

    ablated = np.asarray(ablated, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if ablated.ndim != 2 or y.shape != (ablated.shape[0],):
        raise AnalysisError(f"need ablated (M, H) and y (M,), got {ablated.shape} and {y.shape}")
    target = y - baseline
    if np.ptp(target) == 0.0:
        return np.zeros(ablated.shape[1])  # no mask changed the accuracy: nothing to attribute
    if alpha is None:
        if ablated.shape[0] < 5:
            raise AnalysisError(f"LassoCV needs at least 5 masks, got {ablated.shape[0]}")
        model = LassoCV(cv=5, max_iter=50_000, random_state=0).fit(ablated, target)
    else:
        model = Lasso(alpha=alpha, max_iter=50_000).fit(ablated, target)
    return -model.coef_


def group_scores(importance: np.ndarray, kv_heads: int) -> np.ndarray:
    """(L, H) query-head importances -> (L, G) KV-group scores: the sum over the H/G query heads that
    share each KV head (transformers' repeat_kv order: query heads g·H/G .. (g+1)·H/G − 1 read KV head g)."""
    layers, heads = importance.shape
    if heads % kv_heads:
        raise AnalysisError(f"{heads} query heads do not split into {kv_heads} KV groups")
    return importance.reshape(layers, kv_heads, heads // kv_heads).sum(axis=2)


def top_groups(scores: np.ndarray, k: int) -> np.ndarray:
    """(L, G) bool: the ``k`` highest-scoring groups (ties: lower flat index first)."""
    if not 0 <= k <= scores.size:
        raise AnalysisError(f"k must be in [0, {scores.size}], got {k}")
    order = np.argsort(-scores.ravel(), kind="stable")
    keep = np.zeros(scores.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def random_groups(shape: tuple[int, int], k: int, seed: int) -> np.ndarray:
    """(L, G) bool: ``k`` groups drawn uniformly without replacement."""
    size = shape[0] * shape[1]
    if not 0 <= k <= size:
        raise AnalysisError(f"k must be in [0, {size}], got {k}")
    keep = np.zeros(size, dtype=bool)
    keep[np.random.default_rng(seed).choice(size, size=k, replace=False)] = True
    return keep.reshape(shape)


def gates_by_sender_group(gates: np.ndarray, layer_map: Sequence[int], group_map: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Receiver gates γ (L_R, G_R) -> (L_S, G_S): the mean γ of the receiver groups computed from each sender
    group, i.e. of every (l, g) with layer_map[l] = a and group_map[g] = s (eq. 11); NaN where none reads it."""
    total, count = np.zeros(shape), np.zeros(shape)
    for l, a in enumerate(layer_map):
        for g, s in enumerate(group_map):
            total[a, s] += gates[l, g]
            count[a, s] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman ρ and its p-value over the entries finite in both (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    if finite.sum() < 3 or np.ptp(a[finite]) == 0 or np.ptp(b[finite]) == 0:
        return math.nan, math.nan
    result = spearmanr(a[finite], b[finite])
    return float(result.statistic), float(result.pvalue)


# ---- scoring the relay ---------------------------------------------------------------------------
class RelayScorer:
    """Mean accuracy (over task families) of the dense relay in both regimes on one fixed example set.

    ``prefill()`` gives the sender's caches batch by batch (under whatever hooks are active on the
    sender); ``score(caches, keep, site)`` maps them through T_θ, optionally zeroing the dropped sender
    KV groups in the transmitted cache (site "sender") or the receiver groups computed from them
    (site "receiver"), and lets the receiver answer with and without the input."""

    def __init__(
        self,
        sender: LoadedModel,
        receiver: LoadedModel,
        adapter: DenseAdapter,
        examples: Sequence[tasks.Example],
        batch_size: int = 128,
        generation: GenerationConfig = GenerationConfig(max_new_tokens=24),
        prompt_format: PromptFormat = PromptFormat(),
    ) -> None:
        DenseRelay(sender, receiver, adapter, prompt_format)  # checks geometry and tokenizer
        if not examples:
            raise AnalysisError("the example set is empty")
        self.sender, self.receiver, self.adapter = sender, receiver, adapter
        self.examples, self.generation, self.format = list(examples), generation, prompt_format
        self.batches = [self.examples[i : i + batch_size] for i in range(0, len(self.examples), batch_size)]

    def accuracy(self, texts: Sequence[str]) -> float:
        by_family = accuracy_by_family(self.examples, texts)
        return sum(by_family.values()) / len(by_family)

    @torch.no_grad()
    def prefill(self) -> list[KVCache]:
        return [sender_prefill(self.sender, [self.format.sender.format(context=e.context) for e in batch]) for batch in self.batches]

    @torch.no_grad()
    def score(self, caches: Sequence[KVCache], keep: np.ndarray | None = None, site: str = "sender") -> dict[str, float]:
        """{"aware": accuracy, "unaware": accuracy}; ``keep`` (L_S, G_S) bool over sender KV groups."""
        if site not in FILTER_SITES:
            raise AnalysisError(f"filter site must be one of {FILTER_SITES}, got {site!r}")
        keep_t = None if keep is None else torch.as_tensor(keep, dtype=torch.bool)
        texts: dict[str, list[str]] = {m.value: [] for m in MODES}
        for batch, cache in zip(self.batches, caches, strict=True):
            if keep_t is not None and site == "sender":
                cache = keep_kv_groups(cache, keep_t)
            mapped = transform_cache(self.adapter, cache, self.sender, self.receiver)
            if keep_t is not None and site == "receiver":
                config = self.adapter.config
                mapped = keep_kv_groups(mapped, receiver_keep(keep_t, config.layer_map, config.group_map))
            for mode in MODES:
                prompts = [self.format.receiver_prompt(mode, e.context) for e in batch]
                texts[mode.value] += receiver_generate(self.receiver, mapped, prompts, self.generation).texts
        return {mode: self.accuracy(t) for mode, t in texts.items()}

    @torch.no_grad()
    def receiver_alone(self) -> dict[str, float]:
        """The receiver with the input in its prompt, and without it (the two reference lines of the plot)."""
        contexts = [[e.context for e in batch] for batch in self.batches]
        with_input = [t for c in contexts for t in answer_with_input(self.receiver, c, self.generation, self.format).texts]
        without = [t for c in contexts for t in answer_without_input(self.receiver, len(c), self.generation, self.format).texts]
        return {"with input": self.accuracy(with_input), "without input": self.accuracy(without)}


# ---- the whole analysis --------------------------------------------------------------------------
@dataclass
class CSConfig:
    """One compressed-sensing run; the defaults fit the tiny zoo on two CPU cores in a few minutes."""

    masks: int = 48  # M ablation experiments (paper: 200 for 1152 heads)
    examples_per_family: int = 40  # fixed test-split examples per task family, scored for every mask
    fraction: float = 0.05  # share of query heads zeroed per mask (paper: 5 %); at least one head
    alpha: float | None = 1e-4  # Lasso penalty (paper: 1e-4); None = LassoCV
    topk: tuple[int, ...] = ()  # K levels of the sweep; () = every K from 0 to all groups (≤ 16 groups) or powers of 2
    seeds: int = 3  # random-selection repeats per K (paper: 3)
    rank_by: str = "unaware"  # which regime's Lasso scores rank the groups ("both" = their sum)
    filter_site: str = "sender"  # zero dropped groups in the transmitted sender cache (paper C.3) or in T_θ's output
    seed: int = 0
    batch_size: int = 128
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise AnalysisError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.filter_site not in FILTER_SITES:
            raise AnalysisError(f"filter_site must be one of {FILTER_SITES}, got {self.filter_site!r}")
        if self.seeds < 1 or self.examples_per_family < 1:
            raise AnalysisError(f"seeds and examples_per_family must be >= 1, got {self.seeds} and {self.examples_per_family}")


def default_topk(total: int) -> tuple[int, ...]:
    if total <= 16:
        return tuple(range(total + 1))
    return tuple(sorted({0, *(2**i for i in range(int(math.log2(total)) + 1)), total}))


@dataclass
class SweepRow:
    k: int
    cs: dict[str, float]  # accuracy per regime keeping the top-k CS groups
    random_mean: dict[str, float]
    random_std: dict[str, float]
    random_runs: list[dict[str, float]] = field(default_factory=list)


@dataclass
class CSResult:
    """Everything a CS run measured: inputs, per-mask accuracies, Lasso fits, group scores, sweep, gates."""

    config: CSConfig
    sender_layout: tuple[int, int, int]  # (layers, query heads, KV heads) of the sender
    heads_per_mask: int
    examples: int
    baseline: dict[str, float]  # unablated, unfiltered relay
    receiver_alone: dict[str, float]
    masks: np.ndarray  # (M, L, H) bool, True = ablated
    mask_accuracy: dict[str, np.ndarray]  # per regime (M,)
    head_importance: dict[str, np.ndarray]  # per regime (L, H)
    group_scores: dict[str, np.ndarray]  # per regime (L, G); plus "ranking"
    sweep: list[SweepRow]
    gates: np.ndarray  # (L_S, G_S) mean adapter gate per sender group
    spearman: dict[str, tuple[float, float]]  # per score kind: (ρ, p)
    seconds: float = 0.0
    receiver_groups: int = 0  # L_R·G_R, the points of the receiver-level correlation
    distinct_masks: int = 0  # masks actually scored (repeats reuse the first score)

    def to_dict(self) -> dict:
        lists = lambda d: {k: np.asarray(v).tolist() for k, v in d.items()}
        return {
            "config": asdict(self.config),
            "sender_layout": {"layers": self.sender_layout[0], "query_heads": self.sender_layout[1], "kv_heads": self.sender_layout[2]},
            "heads_per_mask": self.heads_per_mask,
            "examples": self.examples,
            "baseline": self.baseline,
            "receiver_alone": self.receiver_alone,
            "masks": self.masks.astype(int).tolist(),
            "mask_accuracy": lists(self.mask_accuracy),
            "head_importance": lists(self.head_importance),
            "group_scores": lists(self.group_scores),
            "sweep": [asdict(row) for row in self.sweep],
            "gates": [[None if math.isnan(x) else x for x in row] for row in self.gates.tolist()],
            "spearman": {k: {"rho": r, "p": p} for k, (r, p) in self.spearman.items()},
            "seconds": self.seconds,
            "receiver_groups": self.receiver_groups,
            "distinct_masks": self.distinct_masks,
        }


def run_cs(
    sender: LoadedModel,
    receiver: LoadedModel,
    adapter: DenseAdapter,
    config: CSConfig = CSConfig(),
    progress: Callable[[str], None] = lambda line: None,
    examples: Sequence[tasks.Example] | None = None,
) -> CSResult:
    """Masks -> per-mask relay accuracy in both regimes -> Lasso -> KV-group scores -> top-K sweep vs random -> gates."""
    started = time.perf_counter()
    examples = list(examples) if examples is not None else tasks.make_split("test", config.examples_per_family)
    scorer = RelayScorer(sender, receiver, adapter, examples, config.batch_size, GenerationConfig(max_new_tokens=config.max_new_tokens))
    layers, heads, _ = head_layout(sender.model)
    kv_heads = sender.geometry.num_kv_heads
    masks = stratified_masks(layers, heads, config.masks, config.fraction, config.seed)

    base_caches = scorer.prefill()
    baseline = scorer.score(base_caches)
    alone = scorer.receiver_alone()
    progress(f"baseline on {len(examples)} examples: aware {baseline['aware']:.3f}, unaware {baseline['unaware']:.3f}; "
             f"receiver with input {alone['with input']:.3f}, without {alone['without input']:.3f}")

    accuracy = {m.value: np.zeros(config.masks) for m in MODES}
    seen: dict[bytes, dict[str, float]] = {}  # generation is greedy: a repeated mask gives the same accuracies
    tick = time.perf_counter()
    for i, mask in enumerate(masks):
        key = np.packbits(mask).tobytes()
        if key not in seen:
            with ablate_heads(sender.model, torch.from_numpy(mask)):
                caches = scorer.prefill()
            seen[key] = scorer.score(caches)
        for mode, value in seen[key].items():
            accuracy[mode][i] = value
        if (i + 1) % max(1, config.masks // 10) == 0 or i + 1 == config.masks:
            eta = (time.perf_counter() - tick) / (i + 1) * (config.masks - i - 1)
            progress(f"masks {i + 1}/{config.masks}: last aware {accuracy['aware'][i]:.3f} unaware {accuracy['unaware'][i]:.3f} (eta {eta:.0f} s)")

    progress(f"{len(seen)} distinct masks of {config.masks} evaluated (a repeat is scored once: greedy decoding is deterministic)")
    flat = masks.reshape(config.masks, layers * heads)
    importance = {mode: fit_head_importance(flat, accuracy[mode], baseline[mode], config.alpha).reshape(layers, heads) for mode in accuracy}
    scores = {mode: group_scores(value, kv_heads) for mode, value in importance.items()}
    scores["ranking"] = scores["aware"] + scores["unaware"] if config.rank_by == "both" else scores[config.rank_by]

    total = scores["ranking"].size
    sweep: list[SweepRow] = []
    for k in config.topk or default_topk(total):
        if not 0 <= k <= total:
            raise AnalysisError(f"top-K level {k} is outside [0, {total}] sender KV groups")
        if k == total:
            cs, runs = dict(baseline), [dict(baseline)] * config.seeds  # every group kept: the unfiltered relay
        else:
            cs = scorer.score(base_caches, top_groups(scores["ranking"], k), config.filter_site)
            runs = [cs] * config.seeds if k == 0 else [
                scorer.score(base_caches, random_groups(scores["ranking"].shape, k, config.seed + 1000 * (s + 1)), config.filter_site)
                for s in range(config.seeds)]
        mean = {m: float(np.mean([r[m] for r in runs])) for m in cs}
        std = {m: float(np.std([r[m] for r in runs])) for m in cs}
        sweep.append(SweepRow(k, cs, mean, std, runs))
        progress(f"top-{k}: CS aware {cs['aware']:.3f} unaware {cs['unaware']:.3f} | random aware {mean['aware']:.3f} unaware {mean['unaware']:.3f}")

    receiver_gates = adapter.gates.detach().cpu().numpy()  # (L_R, G_R)
    layer_of, group_of = adapter.config.layer_map, adapter.config.group_map
    gates = gates_by_sender_group(receiver_gates, layer_of, group_of, (layers, kv_heads))
    spearman = {kind: rank_correlation(gates, value) for kind, value in scores.items()}
    # the same at the receiver's granularity: every receiver group against the score of the sender group it reads
    spearman["ranking per receiver group"] = rank_correlation(receiver_gates, scores["ranking"][np.ix_(layer_of, group_of)])
    return CSResult(config, (layers, heads, kv_heads), int(masks[0].sum()), len(examples), baseline, alone, masks, accuracy,
                    importance, scores, sweep, gates, spearman, time.perf_counter() - started, receiver_gates.size, len(seen))


# ---- tables --------------------------------------------------------------------------------------
def sweep_table(result: CSResult) -> str:
    """Markdown: accuracy per K, CS vs random (mean ± std over seeds), both regimes."""
    total = result.group_scores["ranking"].size
    lines = [f"| K (of {total}) | CS aware | random aware | CS unaware | random unaware |", "|---:|---:|---:|---:|---:|"]
    for row in result.sweep:
        rand = {m: f"{row.random_mean[m]:.3f} ± {row.random_std[m]:.3f}" for m in row.random_mean}
        lines.append(f"| {row.k} | {row.cs['aware']:.3f} | {rand['aware']} | {row.cs['unaware']:.3f} | {rand['unaware']} |")
    return "\n".join(lines)


def group_table(result: CSResult) -> str:
    """Markdown: every sender KV group with its query heads, CS scores per regime, rank, and mean adapter gate."""
    layers, heads, kv_heads = result.sender_layout
    per = heads // kv_heads
    ranking = result.group_scores["ranking"]
    rank = np.empty(ranking.size, dtype=int)
    rank[np.argsort(-ranking.ravel(), kind="stable")] = np.arange(1, ranking.size + 1)
    lines = ["| sender layer | KV head | query heads | CS score aware | CS score unaware | rank | mean gate γ |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for layer in range(layers):
        for g in range(kv_heads):
            gate = result.gates[layer, g]
            lines.append(f"| {layer} | {g} | {g * per}..{(g + 1) * per - 1} | {result.group_scores['aware'][layer, g]:+.4f} | "
                         f"{result.group_scores['unaware'][layer, g]:+.4f} | {rank[layer * kv_heads + g]} | "
                         f"{'-' if math.isnan(gate) else f'{gate:.3f}'} |")
    return "\n".join(lines)


def spearman_lines(result: CSResult) -> str:
    n_sender = int(np.isfinite(result.gates).sum())
    lines = []
    for kind, (r, p) in result.spearman.items():
        if kind == "ranking per receiver group":
            lines.append(f"Spearman ρ(gate of each receiver group, {result.config.rank_by} CS score of the sender group it reads) = "
                         f"{r:+.3f} (p = {p:.3f}, n = {result.receiver_groups})")
        else:
            what = {"aware": "context-aware CS scores", "unaware": "context-unaware CS scores"}.get(kind, f"ranking scores ({result.config.rank_by})")
            lines.append(f"Spearman ρ(mean gate per sender group, {what}) = {r:+.3f} (p = {p:.3f}, n = {n_sender})")
    return "\n".join(lines)
