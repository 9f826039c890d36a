"""Decoding as a few small functions: ``prefill``, ``forward_after_cache``, ``start_decoding``, ``choose_next``,
``decode_step``, ``generate``.

Every call passes explicit ``position_ids`` and a 2-D attention mask that spans the past cache and the
new tokens, so a prompt can continue after a transferred (possibly right-padded) cache at the right
logical positions. Prompts are left-padded, so the last column of a batch is every row's last token.

Device: every tensor these functions create lives on the model's device (``model.device``); ids and
masks given on another device (a tokenizer's CPU tensors) are moved there first. The per-step tensor
work (``choose_next``, ``decode_step``) is free of Python control flow on tensor values, so it runs
unchanged under ``FakeTensorMode``; only ``generate``'s stopping test reads a value back.
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


@dataclass
class DecodeState:
    """What one decoding step needs and updates; every tensor is on the model's device."""

    logits: torch.Tensor  # (B, vocab) logits at each row's last position
    cache: DynamicCache  # the grown cache (past + prompt + generated tokens)
    mask: torch.Tensor  # (B, Tc) long: 1 for every attended slot so far
    next_positions: torch.Tensor  # (B,) logical position of the next token
    finished: torch.Tensor  # (B,) bool: the row has produced EOS
    lengths: torch.Tensor  # (B,) long: generated tokens so far, EOS included


def continuation_positions(past_lengths: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Logical positions of new tokens after a past of ``past_lengths`` valid slots per row.

    past_lengths: (B,) number of valid cache positions; token_mask: (B, T) 1 for real tokens.
    Padding columns get the position of the next real token (they are masked out anyway).
    """
    running = torch.cumsum(token_mask.long(), dim=1)  # (B, T)
    return past_lengths[:, None] + (running - token_mask.long()).clamp(min=0)


def model_device(model: PreTrainedModel) -> torch.device:
    """Where a model's inputs (ids, masks, positions) must live: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


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
    the grown cache. With ``past=None`` this is a plain prefill. Ids, masks and positions are moved to
    the model's device; ``past`` must already be there.
    """
    device = model_device(model)
    input_ids, token_mask = input_ids.to(device), token_mask.to(device)
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
    past_mask = past_mask.to(device)
    if past_next_positions is None:
        past_next_positions = past_mask.long().sum(dim=1)
    positions = continuation_positions(past_next_positions.to(device), token_mask)
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


def sampling_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """The seeded RNG for sampling, on the logits' device (``torch.multinomial`` refuses one elsewhere)."""
    if config.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def sample_next(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from last-position logits (B, vocab): greedy, or temperature + top-p."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()  # the best token at 0: any temperature > 0 scales the rest to finite or -inf, never NaN
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < config.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def start_decoding(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    past: DynamicCache | None = None,
    past_mask: torch.Tensor | None = None,
    past_next_positions: torch.Tensor | None = None,
) -> DecodeState:
    """Prefill a left-padded prompt (B, T) after an optional past cache; the state before the first token."""
    if input_ids.shape[1] == 0:
        raise ValueError("the receiver prompt must contain at least one token")
    device = model_device(model)
    token_mask = token_mask.to(device)
    batch = input_ids.shape[0]
    if past is None:
        past_mask = token_mask.new_zeros(batch, 0)
    elif past_mask is None:
        raise ValueError("past_mask is required when a past cache is given")
    past_mask = past_mask.to(device)
    logits, cache = forward_after_cache(model, input_ids, token_mask, past, past_mask, past_next_positions)
    past_next = past_next_positions.to(device) if past_next_positions is not None else past_mask.long().sum(dim=1)
    return DecodeState(
        logits=logits[:, -1],
        cache=cache,
        mask=torch.cat([past_mask.long(), token_mask.long()], dim=1),
        next_positions=past_next + token_mask.long().sum(dim=1),
        finished=torch.zeros(batch, dtype=torch.bool, device=device),
        lengths=torch.zeros(batch, dtype=torch.long, device=device),
    )


def choose_next(state: DecodeState, config: GenerationConfig, generator: torch.Generator | None, eos_token_id: int) -> torch.Tensor:
    """The next token per row (B,): sampled from ``state.logits``, EOS for finished rows; updates
    ``state.lengths`` (counting this token for unfinished rows) and ``state.finished``."""
    next_tokens = sample_next(state.logits, config, generator)
    next_tokens = torch.where(state.finished, torch.full_like(next_tokens, eos_token_id), next_tokens)
    state.lengths += (~state.finished).long()
    state.finished |= next_tokens == eos_token_id
    return next_tokens


def decode_step(model: PreTrainedModel, state: DecodeState, next_tokens: torch.Tensor) -> DecodeState:
    """Feed one token per row (B,) at each row's next position; returns the state for the following one."""
    mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)  # (B, Tc + 1)
    out = model(
        input_ids=next_tokens[:, None],
        attention_mask=mask,
        position_ids=state.next_positions[:, None],
        past_key_values=state.cache,
        use_cache=True,
    )
    return DecodeState(out.logits[:, -1], out.past_key_values, mask, state.next_positions + 1, state.finished, state.lengths)


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

    Returns (tokens (B, n), lengths (B,)) on the model's device: tokens after a row's EOS are
    ``eos_token_id`` and lengths count generated tokens up to and including EOS. ``on_token(step,
    tokens (B,))`` is called as tokens are produced, for streaming. ``should_stop()``, checked before
    every step, ends the loop with GenerationStopped (the caller went away).
    """
    state = start_decoding(model, input_ids, token_mask, past, past_mask, past_next_positions)
    generator = sampling_generator(config, state.logits.device)
    steps = []
    for step in range(config.max_new_tokens):
        next_tokens = choose_next(state, config, generator, eos_token_id)
        steps.append(next_tokens)
        if on_token is not None:
            on_token(step, next_tokens)
        if step == config.max_new_tokens - 1 or bool(state.finished.all()):
            break
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"generation stopped after {step + 1} tokens")
        state = decode_step(model, state, next_tokens)
    return torch.stack(steps, dim=1), state.lengths
