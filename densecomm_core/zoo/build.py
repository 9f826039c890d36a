"""`densecomm zoo build`: train the embedded heterogeneous LM pair from scratch on the synthetic suite.

The two models differ in family (Qwen3 vs Llama), depth, hidden size, KV-head count, head dim and RoPE
base, like a real heterogeneous pair. They share one tokenizer (as the Qwen3 family does in the paper).
Training is seeded; each model is saved with ``save_pretrained`` (safetensors) next to a
``zoo_recipe.json`` that records its recipe and validation accuracy.

The training stream mixes three document formats of the same examples:
- ``X => trace``            the plain task (what "with input" evaluation uses);
- ``X hint a => trace``     guided trace generation (appendix A needs a receiver that can use a hint);
- ``X X => trace``          the context twice, as a context-aware receiver sees it after a cache of X.
The loss covers the solution tokens only (after ``=>``).

Each task suite (``densecomm_core.zoo.suite``) has its own pair and recipe in ``ZOO_RECIPES``: ``v1`` is the
committed default zoo, ``v2`` the generalising zoo with headroom (``build_zoo(root, suite="v2")``; its models have
their own names, so both zoos live side by side in the package).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from densecomm_core.evaluation.accuracy import evaluate_with_input
from densecomm_core.relay import ContextMode
from densecomm_core.training.common import cosine_lr, optimizer_step
from densecomm_core.zoo import tasks
from densecomm_core.zoo.suite import get_suite
from densecomm_core.zoo.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooModelSpec:
    """Geometry of one tiny zoo LM; every field below differs between sender and receiver."""

    name: str
    family: str  # "qwen3" or "llama": a different HF architecture per side
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # GQA: num_heads / num_kv_heads query heads share one KV head
    head_dim: int
    intermediate_size: int
    rope_theta: float


SENDER_SPEC = ZooModelSpec("zoo-qwen3-sender", "qwen3", 128, 4, 4, 2, 32, 384, 10_000.0)
RECEIVER_SPEC = ZooModelSpec("zoo-llama-receiver", "llama", 96, 5, 6, 3, 24, 256, 100_000.0)


@dataclass(frozen=True)
class ZooTrainConfig:
    """Recipe of one zoo LM: about an hour per model on one core, both models side by side on two."""

    seed: int = 0
    batch_size: int = 64
    max_steps: int = 6000
    lr: float = 2e-3  # tiny models tolerate (and need) a high rate to learn lookups quickly
    warmup_steps: int = 200
    weight_decay: float = 0.01
    eval_every: int = 500
    eval_per_family: int = 100  # validation examples per family at each evaluation
    target_accuracy: float = 0.99  # stop once every family reaches this on validation
    p_hint: float = 0.15
    p_duplicated: float = 0.35
    p_message: float = 0.0  # T2T message documents (the suite's t2t layouts, half aware, half unaware)
    # Stage 2, only when stage 1 ends below the target: a warm restart (fresh AdamW, new warmup and
    # cosine, new data seed) that draws more examples from the families still failed. Lookup skills
    # emerge in sudden phase changes; a restarted rate lets a stalled one happen without starting over.
    restart_steps: int = 4000
    restart_lr: float = 2e-3
    # Stage-1 share of each task family in the training stream (None = uniform). Lookup families
    # (recall, choice) need far more examples than arithmetic before their induction circuits form.
    family_weights: dict[str, float] | None = None
    suite: str = "v1"  # the task suite (densecomm_core.zoo.suite) the model trains and is validated on


# Each model's recipe. The receiver's stream is weighted towards the lookup families: a Llama without
# QK-norm forms its lookup circuits far later than the Qwen3 sender does, and with uniform families
# it stalled near 60 % on recall and choice after 10 000 steps; weighted, it solves all three
# families in 6000 steps (recall by step 2500, choice by 4500, arithmetic last, by 6000).
SENDER_TRAIN = ZooTrainConfig()
RECEIVER_TRAIN = ZooTrainConfig(max_steps=8000, family_weights={"recall": 0.5, "math": 0.15, "choice": 0.35})
ZOO_MODELS: tuple[tuple[ZooModelSpec, ZooTrainConfig], ...] = ((SENDER_SPEC, SENDER_TRAIN), (RECEIVER_SPEC, RECEIVER_TRAIN))

# Zoo v2 (suite "v2"): headroom by design. The receiver is the smaller AND the shallower model (3 layers,
# 96 wide) and the sender the deeper one (5 layers, 128 wide). The ``hops`` family answers without a
# written trace, so following h hops takes about h + 1 layers inside one forward pass (bind each fact's
# key to its value, then one lookup per hop): the design expected the 3-layer receiver to follow at most
# 2 of the 1-3 hops and the 5-layer sender all 3. Measured after stage 1 (validation, with the input): the
# receiver has the headroom (hops 62), but the sender learned its lookups late (between steps 5000 and 6000
# of 7000) and ended at hops 52 and near chance on the OOD families (compare 41, owner 26), so it gets a
# warm restart (stage 2, 2500 steps, the failed families weighted by their error): validation compare and
# owner 100, hops 63, in 11 min 17 s. Every other family has a step-by-step trace (one lookup or one mod-10
# step per token), which 3 layers learn. Widths, head layouts and RoPE bases still differ everywhere.
# The receiver has one stage (it never reaches the target on ``hops``, by design, and a restart would only
# spend time); both run side by side on one core each. Time budget: the sender keeps v1's width but a
# 256-wide MLP (737 k non-embedding parameters against v1's 786 k; the receiver has 346 k), and batches are
# padded per length group (``batch_loss``). Stage 1 of both LMs took 47 min 25 s side by side, the sender's
# restart 11 min 17 s after it (the receiver had finished), the adapter (`densecomm train --config zoo-v2`) 23 min 7 s.
SENDER_SPEC_V2 = ZooModelSpec("zoo2-qwen3-sender", "qwen3", 128, 5, 4, 2, 32, 256, 10_000.0)
RECEIVER_SPEC_V2 = ZooModelSpec("zoo2-llama-receiver", "llama", 96, 3, 6, 3, 24, 256, 100_000.0)
# hops (the hardest) gets the largest share of the sender's stream; the Llama receiver gets the lookup
# families' weighting of v1 (it forms lookup circuits late), the OOD families a tenth each on both sides.
# Both read T2T messages (p_message): the text baseline needs a receiver that can use one.
SENDER_TRAIN_V2 = ZooTrainConfig(
    max_steps=7000, restart_steps=2500, suite="v2", p_message=0.15,
    family_weights={"recall": 0.15, "math": 0.15, "choice": 0.2, "hops": 0.3, "compare": 0.1, "owner": 0.1},
)
RECEIVER_TRAIN_V2 = ZooTrainConfig(
    max_steps=11000, restart_steps=0, suite="v2", p_message=0.15,
    family_weights={"recall": 0.25, "math": 0.1, "choice": 0.25, "hops": 0.2, "compare": 0.1, "owner": 0.1},
)
ZOO_RECIPES: dict[str, tuple[tuple[ZooModelSpec, ZooTrainConfig], ...]] = {
    "v1": ZOO_MODELS,
    "v2": ((SENDER_SPEC_V2, SENDER_TRAIN_V2), (RECEIVER_SPEC_V2, RECEIVER_TRAIN_V2)),
}


def zoo_recipe(suite: str) -> tuple[tuple[ZooModelSpec, ZooTrainConfig], ...]:
    """((sender spec, its recipe), (receiver spec, its recipe)) of the zoo built on ``suite``."""
    if suite not in ZOO_RECIPES:
        raise ValueError(f"no zoo recipe for task suite {suite!r}; expected one of {tuple(ZOO_RECIPES)}")
    return ZOO_RECIPES[suite]


def smoke_config(config: ZooTrainConfig, max_steps: int) -> ZooTrainConfig:
    """``config`` cut to a ``max_steps`` single-stage smoke run (the pipeline end to end, not a usable zoo)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return replace(config, max_steps=max_steps, restart_steps=0, eval_every=min(config.eval_every, max_steps),
                   warmup_steps=min(config.warmup_steps, max(1, max_steps // 10)))


@dataclass
class StageTally:
    """Where a training stage's time went: wall and CPU seconds (this process), validation runs included."""

    cpu_seconds: float = 0.0
    eval_seconds: float = 0.0  # wall seconds of the validation runs
    eval_cpu_seconds: float = 0.0
    evaluations: int = 0

    def add(self, other: dict) -> None:
        """Add a stage log's tally (stage logs written before tallies existed count as zero)."""
        for name in ("cpu_seconds", "eval_seconds", "eval_cpu_seconds", "evaluations"):
            setattr(self, name, getattr(self, name) + other.get(name, 0))


@dataclass
class ZooTrainResult:
    spec: ZooModelSpec
    steps: int
    seconds: float
    validation_accuracy: dict[str, float] = field(default_factory=dict)
    tally: StageTally = field(default_factory=StageTally)

    def projected_seconds(self, config: ZooTrainConfig, cpu: bool = False) -> float:
        """Time of ``config``'s stages (stage 1, and the warm restart, which runs when stage 1 misses the
        target) at this run's measured rates (per training step, per validation run). ``cpu``: from CPU
        seconds, which a machine shared with other jobs inflates far less than wall seconds (each LM trains
        on one thread, so on a quiet core CPU ~ wall)."""
        t = self.tally
        total, evals = (t.cpu_seconds, t.eval_cpu_seconds) if cpu else (self.seconds, t.eval_seconds)
        per_step = (total - evals) / self.steps
        per_eval = evals / max(t.evaluations, 1)
        return sum(per_step * steps + per_eval * -(-steps // config.eval_every)
                   for steps in (config.max_steps, config.restart_steps) if steps)


def build_model(spec: ZooModelSpec, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> PreTrainedModel:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    if spec.family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common))
    if spec.family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    raise ValueError(f"unknown zoo model family {spec.family!r}; expected 'qwen3' or 'llama'")


def training_document(example: tasks.Example, rng: random.Random, config: ZooTrainConfig) -> tuple[str, int]:
    """One document and the number of context words before ``=>`` that are predictable (the second copy)."""
    draw = rng.random()
    predictable = 0
    if draw < config.p_hint:
        prompt = tasks.prompt_guided(example)
    elif draw < config.p_hint + config.p_duplicated:
        prompt = tasks.prompt_duplicated(example)
        predictable = len(example.context.split()) - 1  # all but the copy's first word
    elif draw < config.p_hint + config.p_duplicated + config.p_message:
        mode = ContextMode.AWARE if rng.random() < 0.5 else ContextMode.UNAWARE
        prompt = get_suite(config.suite).prompt_format.t2t_prompt(mode, example.context, example.trace)
    else:
        prompt = tasks.prompt_with_input(example)
    return f"{prompt} {example.trace}", predictable


def encode_documents(
    tokenizer, documents: list[tuple[str, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), attention mask (B, T) and labels (B, T).

    ``documents`` are (text, predictable_words): labels cover the solution + EOS and, for a duplicated
    context, its second copy (predictable from the first; this is what teaches lookups quickly).
    """
    return pad_documents(tokenizer, tokenize_documents(tokenizer, documents))


def tokenize_documents(tokenizer, documents: list[tuple[str, int]]) -> list[tuple[list[int], int]]:
    """(ids + EOS, predictable words) per document."""
    return [(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id], extra) for text, extra in documents]


def pad_documents(tokenizer, rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``encode_documents`` on already tokenized rows."""
    sep_id = tokenizer.convert_tokens_to_ids(tasks.SEPARATOR)
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, extra) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        start = len(row) - row[::-1].index(sep_id) - 1 - extra  # the separator, minus predictable words
        labels[i, start + 1 : len(row)] = ids[i, start + 1 : len(row)]
    return ids, mask, labels


def length_groups(lengths: list[int], max_groups: int) -> list[list[int]]:
    """Split row indices into at most ``max_groups`` groups of similar length that minimise the padded area
    (sum over groups of rows x longest row): an exact dynamic programme over the rows sorted by length."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    n, groups = len(order), min(max_groups, len(order))
    # best[g][j]: least padded area of the j shortest rows in g groups; cut[g][j]: where its last group starts
    best = [[0.0] + [float("inf")] * n for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    for g in range(1, groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                area = best[g - 1][i] + (j - i) * sorted_lengths[j - 1]
                if area < best[g][j]:
                    best[g][j], cut[g][j] = area, i
    g = min(range(1, groups + 1), key=lambda k: best[k][n])
    bounds, j = [], n
    while g > 0:
        bounds.append((cut[g][j], j))
        j, g = cut[g][j], g - 1
    return [order[a:b] for a, b in reversed(bounds) if b > a]


def batch_loss(model: PreTrainedModel, tokenizer, documents: list[tuple[str, int]], max_groups: int = 3) -> torch.Tensor:
    """The mean token loss of ``documents``, computed in up to ``max_groups`` length groups.

    Zoo v2's documents vary from ~10 to ~95 tokens: one right-padded batch is 60 % padding. Each group is
    padded to its own longest row and its summed loss divided by the whole batch's label count, so the sum
    over groups is exactly the single batch's mean loss (and gradient), at a fraction of the compute.
    """
    rows = tokenize_documents(tokenizer, documents)
    groups = length_groups([len(r) for r, _ in rows], max_groups)
    encoded = [pad_documents(tokenizer, [rows[i] for i in group]) for group in groups]
    items = sum(int((labels != -100).sum()) for _, _, labels in encoded)
    return sum(model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
               for ids, mask, labels in encoded)


def run_stage(
    model: PreTrainedModel, tokenizer, config: ZooTrainConfig, seed: int, steps: int, lr: float, name: str, progress: bool,
    family_weights: dict[str, float] | None = None, tally: StageTally | None = None,
) -> tuple[int, dict[str, float]]:
    """One training stage (AdamW, warmup + cosine); stops early at the target. Returns (steps, accuracy).

    ``family_weights`` (None = uniform) biases which task family each training example comes from;
    ``tally``, when given, receives the wall and CPU time of every validation run.
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    suite = get_suite(config.suite)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    validation = suite.make_split("validation", config.eval_per_family)
    accuracy: dict[str, float] = {}
    bar = tqdm(range(steps), desc=name, disable=not progress)
    step = 0
    for step in bar:
        if family_weights is None:
            batch = [suite.sample_in_split(rng, "train") for _ in range(config.batch_size)]
        else:
            families = rng.choices(list(family_weights), weights=list(family_weights.values()), k=config.batch_size)
            batch = [suite.sample_in_split(rng, "train", family) for family in families]
        model.train()
        loss = batch_loss(model, tokenizer, [training_document(e, rng, config) for e in batch])
        optimizer_step(optimizer, loss, cosine_lr(step, steps, lr, config.warmup_steps))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            model.eval()
            started, started_cpu = time.perf_counter(), time.process_time()
            accuracy = evaluate_with_input(model, tokenizer, validation)
            if tally is not None:
                tally.eval_seconds += time.perf_counter() - started
                tally.eval_cpu_seconds += time.process_time() - started_cpu
                tally.evaluations += 1
            log.info("%s step %d validation accuracy %s", name, step + 1, accuracy)
            bar.write(f"{name} step {step + 1}: validation accuracy {accuracy}")
            if min(accuracy.values()) >= config.target_accuracy:
                break
    model.eval()
    return step + 1, accuracy


def save_zoo_model(model: PreTrainedModel, tokenizer, out_dir: Path, spec: ZooModelSpec, config: ZooTrainConfig, stages: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    recipe = {"spec": asdict(spec), "train": asdict(config), "stages": stages,
              "steps": sum(s["steps"] for s in stages), "seconds": round(sum(s["seconds"] for s in stages), 1),
              "validation_accuracy": stages[-1]["validation_accuracy"]}
    (out_dir / "zoo_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def train_stage_1(spec: ZooModelSpec, config: ZooTrainConfig, out_dir: Path, progress: bool = True) -> list[dict]:
    """Stage 1 from scratch; saves the model and its recipe. Returns the stage log."""
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(get_suite(config.suite).vocabulary)
    model = build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    started, started_cpu, tally = time.perf_counter(), time.process_time(), StageTally()
    steps, accuracy = run_stage(model, tokenizer, config, config.seed, config.max_steps, config.lr, spec.name, progress,
                                config.family_weights, tally)
    tally.cpu_seconds = time.process_time() - started_cpu
    stages = [{"stage": 1, "steps": steps, "seconds": time.perf_counter() - started, "validation_accuracy": accuracy,
               **asdict(tally)}]
    save_zoo_model(model, tokenizer, out_dir, spec, config, stages)
    return stages


def train_stage_2(spec: ZooModelSpec, config: ZooTrainConfig, out_dir: Path, progress: bool = True) -> list[dict]:
    """Stage 2 (warm restart) on the stage-1 model saved in ``out_dir``, if it missed the target; saves again."""
    recipe = json.loads((out_dir / "zoo_recipe.json").read_text())
    stages = [s for s in recipe["stages"] if s["stage"] == 1]
    if config.restart_steps == 0 or min(stages[0]["validation_accuracy"].values()) >= config.target_accuracy:
        return stages
    torch.manual_seed(config.seed + 1)
    tokenizer = build_tokenizer(get_suite(config.suite).vocabulary)
    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, dtype=torch.float32)
    started, started_cpu, tally = time.perf_counter(), time.process_time(), StageTally()
    # Families the model still fails get more of the batch: weight = error + 0.1.
    weights = {family: 1.0 - acc + 0.1 for family, acc in sorted(stages[0]["validation_accuracy"].items())}
    steps, accuracy = run_stage(model, tokenizer, config, config.seed + 1, config.restart_steps, config.restart_lr,
                                f"{spec.name} (restart)", progress, weights, tally)
    tally.cpu_seconds = time.process_time() - started_cpu
    stages.append({"stage": 2, "steps": steps, "seconds": time.perf_counter() - started, "validation_accuracy": accuracy,
                   "family_weights": weights, **asdict(tally)})
    save_zoo_model(model, tokenizer, out_dir, spec, config, stages)
    return stages


def train_zoo_model(spec: ZooModelSpec, config: ZooTrainConfig, out_dir: Path, progress: bool = True) -> ZooTrainResult:
    """Stage 1, then stage 2 if needed; the model in ``out_dir`` is the result (HF format + zoo_recipe.json)."""
    train_stage_1(spec, config, out_dir, progress)
    stages = train_stage_2(spec, config, out_dir, progress)
    tally = StageTally()
    for stage in stages:
        tally.add(stage)
    return ZooTrainResult(spec, sum(s["steps"] for s in stages), sum(s["seconds"] for s in stages), stages[-1]["validation_accuracy"], tally)


def _train_in_worker(spec: ZooModelSpec, config: ZooTrainConfig, out_dir: Path) -> ZooTrainResult:
    torch.set_num_threads(1)  # one core per model: two tiny models train faster side by side than in turn
    return train_zoo_model(spec, config, out_dir, progress=False)


def build_zoo(
    root: Path, seed: int = 0, progress: bool = True, parallel: bool = True, suite: str = "v1", max_steps: int | None = None
) -> list[ZooTrainResult]:
    """Train and save both zoo LMs of ``suite`` under ``root/<name>`` (two processes of one thread each by
    default). ``max_steps`` cuts both recipes to a smoke run of that many steps."""
    models = [(spec, replace(config, seed=seed)) for spec, config in zoo_recipe(suite)]
    if max_steps is not None:
        models = [(spec, smoke_config(config, max_steps)) for spec, config in models]
    if not parallel:
        return [train_zoo_model(spec, config, root / spec.name, progress) for spec, config in models]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(models), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train_in_worker, spec, config, root / spec.name) for spec, config in models]
        return [f.result() for f in futures]
