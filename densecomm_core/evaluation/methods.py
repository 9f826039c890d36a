"""Communication methods behind one small interface, so one evaluator scores them all (paper Tables 1-3).

    Method.name, Method.modes               registry name; the regimes it runs in (None: it has no regime)
    Method.run(contexts, mode)              answer a batch of inputs X -> RelayOutput with exact per-side
                                            TokenCounts (who prefilled and decoded how many tokens)
    Method.adapter_flops_per_token(pair)    FLOPs of the channel per transferred token on ``pair`` (default 0)
    Method.flops(counts, pair)              appendix B.1 per side (sender, adapter, receiver, total) on ``pair``,
                                            the zoo's own models or a projected real geometry

Methods (``METHODS``: name -> builder of an ``EvalPair``)
- ``sender``:                 the sender alone, reading X (its tokens count on the sender side)
- ``receiver``:               the receiver alone, reading X
- ``receiver-without-input``: the receiver alone, never seeing X (the floor)
- ``t2t``:                    the sender writes a message by greedy decoding, the receiver reads it (with X in
                              context-aware mode, alone in context-unaware mode)
- ``dense``:                  ours: the sender's cache through T_θ, the receiver answers (both modes)
- ``dense-codec``:            ours with both cache hops through a registered codec, shipped as the services do
                              (``hop.round_trip``: one bf16 wire payload per request); its row is ``dense+<codec>``
- ``c2c``:                    the C2C-style fuser (``baselines.c2c``): the sender's cache steers the receiver's own
                              cache of X (context-aware) or zeros (context-unaware)

Adding a method is one ``Method`` subclass and one ``METHODS`` line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from densecomm_core.adapter import DenseAdapter
from densecomm_core.cache import KVCache
from densecomm_core.errors import DenseCommError
from densecomm_core.evaluation.flops import PairCost, c2c_fuser_params, dense_adapter_flops_per_token
from densecomm_core.generation import GenerationConfig
from densecomm_core.models import LoadedModel
from densecomm_core.relay import (
    ContextMode,
    DenseRelay,
    PromptFormat,
    RelayOutput,
    TokenCounts,
    answer_with_input,
    answer_without_input,
    receiver_generate,
)


class EvaluationError(DenseCommError, ValueError):
    """An evaluation was asked for something it cannot do (unknown method, a mode a method lacks, ...)."""

    status = "INVALID_ARGUMENT"


@dataclass
class EvalPair:
    """What every method is built from: the pair, its adapter, prompt layouts, decoding budgets, a codec."""

    sender: LoadedModel
    receiver: LoadedModel
    adapter: DenseAdapter | None = None
    adapter_dir: Path | None = None  # where the pca codec's receiver-space basis lives
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=24))  # answers
    message_generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=24))  # T2T
    codec: str = ""  # registered codec name for ``dense-codec``
    codec_params: dict = field(default_factory=dict)
    fuser: object | None = None  # a ``baselines.c2c.C2CFuser`` for ``c2c``


class Method(ABC):
    """One way of getting an answer to X out of the pair."""

    name: str
    modes: tuple[ContextMode | None, ...] = (None,)

    @abstractmethod
    def run(self, contexts: Sequence[str], mode: ContextMode | None) -> RelayOutput:
        """Answer every context; ``out.counts`` holds the batch's exact per-side token counts."""

    def adapter_flops_per_token(self, pair: PairCost) -> int:
        """FLOPs the channel spends per transferred (sender-prefilled) token; text methods spend none."""
        return 0

    def flops(self, counts: TokenCounts, pair: PairCost) -> dict[str, int]:
        """2·N·tokens per side on ``pair``'s models, plus the channel's FLOPs per transferred token."""
        return counts.flops(pair.sender.non_embedding_params, pair.receiver.non_embedding_params,
                            self.adapter_flops_per_token(pair))

    def check_mode(self, mode: ContextMode | None) -> None:
        if mode not in self.modes:
            shown = [m.value if m else None for m in self.modes]
            raise EvaluationError(f"method {self.name!r} runs in modes {shown}; got {mode.value if mode else None!r}")


class SenderAlone(Method):
    """The sender answering X by itself; its tokens are the sender side's."""

    name = "sender"

    def __init__(self, pair: EvalPair) -> None:
        self.pair = pair

    def run(self, contexts: Sequence[str], mode: ContextMode | None = None) -> RelayOutput:
        self.check_mode(mode)
        out = answer_with_input(self.pair.sender, contexts, self.pair.generation, self.pair.prompt_format)
        out.counts = TokenCounts(sender_prefill=out.counts.receiver_prefill, sender_decode=out.counts.receiver_decode)
        return out


class ReceiverAlone(Method):
    """The receiver answering by itself, with X in its prompt or without it."""

    def __init__(self, pair: EvalPair, with_input: bool) -> None:
        self.pair, self.with_input = pair, with_input
        self.name = "receiver" if with_input else "receiver-without-input"

    def run(self, contexts: Sequence[str], mode: ContextMode | None = None) -> RelayOutput:
        self.check_mode(mode)
        p = self.pair
        if self.with_input:
            return answer_with_input(p.receiver, contexts, p.generation, p.prompt_format)
        return answer_without_input(p.receiver, len(contexts), p.generation, p.prompt_format)


@dataclass
class TextToTextOutput(RelayOutput):
    """The receiver's answers plus the messages the sender wrote (what crossed, as text)."""

    messages: list[str] = field(default_factory=list)


