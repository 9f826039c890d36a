"""Task accuracy: generate answers, extract the ``answer X`` word, score per task family."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from densecomm_core.generation import GenerationConfig, generate
from densecomm_core.relay import decode_generated, encode
from densecomm_core.zoo import tasks

GREEDY = GenerationConfig(max_new_tokens=24)


def accuracy_by_family(examples: Sequence[tasks.Example], generations: Sequence[str]) -> dict[str, float]:
    """Fraction of examples whose extracted answer equals the gold answer, per family."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for example, text in zip(examples, generations, strict=True):
        hits[example.family].append(tasks.extract_answer(text) == example.answer)
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: GenerationConfig = GREEDY,
    batch_size: int = 128,
) -> list[str]:
    """Plain text-in, text-out generation (no transferred cache), batched."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode(tokenizer, prompts[start : start + batch_size], "left", add_special_tokens=True)
        tokens, lengths = generate(model, ids, mask, config, tokenizer.eos_token_id)
        texts.extend(decode_generated(tokenizer, tokens, lengths))
    return texts


def evaluate_with_input(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[tasks.Example]
) -> dict[str, float]:
    """A model answering with the input in its own prompt."""
    return accuracy_by_family(examples, generate_texts(model, tokenizer, [tasks.prompt_with_input(e) for e in examples]))
