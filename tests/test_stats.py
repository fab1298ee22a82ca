"""What `Mapper.stats` reports and the slow-call warning, on the in-process fake pool (no Ray):
the counts must be the ones the replicas ran."""

from __future__ import annotations

import logging
import threading

import pytest

from rhmapper import slow_calls
from rhmapper.errors import MapCancelledError
from rhmapper.plan import MapPlan
from rhmapper.retries import Retries
from rhmapper.scheduler import MapRun
from rhmapper.wire import CallSpec
from tests.fakes import FakePool, ReplicaKiller


def run(pool: FakePool, items: list, **plan_options) -> list:
    plan = MapPlan(CallSpec("fn"), collect=True, total=len(items), window=None, **plan_options)
    map_run = MapRun(pool, plan, items)
    for _ in map_run.chunks():
        pass
    return map_run.results


def test_per_replica_counts_add_up_to_what_the_replicas_ran():
    pool = FakePool(3, fn=lambda x: x * 2, capacity=2, item_seconds=0.001)
    assert run(pool, list(range(500))) == [x * 2 for x in range(500)]
    stats = pool.slots.board.snapshot(pool.replicas)
    ran = {replica.name: sum(len(items) for _, items in replica.calls) for replica in pool.replicas}
    assert {replica.name: replica.items for replica in stats.replicas} == ran
    assert {replica.name: replica.calls for replica in stats.replicas} == {
        replica.name: len(replica.calls) for replica in pool.replicas}
    for replica in stats.replicas:
        assert replica.state == "ready" and replica.failed == replica.retried == 0
        assert replica.p50_item_seconds == pytest.approx(0.001, rel=0.05)
        assert replica.p99_item_seconds == pytest.approx(0.001, rel=0.05)
    assert stats.maps == [] and stats.replica_deaths == 0  # the map ended; no replica died
    # Ten seconds after the first replica became ready: each replica's rate and busy share over
    # its own time ready (2 slots each; the fake's calls take 1 ms per item).
    later = min(replica.ready_at for replica in pool.replicas) + 10.0
    for replica, counted in zip(pool.replicas, pool.slots.board.snapshot(pool.replicas, later).replicas):
        ready_for = later - replica.ready_at
        assert counted.items_per_second == pytest.approx(ran[replica.name] / ready_for)
        assert counted.busy_share == pytest.approx(ran[replica.name] * 0.001 / (ready_for * 2))


def test_failures_and_retries_are_counted_on_the_replica_they_happened_on():
    attempts: dict[int, int] = {}

    def flaky(x):
        attempts[x] = attempts.get(x, 0) + 1
        if x % 10 == 0 and attempts[x] == 1:
            raise ValueError(x)  # fails once, then succeeds
        if x == 7:
            raise KeyError(x)  # fails every time
        return x

    pool = FakePool(2, fn=flaky)
    results = run(pool, list(range(50)), retries=Retries(max_retries=2, retry_on=(ValueError,)),
                  return_exceptions=True)
    assert isinstance(results[7], KeyError) and results[10] == 10
    stats = pool.slots.board.snapshot(pool.replicas)
    assert sum(replica.retried for replica in stats.replicas) == 5  # items 0, 10, 20, 30, 40
    assert sum(replica.failed for replica in stats.replicas) == 5 + 1
    assert sum(replica.items for replica in stats.replicas) == 50 + 5


def test_a_running_map_is_in_the_snapshot_with_its_counts_and_deaths_are_counted_once():
    pool = FakePool(2, fn=lambda x: x, capacity=1)
    plan = MapPlan(CallSpec("fn"), ordered=True, total=100, window=None, batch_size=1)
    killed = []

    def fn(x):
        if x == 5 and not killed:
            killed.append(x)
            raise ReplicaKiller("item 5")
        return x

    for replica in pool.replicas:
        replica.fn = fn
    map_run = MapRun(pool, plan, iter(range(100)))
    chunks = map_run.chunks()
    seen = []
    while len(seen) < 20:
        seen.extend(next(chunks))
    [snapshot] = pool.slots.board.snapshot(pool.replicas).maps
    assert snapshot.done >= 20 and snapshot.calls >= 20 and snapshot.waiting < 80
    assert snapshot.p99_call_seconds is not None
    for chunk in chunks:
        seen.extend(chunk)
    assert seen == list(range(100))
    assert sum(pool.slots.board.deaths.values()) == 1 and map_run.stats.replicas_lost == 1
    after = pool.slots.board.snapshot(pool.replicas)
    assert after.maps == [] and after.replica_deaths == 1
    assert "1 replica(s) of the pool died" in str(after)


def run_until_cancelled(pool: FakePool, items: int, seconds: float, note=lambda: None):
    """A map of one item per call whose hung call never answers, cancelled after ``seconds``:
    the run, its results and the slow-call warnings logged (each with ``note()`` then)."""
    plan = MapPlan(CallSpec("fn"), ordered=False, total=items, window=None, batch_size=1)
    cancelled = threading.Event()
    map_run = MapRun(pool, plan, list(range(items)), cancelled=cancelled)
    timer = threading.Timer(seconds, cancelled.set)
    timer.start()
    results = []
    try:
        with pytest.raises(MapCancelledError):
            with _warnings("rhmapper.slow_calls", note) as warned:
                for chunk in map_run.chunks():
                    results.extend(chunk)
    finally:
        timer.cancel()
    return map_run, sorted(results), warned


def test_a_call_running_far_past_the_maps_p99_is_logged_once_and_left_running(monkeypatch):
    monkeypatch.setattr(slow_calls, "SLOW_CALL_SECONDS", 0.3)
    pool = FakePool(2, fn=lambda x: x, hangs=lambda item: item == 3)
    _, results, warned = run_until_cancelled(pool, 10, 1.5, note=lambda: len(pool.cancelled))
    assert results == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert len(warned) == 1, warned
    message, abandoned_then = warned[0]
    assert "item 3 " in message and "fake_replica_" in message and "left running" in message
    assert abandoned_then == 0  # logged, not stopped
    assert [token.items for token in pool.cancelled] == [[3]]  # stopped by the cancel only


def test_no_slow_call_warning_before_the_map_has_a_p99(monkeypatch):
    """Fewer than slow_calls.SLOW_CALL_MIN_ANSWERED calls answered: nothing to compare a call with."""
    monkeypatch.setattr(slow_calls, "SLOW_CALL_SECONDS", 0.3)
    pool = FakePool(2, fn=lambda x: x, hangs=lambda item: item == 0)
    map_run, results, warned = run_until_cancelled(pool, 3, 1.2)
    assert results == [1, 2] and map_run.stats.calls == 2
    assert warned == []


class _warnings:
    """The warnings a logger logs inside the block, each as ``(message, note())``."""

    def __init__(self, logger: str, note=lambda: None) -> None:
        self._logger = logging.getLogger(logger)
        self._handler = logging.Handler(logging.WARNING)
        self.messages: list[tuple[str, object]] = []
        self._handler.emit = lambda record: self.messages.append((record.getMessage(), note()))

    def __enter__(self) -> list[tuple[str, object]]:
        self._logger.addHandler(self._handler)
        return self.messages

    def __exit__(self, *exc_info) -> None:
        self._logger.removeHandler(self._handler)
