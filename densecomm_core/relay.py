"""The in-process relay: sender prefill -> adapter -> receiver generation, in both communication regimes.

    sender_prefill(sender, contexts)            KVCache of X in the sender's space (no sender decoding)
    transform_cache(adapter, cache, S, R)       strip S's RoPE -> T_θ -> restore R's RoPE (eq. 8, 11, 9)
    receiver_generate(receiver, cache, prompts) decode after the transferred cache at explicit positions
    DenseRelay                                  the three above plus token accounting for FLOPs

Batches are padded: sender contexts on the right (so slot i holds logical position i), receiver
prompts on the left (so every row's last token is in the last column); masks make padding invisible
and results equal one-at-a-time runs.

Devices and dtypes: the sender, the adapter and the receiver may each sit on its own device (cuda:0,
cuda:1, cpu). A sender cache is on the sender's device in its dtype; ``transform_cache`` moves it to the
adapter's device, strips RoPE there in float32, runs T_θ in the adapter's dtype (float32 by default),
restores the receiver's RoPE in float32 and returns the receiver's dtype on the receiver's device.
Prompt ids and masks go to the model that reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F

from densecomm_core.adapter import DenseAdapter
from densecomm_core.cache import KVCache
from densecomm_core.errors import CacheLayoutError, GeometryMismatchError
from densecomm_core.generation import GenerationConfig, generate, model_device, prefill
from densecomm_core.models import LoadedModel, RopeModel, check_shared_tokenizer
from densecomm_core.rope import restore_rope, strip_rope


class ContextMode(str, Enum):
    """Whether the receiver also sees the input X in its prompt (paper §2.3)."""

    AWARE = "aware"
    UNAWARE = "unaware"


@dataclass(frozen=True)
class PromptFormat:
    """How contexts and receiver prompts are rendered; the defaults are the embedded zoo's format.

    ``{context}`` is replaced by X. The sender's text gets the tokenizer's BOS; receiver prompts that
    continue a transferred cache do not (the cache already starts with it).
    """

    sender: str = "{context}"
    aware: str = "{context} =>"  # receiver prompt after the cache, context-aware
    unaware: str = "=>"  # receiver prompt after the cache, context-unaware
    with_input: str = "{context} =>"  # a model answering from the input alone (baselines, T2T)
    without_input: str = "=>"  # the receiver alone, without the input (after BOS)
    # T2T, the text baseline: the sender writes a message (greedy) after ``message``; the receiver reads it
    # in ``t2t_aware`` (with X) or ``t2t_unaware`` (the message only). ``{message}`` is the sender's text.
    # The v1 zoo LMs never saw a message in training; these two layouts scored best of four on its validation
    # split (`densecomm eval --split validation --methods t2t --prompt-format ...`). The v2 zoo LMs train on
    # message documents; their layouts are the v2 suite's ``prompt_format`` (``zoo.tasks_v2.MESSAGE_*``).
    message: str = "{context} =>"
    t2t_aware: str = "{message} {context} =>"
    t2t_unaware: str = "hint {message} =>"

    def receiver_prompt(self, mode: ContextMode, context: str) -> str:
        return (self.aware if mode is ContextMode.AWARE else self.unaware).format(context=context)

    def t2t_prompt(self, mode: ContextMode, context: str, message: str) -> str:
        """The receiver's prompt in T2T: the sender's ``message``, after X in context-aware mode."""
        return (self.t2t_aware if mode is ContextMode.AWARE else self.t2t_unaware).format(context=context, message=message)


@dataclass
class TokenCounts:
    """Exact per-side token counts of one batch (paper appendix B.1), summed over rows."""

    sender_prefill: int = 0
    sender_decode: int = 0
    receiver_prefill: int = 0
    receiver_decode: int = 0

    def flops(self, sender_params: int, receiver_params: int, adapter_flops_per_token: int = 0) -> dict[str, int]:
        """2·N·tokens per side, plus the adapter's own 2·params per transferred token."""
        sender = 2 * sender_params * (self.sender_prefill + self.sender_decode)
        receiver = 2 * receiver_params * (self.receiver_prefill + self.receiver_decode)
        adapter = adapter_flops_per_token * self.sender_prefill
        return {"sender": sender, "adapter": adapter, "receiver": receiver, "total": sender + adapter + receiver}


