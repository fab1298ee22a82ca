"""Batched (vectorized) mappers on Ray: the method gets whole batches (one list per argument),
every verb returns values per item, and a batch that raises is split until the bad items fail
alone. Calls are counted inside the replicas."""

from __future__ import annotations


import numpy as np
import pytest

import rhmapper as rm

BAD = -13


class Model:
    """A batched model that counts its calls and items."""

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0

    def predict(self, xs, ys=None, scale=1):
        self.calls += 1
        self.items += len(xs)
        if not isinstance(xs, list) or not (ys is None or isinstance(ys, list)):
            raise TypeError(f"a batched method gets lists, got {type(xs).__name__}")
        if BAD in xs:
            raise ValueError(f"item {BAD} is bad")
        if ys is None:
            return np.array(xs) * scale
        return [x * scale + y for x, y in zip(xs, ys)]

    def counts(self):
        counts = (self.calls, self.items)
        self.calls = self.items = 0
        return counts


@pytest.fixture(scope="module", params=["local", "on_cluster"])
def model(request):
    request.getfixturevalue("ray_session")
    m = rm.mapper(Model, method="predict", replicas=2, env=rm.Env(compute={"CPU": 0.5}),
                  batched=rm.Batched(max_size=64), on_cluster=request.param == "on_cluster")
    try:
        m.wait_ready(timeout=120)
        m.broadcast("counts")
        yield m
    finally:
        m.shutdown()


def calls_and_items(m) -> tuple[int, int]:
    """The calls and items every replica ran since last asked."""
    counts = m.broadcast("counts")
    return sum(calls for calls, _ in counts), sum(items for _, items in counts)


def test_map_calls_the_method_once_per_batch(model):
    assert model.map(range(300)) == list(range(300))
    assert calls_and_items(model) == (5, 300)  # 64, 64, 64, 64, 44
    assert model.map(range(100), batch_size=10) == list(range(100))
    assert calls_and_items(model) == (10, 100)


def test_several_iterables_and_starmap_pass_one_list_per_argument(model):
    assert model.map(range(10), range(10, 20), kwargs={"scale": 3}) == [
        3 * x + 10 + x for x in range(10)]
    assert model.starmap([(1, 2), (3, 4)]) == [3, 7]
    assert calls_and_items(model) == (2, 12)


def test_imap_imap_unordered_and_call(model):
    assert list(model.imap(iter(range(200)))) == list(range(200))
    assert sorted(model.imap_unordered(range(150), range(150))) == [2 * x for x in range(150)]
    assert model.call(21, 21) == 42
    calls, items = calls_and_items(model)
    assert items == 351 and calls < 351 // 10


def test_spawn_map_on_the_cluster(model):
    name = "test_batched_spawn"
    if not model.on_cluster:
        with pytest.raises(rm.RhmapperError, match=r"on_cluster=True"):
            model.spawn_map([1, 2], name=name)
        return
    spawned = model.spawn_map(range(100), name=name, kwargs={"scale": 2})
    assert spawned.results() == [2 * x for x in range(100)]
    assert calls_and_items(model) == (2, 100)


def test_one_bad_item_fails_alone_at_a_cost_of_at_most_12_calls(model):
    items = list(range(64))
    items[40] = BAD
    results = model.map(items, return_exceptions=True)
    assert isinstance(results[40], ValueError) and str(results[40]) == f"item {BAD} is bad"
    assert [value for position, value in enumerate(results) if position != 40] == [
        x for x in range(64) if x != 40]
    calls, items_run = calls_and_items(model)
    assert 1 < calls <= 1 + 12
    with pytest.raises(ValueError, match=f"item {BAD} is bad") as raised:
        model.map(items)
    assert any("item 40 failed on replica" in note for note in raised.value.__notes__)
    # The 64 items may go in more than one batch (items wait at most max_wait_ms for others):
    # the split costs the same at most.
    calls, items_run = calls_and_items(model)
    assert 1 < calls <= 1 + 12 and items_run <= 64 * 7


