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
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from densecomm_core.evaluation.accuracy import evaluate_with_input
from densecomm_core.training.common import cosine_lr, optimizer_step
from densecomm_core.zoo import tasks
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
    """Recipe of one zoo LM. Small and fast: a 2-core CPU trains both in well under an hour."""

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


@dataclass
class ZooTrainResult:
    spec: ZooModelSpec
    steps: int
    seconds: float
    validation_accuracy: dict[str, float] = field(default_factory=dict)


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
    sep_id = tokenizer.convert_tokens_to_ids(tasks.SEPARATOR)
    rows = [(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id], extra) for text, extra in documents]
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


def train_zoo_model(
    spec: ZooModelSpec, config: ZooTrainConfig, out_dir: Path, progress: bool = True
) -> ZooTrainResult:
    """Train one zoo LM until every family's validation accuracy reaches the target; save it in HF format."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = build_tokenizer()
    model = build_model(
        spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    validation = tasks.make_split("validation", config.eval_per_family)
    started = time.perf_counter()
    accuracy: dict[str, float] = {}
    bar = tqdm(range(config.max_steps), desc=spec.name, disable=not progress)
    step = 0
    for step in bar:
        batch = [tasks.sample_in_split(rng, "train") for _ in range(config.batch_size)]
        ids, mask, labels = encode_documents(tokenizer, [training_document(e, rng, config) for e in batch])
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer_step(optimizer, loss, cosine_lr(step, config.max_steps, config.lr, config.warmup_steps))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.max_steps:
            model.eval()
            accuracy = evaluate_with_input(model, tokenizer, validation)
            log.info("%s step %d validation accuracy %s", spec.name, step + 1, accuracy)
            bar.write(f"{spec.name} step {step + 1}: validation accuracy {accuracy}")
            if min(accuracy.values()) >= config.target_accuracy:
                break
    result = ZooTrainResult(spec, step + 1, time.perf_counter() - started, accuracy)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    recipe = {"spec": asdict(spec), "train": asdict(config), "steps": result.steps,
              "seconds": round(result.seconds, 1), "validation_accuracy": accuracy}
    (out_dir / "zoo_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return result


def build_zoo(root: Path, config: ZooTrainConfig = ZooTrainConfig(), progress: bool = True) -> list[ZooTrainResult]:
    """Train and save both zoo LMs under ``root/<name>``."""
    return [train_zoo_model(spec, config, root / spec.name, progress) for spec in (SENDER_SPEC, RECEIVER_SPEC)]