@dataclass
class RelayOutput:
    texts: list[str]
    tokens: torch.Tensor  # (B, n) generated ids, EOS-filled after each row's end
    lengths: torch.Tensor  # (B,) generated tokens per row, EOS included
    counts: TokenCounts = field(default_factory=TokenCounts)
    payload_bytes: int = 0  # raw bytes of the transferred receiver-space cache (valid tokens only)


Text = str | Sequence[int]  # a text, or its token ids already (special tokens included as the caller wants them)


def encode(tokenizer, texts: Sequence[Text], padding_side: str, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids (B, T) and mask (B, T); ``add_special_tokens=False`` for prompts that continue a cache.

    A row given as token ids is used as it is (``add_special_tokens`` applies to text rows only): a caller
    that has tokenized an input already (to check it against a limit) passes its ids, and nothing is
    tokenized twice. Texts are tokenized without padding and every batch is padded by ``tokenizer.pad`` on the
    side asked for: a fast tokenizer pads inside its Rust backend, whose padding side is state that threads
    sharing the tokenizer (or a sender and receiver of one checkpoint) would race on."""
    texts = list(texts)
    strings = [i for i, text in enumerate(texts) if isinstance(text, str)]
    rows = [[int(t) for t in text] if not isinstance(text, str) else None for text in texts]
    if strings:
        encoded = tokenizer([texts[i] for i in strings], add_special_tokens=add_special_tokens)["input_ids"]
        for i, ids in zip(strings, encoded):
            rows[i] = ids
    enc = tokenizer.pad({"input_ids": rows}, padding=True, padding_side=padding_side, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def decode_generated(tokenizer, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Text of each row's first ``lengths[i]`` generated tokens (special tokens dropped)."""
    rows, counts = tokens.cpu().tolist(), lengths.cpu().tolist()  # one device-to-host copy each
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(rows, counts)]


def device_of(model: RopeModel) -> torch.device:
    """Where ``model``'s caches live: a loaded model's input device, else its rotary embedding's (a
    geometry-only ``RopeModel`` built from a config sits on the CPU)."""
    if isinstance(model, LoadedModel):
        return model_device(model.model)
    buffer = next(model.rotary_embedding.buffers(), None)
    return buffer.device if buffer is not None else torch.device("cpu")


@torch.no_grad()
def sender_prefill(sender: LoadedModel, texts: Sequence[Text], chunk_tokens: int = 0, should_stop=None) -> KVCache:
    """Prefill the sender on ``texts`` (right-padded; texts or their ids, ``encode``) and return its cache; the
    sender decodes nothing.
    ``chunk_tokens`` / ``should_stop``: a prefill in pieces that a caller can abandon (``generation.prefill``)."""
    ids, mask = encode(sender.tokenizer, texts, "right", add_special_tokens=True)
    device = model_device(sender.model)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    past = prefill(sender.model, ids, mask, positions, chunk_tokens, should_stop)
    return KVCache.from_dynamic_cache(past, mask.bool(), positions, sender.geometry.fingerprint())


