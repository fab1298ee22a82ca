"""A map's input pulled by its feed's own thread (`rhmapper.input_feed.InputFeed`), on the
in-process pool: items of an input that pauses go once they waited ``max_wait_seconds``, the
results of calls already sent come while the input blocks, the input's own exception fails the
map, and a map that ends early stops pulling."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from rhmapper.plan import MapPlan
from rhmapper.scheduler import MapRun
from rhmapper.wire import CallSpec
from tests.fakes import FakePool


def paused_input(inputs: queue.Queue, pulled: list):
    """Yields what is put in ``inputs`` (blocking in between) until ``None``."""
    while (item := inputs.get()) is not None:
        pulled.append(item)
        yield item


def consume(run: MapRun, into: queue.Queue) -> threading.Thread:
    def drive() -> None:
        try:
            for chunk in run.chunks():
                for value in chunk:
                    into.put(value)
            into.put("end")
        except Exception as error:  # the test reads it from the queue
            into.put(error)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    return thread


def test_items_of_a_paused_input_go_together_after_max_wait_and_come_back_while_it_blocks():
    pool = FakePool(2, fn=lambda x: 10 * x)
    inputs, pulled, results = queue.Queue(), [], queue.Queue()
    plan = MapPlan(CallSpec("fn"), window=256, batch_size=64, max_wait_seconds=0.2)
    thread = consume(MapRun(pool, plan, paused_input(inputs, pulled)), results)
    try:
        put_at = time.monotonic()
        for item in (1, 2, 3):
            inputs.put(item)
        assert [results.get(timeout=10) for _ in range(3)] == [10, 20, 30]
        waited = time.monotonic() - put_at
        assert 0.2 <= waited < 5, "they waited max_wait for more, not for a full call of 64"
        assert [items for _, _, items in pool.log] == [[1, 2, 3]]
        inputs.put(4)
        assert results.get(timeout=10) == 40
        assert [items for _, _, items in pool.log] == [[1, 2, 3], [4]]
    finally:
        inputs.put(None)
    assert results.get(timeout=10) == "end"
    thread.join(10)
    assert not thread.is_alive() and pulled == [1, 2, 3, 4]


def test_a_quick_input_fills_whole_calls():
    pool = FakePool(3, fn=lambda x: x + 1, capacity=2)
    plan = MapPlan(CallSpec("fn"), collect=True, total=30_000, window=None, batch_size=500,
                   max_wait_seconds=0.05)
    run = MapRun(pool, plan, iter(range(30_000)))
    for _ in run.chunks():
        pass
    assert run.results == [x + 1 for x in range(30_000)]
    sizes = [len(items) for _, _, items in pool.log]
    assert sizes.count(500) >= len(sizes) - 3, f"a quick input should fill its calls: {sizes}"


def test_an_input_that_raises_fails_the_map_with_its_own_exception():
    def source():
        yield 1
        yield 2
        raise KeyError("the third input is missing")

    pool = FakePool(2, fn=lambda x: x)
    plan = MapPlan(CallSpec("fn"), window=64)
    with pytest.raises(KeyError, match="the third input is missing"):
        for _ in MapRun(pool, plan, source()).chunks():
            pass
    with pytest.raises(ZeroDivisionError):  # on its first item
        for _ in MapRun(pool, plan, (1 // 0 for _ in range(3))).chunks():
            pass


def test_a_map_that_ends_early_stops_pulling_its_input():
    pool = FakePool(1, fn=lambda x: x)
    inputs, pulled = queue.Queue(), []
    run = MapRun(pool, MapPlan(CallSpec("fn"), window=4, batch_size=1),
                 paused_input(inputs, pulled))
    chunks = run.chunks()
    inputs.put(1)
    assert next(chunks) == [1]
    chunks.close()  # the consumer leaves the loop
    for item in (2, 3, 4):
        inputs.put(item)
    puller = run._feed._puller
    puller.join(10)
    assert not puller.is_alive()
    assert 3 not in pulled and 4 not in pulled, f"pulled after the map ended: {pulled}"
    assert pool.log == [("fake_replica_0", 0, [1])]


def test_a_sequence_is_sliced_lazily_without_a_thread():
    """An imap over a list, tuple or range takes slices of it: a range of 10**12 items streams
    its first results at once, and no thread pulls it."""
    pool = FakePool(2, fn=lambda x: -x)
    run = MapRun(pool, MapPlan(CallSpec("fn"), window=64, batch_size=8), range(10**12))
    chunks = run.chunks()
    first = []
    while len(first) < 20:
        first.extend(next(chunks))
    chunks.close()
    assert first[:20] == [-x for x in range(20)]
    assert not hasattr(run._feed, "_puller")
    assert sum(len(items) for _, _, items in pool.log) <= 64 + 8


def test_held_items_wait_for_others_from_when_a_call_wants_them_not_from_when_pulled():
    """Items pulled while no replica slot was free (replicas starting) still get max_wait to be
    joined by others once a call wants them: the first call is not one lone item."""
    from rhmapper.input_feed import InputFeed

    inputs: queue.Queue = queue.Queue()
    feed = InputFeed(paused_input(inputs, []), max_call_bytes=2**20, max_wait_seconds=0.2)
    inputs.put(0)
    assert not feed.is_empty()  # item 0 is held
    time.sleep(0.3)  # longer than max_wait, with no call wanting items
    assert feed.ready_at() is None and feed.take(8) is None  # a call wants them from now
    for item in range(1, 4):
        inputs.put(item)
    deadline = time.monotonic() + 10
    while (taken := feed.take(8)) is None:
        assert time.monotonic() < deadline, "the held items never went"
        time.sleep(0.01)
    assert taken == (0, [0, 1, 2, 3])
    inputs.put(None)
    feed.close()