class TextToText(Method):
    """T2T: the sender really decodes a message (greedy); the receiver reads it as text."""

    name = "t2t"
    modes = (ContextMode.AWARE, ContextMode.UNAWARE)

    def __init__(self, pair: EvalPair) -> None:
        self.pair = pair

    def messages(self, contexts: Sequence[str]) -> RelayOutput:
        """The sender's messages (its generated text after the ``message`` prompt)."""
        p = self.pair
        return receiver_generate(p.sender, None, [p.prompt_format.message.format(context=c) for c in contexts], p.message_generation)

    def run(self, contexts: Sequence[str], mode: ContextMode | None) -> RelayOutput:
        self.check_mode(mode)
        p = self.pair
        message = self.messages(contexts)
        prompts = [p.prompt_format.t2t_prompt(mode, c, m) for c, m in zip(contexts, message.texts, strict=True)]
        answer = receiver_generate(p.receiver, None, prompts, p.generation)
        counts = TokenCounts(sender_prefill=message.counts.receiver_prefill,  # the sender's side: the message
                             sender_decode=message.counts.receiver_decode,
                             receiver_prefill=answer.counts.receiver_prefill, receiver_decode=answer.counts.receiver_decode)
        return TextToTextOutput(answer.texts, answer.tokens, answer.lengths, counts, messages=message.texts)


class Dense(Method):
    """Ours: the sender prefills X (no decoding), T_θ maps its cache, the receiver answers after it."""

    name = "dense"
    modes = (ContextMode.AWARE, ContextMode.UNAWARE)

    def __init__(self, pair: EvalPair, channel: Callable[[KVCache, int], KVCache] | None = None) -> None:
        if pair.adapter is None:
            raise EvaluationError(f"method {self.name!r} needs an adapter for the pair; none was given")
        self.pair = pair
        self.relay = DenseRelay(pair.sender, pair.receiver, pair.adapter, pair.prompt_format, channel)

    def run(self, contexts: Sequence[str], mode: ContextMode | None) -> RelayOutput:
        self.check_mode(mode)
        return self.relay.run(contexts, mode, self.pair.generation)

    def adapter_flops_per_token(self, pair: PairCost) -> int:
        return dense_adapter_flops_per_token(pair)


class DenseThroughCodec(Dense):
    """Ours with both cache hops (sender -> adapter, adapter -> receiver) through a codec's bytes."""

    def __init__(self, pair: EvalPair) -> None:
        from densecomm_core.codec.base import get_codec
        from densecomm_core.codec.transform import KVBases
        from densecomm_core.hop import round_trip

        if not pair.codec:
            raise EvaluationError("method 'dense-codec' needs a codec name (e.g. --codec quantized)")
        codec = get_codec(pair.codec, **pair.codec_params)
        directories = [d for d in (pair.sender.path, pair.adapter_dir, pair.receiver.path) if d and Path(d).is_dir()]
        bases = KVBases.load(*directories)  # the pca codec's bases, as a route loads them
        self.raw_bytes = self.wire_bytes = 0

        def count(raw: int, wire: int) -> None:
            self.raw_bytes += raw
            self.wire_bytes += wire

        def channel(cache: KVCache, hop: int) -> KVCache:
            hop_codec, model = (codec, pair.sender) if hop == 0 else (codec.for_forwarding(), pair.receiver)
            return round_trip(cache, hop_codec, on_payload=count, model=model, bases=bases)

        super().__init__(pair, channel)
        self.name = f"dense+{pair.codec}"


class C2C(Method):
    """The C2C-style baseline: a fuser adds a gated projection of the sender's cache onto the receiver's own."""

    name = "c2c"
    modes = (ContextMode.AWARE, ContextMode.UNAWARE)

    def __init__(self, pair: EvalPair) -> None:
        if pair.fuser is None:
            raise EvaluationError("method 'c2c' needs a C2C fuser for the pair (--c2c DIR, from `densecomm baseline c2c`)")
        self.pair = pair

    def run(self, contexts: Sequence[str], mode: ContextMode | None) -> RelayOutput:
        from densecomm_core.baselines.c2c import c2c_run

        self.check_mode(mode)
        p = self.pair
        return c2c_run(p.sender, p.receiver, p.fuser, contexts, mode, p.generation, p.prompt_format)

    def adapter_flops_per_token(self, pair: PairCost) -> int:
        return 2 * c2c_fuser_params(pair)


METHODS: dict[str, Callable[[EvalPair], Method]] = {
    "sender": SenderAlone,
    "receiver": lambda pair: ReceiverAlone(pair, with_input=True),
    "receiver-without-input": lambda pair: ReceiverAlone(pair, with_input=False),
    "t2t": TextToText,
    "dense": Dense,
    "dense-codec": DenseThroughCodec,
    "c2c": C2C,
}


def check_method_names(names: Sequence[str], prefix: str = "") -> None:
    """EvaluationError naming the known methods when ``names`` holds another (checkable before any model loads)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise EvaluationError(f"{prefix}unknown method(s) {unknown}; expected some of {list(METHODS)}")


def build_methods(names: Sequence[str], pair: EvalPair) -> list[Method]:
    """The named methods (``METHODS`` keys) built on ``pair``; EvaluationError names the known ones."""
    check_method_names(names)
    return [METHODS[n](pair) for n in names]