def transform_cache(
    adapter: DenseAdapter,
    cache: KVCache,
    sender: RopeModel,
    receiver: RopeModel,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache:
    """Sender cache -> receiver-space cache: RemoveRoPE_S, T_θ, AddRoPE_R (differentiable in the adapter).

    The cache moves to the adapter's device in its own dtype, RoPE is stripped and restored in float32
    there, and the result is cast to ``dtype`` (default: the receiver's) and moved to ``device``
    (default: the receiver's, ``device_of``). A sender cache that arrives RoPE-stripped
    (``rope_applied`` false) goes to T_θ as it is."""
    cache = cache.to(device=next(adapter.parameters()).device)  # also through a DDP wrapper
    stripped = strip_rope(cache, sender) if cache.rope_applied else cache.to(dtype=torch.float32)
    restored = restore_rope(adapter(stripped), receiver, dtype=dtype)
    return restored.to(device=device if device is not None else device_of(receiver))


def receiver_inputs(
    receiver: LoadedModel, cache: KVCache | None, prompts: Sequence[Text]
) -> tuple[torch.Tensor, torch.Tensor, KVCache | None]:
    """Left-padded prompt ids (B, T) and mask (B, T), and the checked cache (in the receiver's dtype), all
    on the receiver's device.

    Prompts that continue a cache get no BOS (the cache already starts with it); a prompt given as ids is
    used as it is (``encode``)."""
    ids, mask = encode(receiver.tokenizer, prompts, "left", add_special_tokens=cache is None)
    device = model_device(receiver.model)
    if cache is not None:
        g = receiver.geometry
        cache.check_matches(g.num_layers, g.num_kv_heads, g.head_dim, who=f"receiver {receiver.path!r}")
        if cache.batch_size != len(prompts):
            raise ValueError(f"cache has {cache.batch_size} rows but {len(prompts)} receiver prompts were given")
        cache = cache.to(dtype=receiver.dtype, device=device)
    return ids.to(device), mask.to(device), cache


def sliding_window(model: LoadedModel) -> int | None:
    """The window of the model's sliding-window attention layers (Mistral, Gemma-2/3, ...), None if it has none."""
    return config_sliding_window(model.model.config.get_text_config())


def config_sliding_window(config) -> int | None:
    """``sliding_window`` from a (text) model config alone."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    uses = "sliding_attention" in types if types is not None else getattr(config, "use_sliding_window", True) is not False
    return int(window) if uses else None


def padding_crosses_window(model: LoadedModel, cache: KVCache | None, prompt_mask: torch.Tensor, new_tokens: int = 0) -> bool:
    """Whether a batch laid out as a right-padded cache then left-padded prompts (``prompt_mask``, B x T) has
    padding between some row's cache and its prompt and spans more slots than the model's sliding window.
    transformers measures the window in slots, not positions, so such a row would lose cache tokens its window
    holds: the batch must run row by row (one row, or a batch without padding, has slots equal to positions)."""
    window = sliding_window(model)
    if not window or cache is None or cache.batch_size < 2:
        return False
    if bool(cache.mask.all()) and bool(prompt_mask.bool().all()):
        return False
    return cache.mask.shape[1] + prompt_mask.shape[1] + new_tokens > window


def check_teacher_forced_layout(model: LoadedModel, cache: KVCache, mask: torch.Tensor) -> None:
    """Training losses read a batch in one forward: refuse one whose padding crosses the receiver's sliding
    window (``padding_crosses_window``), naming the fix, rather than train on rows that lost their cache."""
    if padding_crosses_window(model, cache, mask):
        raise CacheLayoutError(f"receiver {model.path!r}: this batch spans {cache.mask.shape[1] + mask.shape[1]} slots with "
                               f"padding between some row's cache and its prompt, beyond its sliding window of "
                               f"{sliding_window(model)}, so that row would lose cache tokens (transformers counts the "
                               "window in slots): lower the batch size to 1 or keep examples shorter than the window")


def receiver_generate(
    receiver: LoadedModel,
    cache: KVCache | None,
    prompts: Sequence[Text],
    config: GenerationConfig,
    on_token=None,
    should_stop=None,
) -> RelayOutput:
    """Generate after an optional receiver-space cache; prompts continue it without a new BOS. A batch whose
    padding would cross a sliding window (``padding_crosses_window``) is generated row by row."""
    tokenizer = receiver.tokenizer
    ids, mask, cache = receiver_inputs(receiver, cache, prompts)
    if padding_crosses_window(receiver, cache, mask, config.max_new_tokens):
        if on_token is not None:
            raise ValueError(f"receiver {receiver.path!r} generates this batch row by row (its padding crosses the "
                             f"sliding window of {sliding_window(receiver)}): on_token needs one row per call")
        outs = [receiver_generate(receiver, cache.rows([b]).trimmed(), [ids[b][mask[b].bool()].tolist()], config,
                                  should_stop=should_stop) for b in range(len(prompts))]
        width = max(o.tokens.shape[1] for o in outs)
        tokens = torch.cat([F.pad(o.tokens, (0, width - o.tokens.shape[1]), value=tokenizer.eos_token_id) for o in outs])
        counts = TokenCounts(receiver_prefill=sum(o.counts.receiver_prefill for o in outs),
                             receiver_decode=sum(o.counts.receiver_decode for o in outs))
        return RelayOutput([t for o in outs for t in o.texts], tokens, torch.cat([o.lengths for o in outs]), counts)
    past = past_mask = past_next = None
    if cache is not None:
        past, past_mask, past_next = cache.to_dynamic_cache(), cache.mask, cache.next_positions
    else:
        past_next = None
    tokens, lengths = generate(receiver.model, ids, mask, config, tokenizer.eos_token_id, past, past_mask, on_token, past_next,
                               should_stop)
    texts = decode_generated(tokenizer, tokens, lengths)
    counts = TokenCounts(receiver_prefill=int(mask.sum()), receiver_decode=int(lengths.sum()))
    return RelayOutput(texts, tokens, lengths, counts)


class DenseRelay:
    """A sender, a receiver of another geometry, and the adapter trained for that pair."""

    def __init__(
        self,
        sender: LoadedModel,
        receiver: LoadedModel,
        adapter: DenseAdapter,
        prompt_format: PromptFormat = PromptFormat(),
        channel: Callable[[KVCache, int], KVCache] | None = None,
    ) -> None:
        """``channel(cache, hop)`` carries a cache across hop 0 (sender -> adapter) and hop 1
        (adapter -> receiver), e.g. an encode/decode round trip through a codec; None is a perfect link."""
        check_shared_tokenizer(sender, receiver)
        for side, model, want in (("sender", sender, adapter.config.sender), ("receiver", receiver, adapter.config.receiver)):
            if model.geometry != want:
                raise GeometryMismatchError(
                    f"adapter expects {side} {want.fingerprint()}, but {side} {model.path!r} is {model.geometry.fingerprint()}"
                )
        self.sender, self.receiver, self.adapter, self.prompt_format = sender, receiver, adapter, prompt_format
        self.channel = channel or (lambda cache, hop: cache)

    @torch.no_grad()
    def transfer(self, contexts: Sequence[str]) -> KVCache:
        """X -> the sender's cache -> the receiver-space cache (what travels to the receiver)."""
        return self._transfer(contexts)[0]

    def _transfer(self, contexts: Sequence[str]) -> tuple[KVCache, int]:
        """The receiver-space cache and the number of tokens the sender prefilled (before any eviction)."""
        texts = [self.prompt_format.sender.format(context=c) for c in contexts]
        prefilled = sender_prefill(self.sender, texts)
        sent = self.channel(prefilled, 0)
        return self.channel(transform_cache(self.adapter, sent, self.sender, self.receiver), 1), int(prefilled.lengths.sum())

    @torch.no_grad()
    def run(
        self,
        contexts: Sequence[str],
        mode: ContextMode,
        config: GenerationConfig = GenerationConfig(),
        receiver_prompts: Sequence[str] | None = None,
        on_token=None,
    ) -> RelayOutput:
        """Relay a batch of inputs and let the receiver answer in ``mode``; ``on_token(step, tokens)`` sees each
        decoding step's tokens as ``generate`` makes them."""
        cache, sender_tokens = self._transfer(contexts)
        if receiver_prompts is None:
            receiver_prompts = [self.prompt_format.receiver_prompt(mode, c) for c in contexts]
        out = receiver_generate(self.receiver, cache, receiver_prompts, config, on_token)
        out.counts.sender_prefill = sender_tokens
        out.payload_bytes = cache.valid_nbytes()
        return out


@torch.no_grad()
def answer_with_input(model: LoadedModel, contexts: Sequence[str], config: GenerationConfig, prompt_format: PromptFormat = PromptFormat()) -> RelayOutput:
    """Baseline: one model answering with X in its own prompt (sender alone, or receiver-only with input)."""
    return receiver_generate(model, None, [prompt_format.with_input.format(context=c) for c in contexts], config)


@torch.no_grad()
def answer_without_input(model: LoadedModel, batch: int, config: GenerationConfig, prompt_format: PromptFormat = PromptFormat()) -> RelayOutput:
    """Baseline: the receiver alone, never seeing X (the floor dense context-unaware must rise above)."""
    return receiver_generate(model, None, [prompt_format.without_input] * batch, config)
