"""The answer's token stream between the services: the receiver's batches, the ingress's one event per token, and
forwarding that ends early cancelling the call it forwards."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from densecomm_core.zoo import tasks
from services.client import build_request
from services.config import ConfigError, load_config
from services.servicers import client_events, relay_events, relay_pb2, token_batches
from services.stack import LocalStack
from tests.services.conftest import collect, run, stack_config

TEXT = tasks.make_split("test", 1)[0].context


async def batches_of(delays: list[float], window_s: float) -> list[tuple[float, list[int]]]:
    """Items 0, 1, ... put on a queue by a thread after ``delays`` (seconds before each), then the end; the
    batches ``token_batches`` made, each with the time it was handed over (from the start)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def produce() -> None:
        for i, delay in enumerate(delays):
            time.sleep(delay)
            loop.call_soon_threadsafe(queue.put_nowait, i)

    started = time.perf_counter()
    producer = asyncio.ensure_future(asyncio.to_thread(produce))
    producer.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    out = [(time.perf_counter() - started, batch) async for batch in token_batches(queue, window_s, producer)]
    await producer
    return out


def test_the_first_token_goes_at_once_later_ones_share_a_window_and_the_end_flushes_at_once():
    out = run(batches_of([0.0] + [0.01] * 12, window_s=0.05))
    assert out[0][1] == [0] and out[0][0] < 0.03  # not held for the window
    assert [i for _, batch in out for i in batch] == list(range(13))  # every item, in order
    assert len(out) <= 5  # ~120 ms of items in 50 ms windows
    assert all(b - a >= 0.045 for (a, _), (b, _) in zip(out[:-2], out[1:-1]))  # one batch per window (the last: at the end)
    ends = run(batches_of([0.0, 0.005], window_s=5.0))  # a long window: the producer's end releases the rest
    assert [batch for _, batch in ends] == [[0], [1]] and ends[-1][0] < 1.0


def test_window_zero_sends_every_item_that_is_not_queued_beside_another_alone():
    out = run(batches_of([0.0, 0.02, 0.02, 0.02], window_s=0.0))
    assert [batch for _, batch in out] == [[0], [1], [2], [3]]


def test_a_cancelled_consumer_stops_while_it_waits_for_its_window():
    async def main() -> bool:
        queue: asyncio.Queue = asyncio.Queue()
        never = asyncio.get_running_loop().create_future()
        batches = []

        async def consume() -> None:
            async for batch in token_batches(queue, 10.0, never):
                batches.append(batch)

        queue.put_nowait(1)
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        queue.put_nowait(2)  # arrives while the consumer waits out its window
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return batches == [[1]]

    assert run(main())


class FakeCall:
    """A downstream call: five token events, and whether anybody cancelled it."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self):
        return self.events()

    async def events(self):
        for i in range(5):
            yield relay_pb2.RelayEvent(token=relay_pb2.TokenEvent(index=i))

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_forwarding_that_ends_while_handing_an_event_on_cancels_the_call():
    async def main() -> tuple[bool, bool]:
        call, done = FakeCall(), FakeCall()
        async with contextlib.aclosing(relay_events(call)) as events:
            async for _ in events:
                break  # as when our own caller goes away at a yield
        async with contextlib.aclosing(relay_events(done)) as events:
            assert len([e async for e in events]) == 5
        return call.cancelled, done.cancelled

    assert run(main()) == (True, True)  # (cancel is a no-op on a gRPC call that ended)


def test_the_ingress_sends_each_token_of_a_batch_as_its_own_event():
    batch = relay_pb2.RelayEvent(tokens=relay_pb2.TokenBatch(tokens=[relay_pb2.TokenEvent(index=i, text=f"t{i}") for i in range(3)]))
    out = client_events(batch)
    assert [e.WhichOneof("event") for e in out] == ["token"] * 3 and [e.token.text for e in out] == ["t0", "t1", "t2"]
    stats = relay_pb2.RelayEvent(stats=relay_pb2.RelayStats(text="x"))
    assert client_events(stats) == [stats]


@pytest.mark.parametrize("flush_ms", [0.0, 1000.0])
def test_relay_clients_get_one_event_per_token_whatever_the_batching(random_route, flush_ms):
    with LocalStack(stack_config(random_route, token_flush_ms=flush_ms)) as stack:
        events = run(collect(stack.relay_address, build_request(TEXT, max_new_tokens=12)))
    tokens, final = events[:-1], events[-1]
    assert all(e.WhichOneof("event") == "token" for e in tokens) and final.HasField("stats")
    assert [e.token.index for e in tokens] == list(range(len(tokens)))
    decoded = final.stats.receiver_decode_tokens
    assert len(tokens) in (decoded, decoded - 1)  # the EOS, when the answer ends on it, is not an event
    assert "".join(e.token.text for e in tokens).strip() == final.stats.text.strip()


def test_token_flush_ms_is_checked():
    with pytest.raises(ConfigError, match="token_flush_ms must be >= 0"):
        load_config(None, token_flush_ms=-1)

