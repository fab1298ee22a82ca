"""A mapper over actors behaves like calling them: async targets, ObjectRef arguments, actors Ray
restarts, an actor's own max_concurrency, and call signatures (on a real local Ray)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import warnings

import pytest
import ray

import rhmapper as rm

pytestmark = pytest.mark.usefixtures("ray_local")


async def async_double(x):
    await asyncio.sleep(0.01)
    return 2 * x


_awaiting = 0
"""Items of async_double_awaiting that are awaiting right now, in this replica."""


async def async_double_awaiting(x):
    """2 * x, and how many items of this replica were awaiting at once when it woke."""
    global _awaiting
    _awaiting += 1
    try:
        await asyncio.sleep(0.05)
        return 2 * x, _awaiting
    finally:
        _awaiting -= 1


async def async_fails_on_three(x):
    await asyncio.sleep(0)
    if x == 3:
        raise ValueError("three is bad")
    return x


def double(x):
    return 2 * x


def add(x, y):
    return x + y


def scaled(x, scale):
    return x * scale


class AsyncModel:
    """An async class: records how many of its items run at once."""

    def __init__(self):
        self.active = 0
        self.peak = 0

    async def predict(self, x):
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.2)
        self.active -= 1
        return x + 100

    async def peak_overlap(self):
        return self.peak


@ray.remote
class UserAsyncActor(AsyncModel):
    async def fails_on_three(self, x):
        return await async_fails_on_three(x)

    async def resets_on_three(self, x):
        if x == 3:
            raise ConnectionResetError("your own connection error")
        return x


@ray.remote
class Tracker:
    """A sync actor that records its peak overlap of calls."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.runs = 0

    def work(self, x, seconds=0.3):
        with self.lock:
            self.active += 1
            self.runs += 1
            self.peak = max(self.peak, self.active)
        time.sleep(seconds)
        with self.lock:
            self.active -= 1
        return x * 10

    def stats(self):
        return {"peak": self.peak, "runs": self.runs}


@ray.remote
class Executions:
    """Counts executions per item, from inside replicas."""

    def __init__(self):
        self.counts: dict = {}

    def ran(self, item):
        self.counts[item] = self.counts.get(item, 0) + 1
        return self.counts[item]

    def get(self):
        return self.counts


@ray.remote(max_restarts=2)
class CrashesOnce:
    """Crashes its process the first time it runs ``crash_item`` (Ray restarts it)."""

    def __init__(self, executions, crash_item):
        self.executions = executions
        self.crash_item = crash_item

    def work(self, x):
        runs = ray.get(self.executions.ran.remote(x))
        if x == self.crash_item and runs == 1:
            os._exit(1)
        time.sleep(0.02)
        return x * 3


def test_async_function_results_are_values_and_items_of_a_call_overlap():
    with rm.mapper(async_double, replicas=2, concurrency=2) as m:
        assert m.map(range(50)) == [2 * x for x in range(50)]
    with rm.mapper(async_double_awaiting, replicas=2, concurrency=2) as m:
        doubled = m.map(range(80), batch_size=40)
    assert [value for value, _ in doubled] == [2 * x for x in range(80)]
    assert max(awaiting for _, awaiting in doubled) >= 40, "a call's 40 items awaited together"


def test_async_function_failure_is_the_users_error_with_the_item_named():
    with rm.mapper(async_fails_on_three, replicas=1) as m:
        with pytest.raises(ValueError, match="three is bad") as caught:
            m.map(range(6))
        assert "item 3" in caught.value.__notes__[-1]
        values = m.map(range(6), return_exceptions=True)
    assert values[:3] == [0, 1, 2] and values[4:] == [4, 5]
    assert isinstance(values[3], ValueError)


def test_async_module_method_runs_items_concurrently_on_the_actor_loop():
    with rm.mapper(rm.module(AsyncModel), method="predict", replicas=1, concurrency=2) as m:
        assert m.map(range(20), batch_size=10) == [x + 100 for x in range(20)]
        (peak,) = m.broadcast("peak_overlap")
    assert peak == 20, "two calls of ten items each, all awaiting at once"


