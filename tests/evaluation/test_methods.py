"""Every method on a tiny random pair: exact per-side token counts, T2T decodes on the sender, dense never does."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.data import TaskExample
from densecomm_core.evaluation.methods import (
    METHODS,
    EvalPair,
    EvaluationError,
    Method,
    build_methods,
)
from densecomm_core.evaluation.runner import cells, evaluate
from densecomm_core.evaluation.tasksets import TaskSet
from densecomm_core.generation import GenerationConfig
from densecomm_core.relay import ContextMode, RelayOutput, TokenCounts

CONTEXTS = ["recall ann 1 , bob 2 . ann ?", "math 3 + 4 ?", "choice cat red . red A , blue B . cat ?"]
WORDS = [len(c.split()) for c in CONTEXTS]  # the zoo tokenizer is one token per word


@pytest.fixture(scope="module")
def pair(tiny_pair) -> EvalPair:
    sender, receiver = tiny_pair
    torch.manual_seed(0)
    adapter = DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry))
    return EvalPair(sender, receiver, adapter, generation=GenerationConfig(max_new_tokens=4),
                    message_generation=GenerationConfig(max_new_tokens=6), codec="quantized")


def run(method: Method, mode):
    out = method.run(CONTEXTS, mode)
    assert len(out.texts) == len(CONTEXTS)
    assert out.counts.receiver_decode + out.counts.sender_decode > 0
    return out


def test_lone_models_count_their_own_tokens(pair):
    sender, receiver, without = build_methods(["sender", "receiver", "receiver-without-input"], pair)
    out = run(sender, None)  # "<bos> X =>" on the sender, answer decoded by the sender
    assert out.counts.sender_prefill == sum(w + 2 for w in WORDS) and out.counts.receiver_prefill == 0
    assert out.counts.sender_decode == int(out.lengths.sum()) and out.counts.receiver_decode == 0
    out = run(receiver, None)
    assert out.counts.receiver_prefill == sum(w + 2 for w in WORDS) and out.counts.sender_prefill == 0
    out = run(without, None)  # "<bos> =>" only: X is never read
    assert out.counts.receiver_prefill == 2 * len(CONTEXTS) and out.counts.sender_prefill == 0


@pytest.mark.parametrize("mode", [ContextMode.AWARE, ContextMode.UNAWARE])
def test_t2t_really_decodes_on_the_sender_and_the_receiver_reads_the_message(pair, mode):
    t2t = METHODS["t2t"](pair)
    messages = t2t.messages(CONTEXTS)
    out = run(t2t, mode)
    assert out.counts.sender_prefill == sum(w + 2 for w in WORDS)  # "<bos> X =>"
    assert out.counts.sender_decode == int(messages.lengths.sum()) > 0  # greedy: the same message again
    assert out.messages == messages.texts
    prompts = [pair.prompt_format.t2t_prompt(mode, c, m) for c, m in zip(CONTEXTS, messages.texts)]
    if mode is ContextMode.AWARE:
        assert all(c in p and m in p for p, c, m in zip(prompts, CONTEXTS, messages.texts))
    else:
        assert all(c not in p and m in p for p, c, m in zip(prompts, CONTEXTS, messages.texts))
    tokens = sum(len(pair.receiver.tokenizer(p)["input_ids"]) for p in prompts)  # BOS included
    assert out.counts.receiver_prefill == tokens


@pytest.mark.parametrize("mode", [ContextMode.AWARE, ContextMode.UNAWARE])
def test_dense_never_decodes_on_the_sender(pair, mode):
    for name in ("dense", "dense-codec"):
        method = METHODS[name](pair)
        out = run(method, mode)
        assert out.counts.sender_decode == 0
        assert out.counts.sender_prefill == sum(w + 1 for w in WORDS)  # "<bos> X": every token is transferred
        # after the cache, no BOS: "X =>" (aware) or "=>" (unaware)
        expected = sum(w + 1 for w in WORDS) if mode is ContextMode.AWARE else len(CONTEXTS)
        assert out.counts.receiver_prefill == expected
        assert out.payload_bytes > 0
    assert method.name == "dense+quantized" and method.raw_bytes > 0 and method.wire_bytes > 0


def test_modes_and_registry_errors(pair):
    t2t, sender = build_methods(["t2t", "sender"], pair)
    with pytest.raises(EvaluationError, match="'t2t' runs in modes"):
        t2t.run(CONTEXTS, None)
    with pytest.raises(EvaluationError, match="'sender' runs in modes"):
        sender.run(CONTEXTS, ContextMode.AWARE)
    with pytest.raises(EvaluationError, match="unknown method"):
        build_methods(["c2c-typo"], pair)
    with pytest.raises(EvaluationError, match="needs an adapter"):
        build_methods(["dense"], EvalPair(pair.sender, pair.receiver))
    with pytest.raises(EvaluationError, match="needs a codec"):
        build_methods(["dense-codec"], EvalPair(pair.sender, pair.receiver, pair.adapter))
    assert [(m.name, mode) for m, mode in cells([sender, t2t], [ContextMode.UNAWARE])] == [("sender", None), ("t2t", ContextMode.UNAWARE)]


class Scripted(Method):
    """A fixed reply per context, with a fixed token count per request: the runner's bookkeeping alone."""

    name = "scripted"
    modes = (ContextMode.AWARE,)

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies

    def run(self, contexts, mode):
        n = len(contexts)
        return RelayOutput([self.replies[c] for c in contexts], torch.zeros(n, 1), torch.ones(n),
                           TokenCounts(3 * n, 0, 2 * n, n), payload_bytes=10 * n)


def test_runner_scores_and_sums_batches():
    examples = tuple(TaskExample("t", f"q{i}", str(i)) for i in range(5))
    replies = {f"q{i}": (f"so it is {i}" if i % 2 == 0 else "no idea") for i in range(5)}
    task = TaskSet("t", examples, "number", False, "here")
    seen = []
    (cell,) = evaluate([Scripted(replies)], [task], batch_size=2, progress=lambda *a: seen.append(a))
    assert (cell.requests, cell.correct, cell.accuracy) == (5, 3, 0.6)
    assert cell.counts == TokenCounts(15, 0, 10, 5) and cell.payload_bytes == 50
    assert seen == [("scripted (aware)", "t", 2, 5), ("scripted (aware)", "t", 4, 5), ("scripted (aware)", "t", 5, 5)]


@pytest.mark.parametrize("mode", [ContextMode.AWARE, ContextMode.UNAWARE])
def test_c2c_method_never_decodes_on_the_sender_and_reads_x_only_when_aware(pair, mode):
    from dataclasses import replace

    from densecomm_core.baselines.c2c import C2CConfig, C2CFuser

    with pytest.raises(EvaluationError, match="needs a C2C fuser"):
        METHODS["c2c"](pair)
    torch.manual_seed(0)
    fuser = C2CFuser(C2CConfig(pair.sender.geometry, pair.receiver.geometry, hidden=8))
    out = run(METHODS["c2c"](replace(pair, fuser=fuser)), mode)
    assert out.counts.sender_prefill == sum(w + 1 for w in WORDS) and out.counts.sender_decode == 0  # "<bos> X"
    own_prefill = sum(w + 1 for w in WORDS) if mode is ContextMode.AWARE else 0  # the receiver's own cache of X
    prompt = sum(w + 1 for w in WORDS) if mode is ContextMode.AWARE else len(CONTEXTS)  # "X =>" or "=>"
    assert out.counts.receiver_prefill == own_prefill + prompt