@pytest.mark.usefixtures("ray_local")
def test_a_flaky_item_is_retried_alone(tmp_path):
    """Item 7 raises in its first five calls: the batch of 16 and the halves holding it, down to
    itself; its retry, alone, is its sixth call."""
    log = tmp_path / "calls_with_7"

    def flaky_batch(xs):
        if 7 in xs:
            with open(log, "a") as calls:
                calls.write(f"{len(xs)}\n")
            if len(log.read_text().split()) <= 5:
                raise ConnectionError("a transient failure")
        return [x * 2 for x in xs]

    with rm.mapper(flaky_batch, replicas=1, batched=rm.Batched(max_size=16)) as m:
        assert m.map(range(16), retries=1) == [2 * x for x in range(16)]
    assert log.read_text().split() == ["16", "8", "4", "2", "1", "1"]


@pytest.mark.usefixtures("ray_local")
def test_a_wrong_result_length_fails_with_a_clear_error():
    def drops_one(xs):
        return xs[:-1]

    with rm.mapper(drops_one, replicas=1, batched=True) as m:
        with pytest.raises(ValueError, match=r"drops_one got a batch of 5 items and returned 4 "
                                             r"values; a batched function returns one value"):
            m.map(range(5))


@pytest.mark.usefixtures("ray_local")
def test_an_async_batched_function():
    async def shifted(xs, shift=0):
        import asyncio

        await asyncio.sleep(0.01)
        return [x + shift for x in xs]

    with rm.mapper(shifted, replicas=2, batched=rm.Batched(max_size=8)) as m:
        assert m.map(range(30), kwargs={"shift": 100}) == [x + 100 for x in range(30)]


@pytest.mark.usefixtures("ray_local")
def test_batched_arguments_are_checked_before_any_replica_starts():
    with pytest.raises(TypeError, match="batched must be True, False or rm.Batched"):
        rm.mapper(abs, batched="yes")
    with pytest.raises(ValueError, match="do not run over compiled graphs"):
        rm.mapper(abs, batched=True, compiled_graphs=True)
    with rm.mapper(abs, replicas=1, batched=rm.Batched(max_size=4)) as m:
        with pytest.raises(ValueError, match="batch_size=5 is more than"):
            m.map([1], batch_size=5)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.timeout(180)
def test_a_hung_item_times_out_alone():
    def hangs_on_five(xs):
        import time

        if 5 in xs:
            time.sleep(5)
        return [x * 10 for x in xs]

    with rm.mapper(hangs_on_five, replicas=2, batched=rm.Batched(max_size=8)) as m:
        m.wait_ready(timeout=120)
        results = m.map(range(16), timeout=0.5, return_exceptions=True)  # 4 s per batch of 8
    assert isinstance(results[5], TimeoutError)
    assert [value for position, value in enumerate(results) if position != 5] == [
        10 * x for x in range(16) if x != 5]


def test_calls_from_100_threads_share_batches(model):
    from tests.test_lanes import in_threads

    calls_and_items(model)  # from zero
    outcomes = in_threads([lambda x=x: model.call(x) for x in range(99)]
                          + [lambda: model.call(BAD)], timeout=120)
    assert outcomes[:99] == list(range(99))
    assert isinstance(outcomes[99], ValueError) and str(outcomes[99]) == f"item {BAD} is bad"
    calls, items = calls_and_items(model)
    assert calls < 100 // 4, f"100 calls from threads took {calls} calls in the replicas"


