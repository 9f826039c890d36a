"""Decoding as a few small functions: ``prefill``, ``forward_after_cache``, ``sample_next``, ``generate``.

Every call passes explicit ``position_ids`` and a 2-D attention mask that spans the past cache and the
new tokens, so a prompt can continue after a transferred (possibly right-padded) cache at the right
logical positions. Prompts are left-padded, so the last column of a batch is every row's last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from densecomm_core.errors import DenseCommError


class GenerationStopped(DenseCommError):
    """``should_stop()`` asked a prefill or a generation to stop (its caller went away)."""


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding parameters. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 24
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def continuation_positions(past_lengths: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Logical positions of new tokens after a past of ``past_lengths`` valid slots per row.

    past_lengths: (B,) number of valid cache positions; token_mask: (B, T) 1 for real tokens.
    Padding columns get the position of the next real token (they are masked out anyway).
    """
    running = torch.cumsum(token_mask.long(), dim=1)  # (B, T)
    return past_lengths[:, None] + (running - token_mask.long()).clamp(min=0)


def forward_after_cache(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    past: DynamicCache | None,
    past_mask: torch.Tensor | None,
    past_next_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DynamicCache]:
    """Run ``input_ids`` (B, T) after ``past`` (whose valid slots are ``past_mask`` (B, Tc)).

    New tokens start at ``past_next_positions`` (B,) (default: the number of valid past slots, right
    for a dense cache; a cache with evicted tokens passes its own). Returns logits (B, T, vocab) and
    the grown cache. With ``past=None`` this is a plain prefill.
    """
    batch = input_ids.shape[0]
    if past is None:
        past = DynamicCache()
        past_mask = token_mask.new_zeros(batch, 0)
    if past_mask is None:
        raise ValueError("past_mask is required when a past cache is given")
    if past_mask.shape[0] != batch or past_mask.shape[1] != past.get_seq_length():
        raise ValueError(
            f"past_mask has shape {tuple(past_mask.shape)}, expected ({batch}, {past.get_seq_length()})"
        )
    if past_next_positions is None:
        past_next_positions = past_mask.long().sum(dim=1)
    positions = continuation_positions(past_next_positions, token_mask)
    attention_mask = torch.cat([past_mask.long(), token_mask.long()], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=past,
        use_cache=True,
    )
    return out.logits, out.past_key_values


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    positions: torch.Tensor,
    chunk_tokens: int = 0,
    should_stop=None,
) -> DynamicCache:
    """Prefill right-padded ``input_ids`` (B, T) in pieces of ``chunk_tokens`` (0 = one piece); between
    pieces ``should_stop()`` may end it with GenerationStopped, so a long prefill is abandoned quickly.

    Causal attention makes the pieces' result the one-piece result: piece [s, e) attends to the cache of
    [0, s) and itself through ``token_mask[:, :e]``; ``positions`` (B, T) are the logical positions.
    """
    cache = DynamicCache()
    length = input_ids.shape[1]
    step = chunk_tokens if chunk_tokens > 0 else length
    for start in range(0, length, step):
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"prefill stopped after {start} of {length} tokens")
        end = min(length, start + step)
        cache = model(input_ids=input_ids[:, start:end], attention_mask=token_mask[:, :end], position_ids=positions[:, start:end],
                      past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    return cache


def sample_next(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from last-position logits (B, vocab): greedy, or temperature + top-p."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < config.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    config: GenerationConfig,
    eos_token_id: int,
    past: DynamicCache | None = None,
    past_mask: torch.Tensor | None = None,
    on_token=None,
    past_next_positions: torch.Tensor | None = None,
    should_stop=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode up to ``config.max_new_tokens`` after a left-padded prompt (and an optional past cache).

    Returns (tokens (B, n), lengths (B,)): tokens after a row's EOS are ``eos_token_id`` and lengths
    count generated tokens up to and including EOS. ``on_token(step, tokens (B,))`` is called as tokens
    are produced, for streaming. ``should_stop()``, checked before every step, ends the loop with
    GenerationStopped (the caller went away).
    """
    if input_ids.shape[1] == 0:
        raise ValueError("the receiver prompt must contain at least one token")
    generator = torch.Generator().manual_seed(config.seed) if config.temperature > 0 else None
    batch = input_ids.shape[0]
    if past is None:
        past_mask = token_mask.new_zeros(batch, 0)
    logits, cache = forward_after_cache(model, input_ids, token_mask, past, past_mask, past_next_positions)
    mask = torch.cat([past_mask.long(), token_mask.long()], dim=1)
    next_positions = (past_next_positions if past_next_positions is not None else past_mask.long().sum(dim=1)) + token_mask.long().sum(dim=1)
    finished = torch.zeros(batch, dtype=torch.bool)
    lengths = torch.zeros(batch, dtype=torch.long)
    steps = []
    for step in range(config.max_new_tokens):
        next_tokens = sample_next(logits[:, -1], config, generator)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, eos_token_id), next_tokens)
        steps.append(next_tokens)
        lengths += (~finished).long()
        if on_token is not None:
            on_token(step, next_tokens)
        finished |= next_tokens == eos_token_id
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"generation stopped after {step + 1} tokens")
        positions = next_positions[:, None]
        next_positions = next_positions + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        out = model(
            input_ids=next_tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        logits, cache = out.logits, out.past_key_values
    return torch.stack(steps, dim=1), lengths
