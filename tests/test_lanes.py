"""Shared runs (`rhmapper.lanes`): the maps, imaps and calls of several threads share one map,
on the real dispatch loop over the in-process fake pool. Ray-free."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from rhmapper.lanes import SharedRuns
from rhmapper.plan import MapPlan
from rhmapper.scheduler import MapRun
from rhmapper.wire import CallSpec
from tests.fakes import FakePool

pytestmark = pytest.mark.timeout(60)


def shared_runs(pool: FakePool, max_size: int = 64, max_wait: float = 0.05,
                starts: list | None = None) -> SharedRuns:
    """Shared runs whose maps run on ``pool`` (each start's options appended to ``starts``)."""
    def start(options, kwargs, source):
        if starts is not None:
            starts.append(options)
        plan = MapPlan(CallSpec("fn"), ordered=False, indexed=True, return_exceptions=True,
                       window=None, batch_size=max_size, max_wait_seconds=max_wait)
        return MapRun(pool, plan, source).chunks()

    return SharedRuns(start, max_call_bytes=2**20, max_wait_seconds=max_wait, chunk=max_size)


def in_threads(work: list, timeout: float = 30) -> list:
    """Run each of ``work`` (callables) in a thread of its own: what each returned or raised."""
    outcomes: list = [None] * len(work)

    def run(position):
        try:
            outcomes[position] = work[position]()
        except Exception as error:
            outcomes[position] = error

    threads = [threading.Thread(target=run, args=(position,)) for position in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a lane never ended"
    return outcomes


def lane_of(item) -> int:
    return item // 1000


def test_imaps_of_many_threads_share_calls_and_each_gets_its_own_values_in_order():
    pool = FakePool(2, fn=lambda x: -x)
    runs = shared_runs(pool)
    work = [lambda lane=lane: list(runs.lane("opts", None, (1000 * lane + i for i in range(5))
                                             ).values())
            for lane in range(8)]
    outcomes = in_threads(work)
    assert outcomes == [[-(1000 * lane + i) for i in range(5)] for lane in range(8)]
    sent = [items for _, _, items in pool.log]
    assert sorted(itertools.chain(*sent)) == sorted(1000 * lane + i for lane in range(8)
                                                    for i in range(5))  # each item ran once
    assert len(sent) < 8  # fewer calls than callers: one call per caller would be 8
    assert any(len({lane_of(item) for item in items}) > 1 for items in sent)


def test_an_unordered_lane_gets_its_values_and_a_map_collects_in_order():
    pool = FakePool(2, fn=lambda x: x * 10)
    runs = shared_runs(pool)
    unordered, ordered = in_threads([
        lambda: sorted(runs.lane("opts", None, iter(range(50)), ordered=False).values()),
        lambda: runs.lane("opts", None, list(range(100, 150))).collect(),
    ])
    assert unordered == [x * 10 for x in range(50)]
    assert ordered == [x * 10 for x in range(100, 150)]


def test_a_blocking_input_holds_up_no_other_lane():
    pool = FakePool(2, fn=lambda x: x + 1)
    runs = shared_runs(pool)
    release = threading.Event()

    def paused():
        yield 1
        release.wait(30)
        yield 2

    blocked = runs.lane("opts", None, paused()).values()
    assert next(blocked) == 2  # the item it gave comes back while its input blocks
    assert runs.lane("opts", None, [10, 20]).collect() == [11, 21]
    release.set()
    assert list(blocked) == [3]


def test_a_failure_fails_its_own_lane_only_and_names_its_own_index():
    def fn(x):
        if x == 1003:
            raise ValueError("1003 is bad")
        return x

    pool = FakePool(2, fn=fn)
    runs = shared_runs(pool)
    failing, returning, clean = in_threads([
        lambda: runs.lane("opts", None, [1000, 1001, 1002, 1003]).collect(),
        lambda: runs.lane("opts", None, [1003, 2001], return_exceptions=True).collect(),
        lambda: runs.lane("opts", None, [3000, 3001]).collect(),
    ])
    assert isinstance(failing, ValueError) and str(failing) == "1003 is bad"
    assert isinstance(returning[0], ValueError) and returning[1] == 2001
    assert clean == [3000, 3001]
    notes = [note for error in (failing, returning[0]) for note in getattr(error, "__notes__", [])
             if "of a run shared" in note]
    assert any("item 3 of this map" in note for note in notes) or any(
        "item 0 of this map" in note for note in notes)


def test_the_input_exception_comes_after_the_results_of_the_items_it_gave():
    def broken():
        yield 1
        yield 2
        raise KeyError("the input broke")

    runs = shared_runs(FakePool(2))
    values = runs.lane("opts", None, broken()).values()
    assert [next(values), next(values)] == [1, 2]
    with pytest.raises(KeyError, match="the input broke"):
        next(values)


def test_only_equal_options_and_kwargs_share_a_run():
    starts: list = []
    pool = FakePool(2)
    runs = shared_runs(pool, starts=starts)
    outcomes = in_threads([
        lambda: runs.lane("a", {"scale": 2}, [1, 2]).collect(),
        lambda: runs.lane("a", {"scale": 2}, [3, 4]).collect(),
        lambda: runs.lane("a", {"scale": 3}, [5]).collect(),
        lambda: runs.lane("b", {"scale": 2}, [6]).collect(),
    ])
    assert outcomes == [[1, 2], [3, 4], [5], [6]]
    assert sorted(starts) == ["a", "a", "b"]  # the two lanes of equal options shared a run


def test_a_run_that_fails_as_a_whole_fails_each_lane_and_the_next_lane_starts_afresh():
    attempts = itertools.count()

    def start(options, kwargs, source):
        def chunks(first: bool):
            if first:
                next(source)
                raise RuntimeError("the map was cancelled")
            yield list(enumerate(source))

        return chunks(next(attempts) == 0)

    runs = SharedRuns(start, max_call_bytes=2**20, max_wait_seconds=0.01, chunk=8)
    with pytest.raises(RuntimeError, match="the map was cancelled"):
        runs.lane("opts", None, iter(itertools.count())).collect()
    assert runs.lane("opts", None, ["fresh"]).collect() == ["fresh"]


def test_a_lane_left_early_feeds_no_more_and_its_run_ends_after_max_wait():
    pool = FakePool(2)
    runs = shared_runs(pool, max_size=4, max_wait=0.02)
    pulled = itertools.count()
    endless = (next(pulled) for _ in itertools.count())
    values = runs.lane("opts", None, endless, window=8).values()
    assert [next(values) for _ in range(3)] == [0, 1, 2]
    values.close()
    after = next(pulled)
    time.sleep(0.3)
    assert next(pulled) == after + 1  # nothing more was pulled once the lane was left
    assert after <= 3 + 8 + 4  # what was yielded, its window and a chunk at most
    deadline = time.monotonic() + 10
    while any(thread.name == "rhmapper-shared-run" for thread in threading.enumerate()):
        assert time.monotonic() < deadline, "the shared run outlived its lanes"
        time.sleep(0.02)