def maps_from_threads(model, count: int, bad: tuple = ()) -> dict:
    """``count`` threads each map 5 items (a bad third item in the threads of ``bad``; the
    second of those with return_exceptions=True): what each returned or raised."""
    import threading

    outcomes: dict = {}

    def map_five(thread: int) -> None:
        items = [100 * thread + x for x in range(5)]
        if thread in bad:
            items[2] = BAD
        try:
            outcomes[thread] = model.map(items, return_exceptions=bad[-1:] == (thread,))
        except Exception as error:  # the test reads it
            outcomes[thread] = error

    threads = [threading.Thread(target=map_five, args=(thread,)) for thread in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a shared map never returned"
    return outcomes


def test_small_maps_from_many_threads_share_batches(model):
    """20 threads each map 5 items: far fewer calls than 20, each thread gets its own values in
    its own order; a bad item fails its own map only (its value under return_exceptions)."""
    calls_and_items(model)  # from zero
    outcomes = maps_from_threads(model, 20)
    assert outcomes == {thread: [100 * thread + x for x in range(5)] for thread in range(20)}
    calls, items = calls_and_items(model)
    assert items == 100 and calls < 20 // 2, f"20 small maps took {calls} calls in the replicas"
    outcomes = maps_from_threads(model, 10, bad=(3, 4))
    for thread in set(range(10)) - {3, 4}:
        assert outcomes[thread] == [100 * thread + x for x in range(5)]
    assert isinstance(outcomes[3], ValueError) and str(outcomes[3]) == f"item {BAD} is bad"
    assert outcomes[4][:2] == [400, 401] and outcomes[4][3:] == [403, 404]
    assert isinstance(outcomes[4][2], ValueError)


def test_imaps_and_large_maps_from_many_threads_share_batches(model):
    """10 threads: 5 imap 5 items of a generator each, 5 map 70 items each (more than a batch):
    on their own they take 5 + 10 calls; sharing, fewer. Each gets its own values, in order."""
    from tests.test_lanes import in_threads

    calls_and_items(model)  # from zero

    def work(thread: int):
        if thread % 2:
            return model.map([1000 * thread + x for x in range(70)])
        return list(model.imap(1000 * thread + x for x in range(5)))

    outcomes = in_threads([lambda thread=thread: work(thread) for thread in range(10)],
                          timeout=120)
    assert outcomes == [[1000 * thread + x for x in range(70 if thread % 2 else 5)]
                        for thread in range(10)]
    calls, items = calls_and_items(model)
    assert items == 5 * 5 + 5 * 70
    assert calls < 5 + 10, f"the 10 maps took {calls} calls in the replicas"


def test_items_of_a_paused_input_share_a_batch_after_max_wait_and_come_back_while_it_blocks(model):
    """An imap over a stream that gives 5 items, then pauses: the 5 go in one call once they
    waited max_wait_ms (10 ms) for more, not for a full batch of 64, and their results come while
    the stream still blocks."""
    import queue
    import threading

    calls_and_items(model)  # from zero
    inputs, results = queue.Queue(), queue.Queue()

    def paused_stream():
        while (item := inputs.get()) is not None:
            yield item

    def read() -> None:
        for value in model.imap(paused_stream()):
            results.put(value)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for item in range(5):
            inputs.put(item)
        assert [results.get(timeout=60) for _ in range(5)] == list(range(5))
        assert calls_and_items(model) == (1, 5), "the 5 items share one call"
        inputs.put(7)
        assert results.get(timeout=60) == 7
    finally:
        inputs.put(None)
    reader.join(60)
    assert not reader.is_alive()
    assert calls_and_items(model) == (1, 1)


class AsyncScorer:
    """A stateful class whose batched method is ``async def`` (its replicas are async actors)."""

    def __init__(self, offset):
        self.offset = offset

    async def score(self, xs):
        import asyncio

        await asyncio.sleep(0.01)
        return [x + self.offset for x in xs]


@pytest.mark.usefixtures("ray_local")
def test_an_async_batched_method_of_a_class():
    with rm.mapper(rm.module(AsyncScorer, 1000), method="score", replicas=2,
                   batched=rm.Batched(max_size=8)) as m:
        assert m.map(range(20)) == [x + 1000 for x in range(20)]
        assert m.call(5) == 1005