def test_users_async_actor_maps_with_values_and_its_own_errors():
    actors = [UserAsyncActor.remote() for _ in range(2)]
    m = rm.mapper(UserAsyncActor, method="predict", replicas=actors, concurrency=8)
    assert m.map(range(24)) == [x + 100 for x in range(24)]
    peaks = [ray.get(actor.peak_overlap.remote()) for actor in actors]
    assert max(peaks) > 1, f"an async actor runs several calls at once, peaks {peaks}"
    values = m.map(range(6), method="fails_on_three", return_exceptions=True)
    assert values[:3] == [0, 1, 2] and values[4:] == [4, 5]
    assert isinstance(values[3], ValueError) and "item 3" in values[3].__notes__[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an actor dropped from the pool would warn
        values = m.map(range(6), method="resets_on_three", return_exceptions=True)
    assert values[:3] == [0, 1, 2] and values[4:] == [4, 5]
    assert isinstance(values[3], ConnectionResetError), "your ConnectionError is not a lost replica"
    assert m.num_replicas == 2
    m.shutdown()
    after = ray.get([actor.peak_overlap.remote() for actor in actors], timeout=30)
    assert after == peaks, "your actors stay alive after shutdown, with their state"


def test_object_ref_items_reach_the_function_as_values():
    refs = [ray.put(x) for x in range(10)]
    with rm.mapper(double, replicas=2) as m:
        assert m.map(refs) == [2 * x for x in range(10)]
        assert list(m.imap(iter(refs))) == [2 * x for x in range(10)]
        assert m.call(refs[4]) == 8
    with rm.mapper(add, replicas=2) as m:
        assert m.starmap([(ref, 1) for ref in refs]) == [x + 1 for x in range(10)]
        assert m.map(refs, refs) == [2 * x for x in range(10)]
    with rm.mapper(async_double, replicas=1) as m:
        assert m.map(refs) == [2 * x for x in range(10)]


def put(x):
    return ray.put(x)


def test_an_object_ref_result_stays_a_reference_as_an_actor_call_returns_it():
    with rm.mapper(put, replicas=1) as m:
        refs = m.map([1, 2], batch_size=1)
        assert all(isinstance(ref, ray.ObjectRef) for ref in refs), refs
        assert ray.get(refs) == [1, 2]


def test_object_ref_made_by_a_task_and_in_kwargs():
    @ray.remote
    def make(x):
        return x * 7

    made = [make.remote(x) for x in range(6)]
    with rm.mapper(scaled, replicas=2) as m:
        assert m.map(made, kwargs={"scale": ray.put(2)}) == [14 * x for x in range(6)]


def test_object_ref_inputs_reach_users_actors_sync_and_async():
    refs = [ray.put(x) for x in range(6)]
    tracker = Tracker.remote()
    m = rm.mapper(Tracker, method="work", replicas=[tracker])
    assert m.map(refs, kwargs={"seconds": 0}) == [10 * x for x in range(6)]
    async_actor = UserAsyncActor.remote()
    m = rm.mapper(UserAsyncActor, method="predict", replicas=[async_actor])
    assert m.map(refs) == [x + 100 for x in range(6)]


def test_a_failed_object_ref_fails_only_its_item():
    @ray.remote
    def broken():
        raise KeyError("upstream failed")

    items = [ray.put(1), broken.remote(), ray.put(3)]
    with rm.mapper(double, replicas=1) as m:
        values = m.map(items, return_exceptions=True)
        assert values[0] == 2 and values[2] == 6
        assert isinstance(values[1], KeyError) and "item 1" in values[1].__notes__[-1]
        with pytest.raises(KeyError):
            m.map(items)


def test_restarted_user_actor_stays_in_the_pool_and_nothing_is_lost():
    executions = Executions.remote()
    actor = CrashesOnce.options(max_concurrency=2).remote(executions, crash_item=5)
    m = rm.mapper(CrashesOnce, method="work", replicas=[actor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert m.map(range(20), batch_size=1) == [3 * x for x in range(20)]
    assert not [w for w in caught if "died" in str(w.message)], [str(w.message) for w in caught]
    assert m.replicas == [actor] and m.num_replicas == 1
    counts = ray.get(executions.get.remote())
    assert sorted(counts) == list(range(20))
    assert counts[5] == 2, "the crashing item ran again after the restart"
    # The crash can take with it the one other call in flight (max_concurrency=2).
    assert sum(counts.values()) <= 20 + 2
    assert m.map([1, 2]) == [3, 6], "the restarted actor keeps serving"


def test_permanently_dead_user_actor_is_dropped_with_a_warning():
    trackers = [Tracker.remote() for _ in range(2)]
    m = rm.mapper(Tracker, method="work", replicas=trackers)
    ray.kill(trackers[0], no_restart=True)
    with pytest.warns(RuntimeWarning, match="died and was dropped"):
        assert m.map(range(8), kwargs={"seconds": 0.01}) == [10 * x for x in range(8)]
    assert m.replicas == [trackers[1]]


def test_users_actor_never_gets_more_calls_than_its_max_concurrency():
    single = Tracker.remote()  # max_concurrency=1
    with pytest.warns(RuntimeWarning, match="runs at most 1 call"):
        m = rm.mapper(Tracker, method="work", replicas=[single], concurrency=4)
        # Queued calls would count their wait against timeout=1.0 and fail (6 x 0.4 s).
        assert m.map(range(6), kwargs={"seconds": 0.4}, timeout=1.0) == [10 * x for x in range(6)]


def test_users_actor_concurrency_defaults_to_its_own_and_can_be_set_per_actor():
    three = Tracker.options(max_concurrency=3).remote()
    m = rm.mapper(Tracker, method="work", replicas=[three])
    assert m.map(range(9), batch_size=1) == [10 * x for x in range(9)]
    assert ray.get(three.stats.remote())["peak"] == 3

    four = Tracker.options(max_concurrency=4).remote()
    m = rm.mapper(Tracker, method="work", replicas=[])
    m.add_replicas([four], concurrency=2)
    assert m.map(range(8), batch_size=1) == [10 * x for x in range(8)]
    assert ray.get(four.stats.remote())["peak"] == 2


def test_add_replicas_concurrency_applies_to_actors_only():
    with rm.mapper(double, replicas=0) as m:
        with pytest.raises(ValueError, match="applies to your own actors"):
            m.add_replicas(1, concurrency=2)


def takes_self_and_method(self, method="none"):
    return (self, method)


class Named:
    def setup(self, method):
        self.method = method
        return method

    def get(self, x):
        return (x, self.method)


def test_call_and_broadcast_pass_self_and_method_keywords_through():
    with rm.mapper(takes_self_and_method, replicas=1) as m:
        assert m.call(self=1, method="m") == (1, "m")
    with rm.mapper(Named, method="get", replicas=2) as m:
        assert m.broadcast("setup", method="chosen") == ["chosen", "chosen"]
        assert m.map([1]) == [(1, "chosen")]


@pytest.mark.parametrize("window, error", [
    (0, ValueError), (-3, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError),
    ("8", TypeError), ("foo", TypeError)])
def test_window_must_be_a_whole_number(window, error):
    with rm.mapper(double, replicas=1) as m:
        with pytest.raises(error, match="window must be a whole number >= 1"):
            m.imap(range(3), window=window)
        assert list(m.imap(range(3), window=2)) == [0, 2, 4]


def test_counts_of_a_live_mapper_follow_one_rule():
    """add_replicas, drop_replicas and spawn_map check their counts as rm.mapper does (see
    tests/test_options.py): the wrong type is a TypeError, out of range a ValueError."""
    with rm.mapper(double, replicas=1) as m:
        cases = [
            (m.add_replicas, "replicas", 0),
            (lambda value: m.add_replicas([], concurrency=value), "concurrency", 1),
            (m.drop_replicas, "count", 0),
            (lambda value: m.spawn_map([1], name="never", max_result_bytes=value),
             "max_result_bytes", 1),
        ]
        for call, option, minimum in cases:
            for wrong in ("1", 1.0, True, None):
                if option == "concurrency" and wrong is None:
                    continue  # the default
                with pytest.raises(TypeError, match=rf"^{option} must be a whole number >= "
                                                    rf"{minimum}.*, got {re.escape(repr(wrong))} "
                                                    rf"\({type(wrong).__name__}\)$"):
                    call(wrong)
            with pytest.raises(ValueError, match=rf"^{option} must be a whole number >= "
                                                 rf"{minimum}.*, got {minimum - 1}$"):
                call(minimum - 1)
        for wrong, error in (("1h", TypeError), (True, TypeError), (0, ValueError)):
            with pytest.raises(error, match="keep_seconds must be a number of seconds > 0"):
                m.spawn_map([1], name="never", keep_seconds=wrong)
        assert m.num_replicas == 1 and m.map([1, 2]) == [2, 4]


def test_concurrency_is_the_one_in_effect():
    with rm.mapper(abs, replicas=1) as m:
        assert m.concurrency == 1
        assert "concurrency=1)" in repr(m)
    with rm.mapper(abs, replicas=0, concurrency=3) as m:
        assert m.concurrency == 3
