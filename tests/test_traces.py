"""Receiver-self traces: kept / relabelled / dropped with reasons, JSONL round trip, matching to training examples."""

from __future__ import annotations

import pytest

from densecomm_core.training.traces import (
    TraceFileError,
    TraceRecord,
    TraceRequest,
    canonical_trace,
    generate_receiver_traces,
    load_traces,
    match_traces,
    relabelled_trace,
    save_traces,
)
from densecomm_core.zoo import tasks


def test_canonical_and_relabelled_forms():
    assert canonical_trace("bob 3 . answer 3 answer 3 junk", "3") == "bob 3 . answer 3 answer 3"
    assert canonical_trace("no statement", "3") == "no statement"
    assert relabelled_trace("cat red . red C . answer C", "B") == "cat red . red C . answer B"
    assert relabelled_trace("rambling", "B") == "rambling answer B"
    assert relabelled_trace("Thus x. The answer is (C)", "A", "The answer is ({answer})") == "Thus x. The answer is (A)"
    with pytest.raises(ValueError, match="must contain"):
        relabelled_trace("x", "A", "answer")


def test_zoo_receiver_traces_are_kept_relabelled_or_dropped_with_a_reason(zoo_pair):
    _, receiver = zoo_pair
    examples = tasks.make_split("train", 4)
    requests = [TraceRequest(e.context, e.answer, tasks.prompt_guided(e), e.family, e.family == "choice") for e in examples]
    # Two poisoned requests whose "gold" the receiver will not write: a math one is dropped, a choice one relabelled.
    math = next(e for e in examples if e.family == "math")
    choice = next(e for e in examples if e.family == "choice")
    wrong_math = str((int(math.answer) + 5) % 10)
    wrong_letter = "A" if choice.answer != "A" else "B"
    requests += [TraceRequest(math.context, wrong_math, tasks.prompt_guided(math), "math"),
                 TraceRequest(choice.context, wrong_letter, tasks.prompt_guided(choice), "choice", True)]
    records, stats = generate_receiver_traces(receiver, requests, tasks.extract_answer, "answer {answer}", batch_size=5)
    assert len(records) == len(requests) and sum(stats.values()) == len(requests)
    assert [r.context for r in records] == [r.context for r in requests]  # one record per request, in order
    assert stats["kept"] >= len(examples) - 1
    dropped, relabelled = records[-2], records[-1]
    assert dropped.status == "dropped" and dropped.trace == "" and f"gold {wrong_math!r}" in dropped.reason
    assert relabelled.status == "relabelled" and relabelled.trace.endswith(f"answer {wrong_letter}")
    assert tasks.extract_answer(relabelled.trace) == wrong_letter
    for r in records[: len(examples)]:
        if r.status == "kept":
            assert tasks.extract_answer(r.trace) == r.answer and r.trace.endswith(f"answer {r.answer}")


def test_jsonl_round_trip_and_matching(tmp_path):
    records = [
        TraceRecord("recall ann 3 . ann ?", "3", "ann 3 . answer 3", "recall"),
        TraceRecord("math 1 + 2 ?", "3", "", "math", status="dropped", reason="answered '4', gold '3'"),
        TraceRecord("choice ...", "B", "x answer B", "choice", "guided-relabelled", "relabelled", "answered 'C'"),
    ]
    path = tmp_path / "traces.jsonl"
    save_traces(records, path)
    assert not (tmp_path / "traces.jsonl.tmp").exists()
    first = path.read_text().splitlines()[0]
    assert all(key in first for key in ('"question"', '"gold"', '"trace"', '"status"', '"reason"'))
    assert load_traces(path) == records
    usable = match_traces(load_traces(path), [r.context for r in records])
    assert [r.status for r in usable] == ["kept", "relabelled"]
    with pytest.raises(TraceFileError, match="match no training example"):
        match_traces(records, ["recall ann 3 . ann ?"])
    path.write_text(first + "\n{not json\n")
    with pytest.raises(TraceFileError, match=r"traces.jsonl:2"):
        load_traces(path)
