"""Verbs and options that each work alone, combined as users combine them: maps in several
threads, a map inside an ``imap`` loop, blocking input iterators, maps that end early while a call
hangs, timeouts on async replicas, a refused pool, your actors busy with other calls. Each ends,
on every backend where it applies, and each runs in a thread joined with a bound, so that a
regression fails instead of hanging the suite."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time

import pytest
import ray

import rhmapper as rm
from rhmapper.module import function_replica_class
from rhmapper.signals import open_end_signal
from rhmapper.wire import BatchReply, CallRequest, Guard
from tests.ray_head import wait_until

pytestmark = pytest.mark.usefixtures("ray_local")

BOUND_SECONDS = 60.0


def bounded(work, seconds: float = BOUND_SECONDS):
    """Run ``work()`` in a thread; its result, or a test failure if it is not done in time."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the test, raised there
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds:.0f}s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def logged_nap(x, log):
    """Sleeps ``x`` seconds (raises for a negative ``x``); logs each start and returns its pid."""
    with open(log, "a") as file:
        file.write(f"{x}\n")
    if x < 0:
        raise ValueError(f"negative {x}")
    time.sleep(x)
    return os.getpid()


def started(log) -> list[float]:
    with open(log) as file:
        return [float(line) for line in file]


def plus_one(x):
    return x + 1


@pytest.fixture(params=["local", "on_cluster"])
def backend(request):
    return request.param


# -- 1. a hung call left by an ended map ------------------------------------------------------

@pytest.mark.parametrize("ending", ["cancel", "exception", "closed imap"])
def test_a_hung_call_of_an_ended_map_is_reclaimed_at_its_deadline(tmp_path, ending):
    log = str(tmp_path / "log")
    with rm.mapper(logged_nap, replicas=2, env=rm.Env(compute={"CPU": 0.25})) as m:
        m.wait_ready(timeout=60)
        if ending == "cancel":
            threading.Timer(1.0, m.cancel).start()
            with pytest.raises(rm.MapCancelledError):
                bounded(lambda: m.map([3600], kwargs={"log": log}, timeout=3))
        elif ending == "exception":
            with pytest.raises(ValueError):
                bounded(lambda: m.map([3600, -1], kwargs={"log": log}, timeout=3, batch_size=1))
        else:
            def close_early() -> None:
                results = m.imap_unordered([3600, 0.01], kwargs={"log": log}, timeout=3,
                                           batch_size=1)
                next(results)
                results.close()
            bounded(close_early)
        # The hung call keeps its replica until its map's deadline (3 s) plus the grace; then its
        # replica is restarted, and both replicas take calls again.
        pids = bounded(lambda: wait_until(lambda: len(set(m.map(
            [0.3, 0.3], kwargs={"log": log}, timeout=5, batch_size=1))) == 2, seconds=40))
        assert pids, "the replica with the hung call never came back into rotation"
        assert started(log).count(3600) == 1
        assert bounded(lambda: m.map([0.01, 0.02], kwargs={"log": log}, timeout=2)) != []


def test_one_replica_whose_call_hangs_after_cancel_serves_the_next_map(tmp_path):
    """The issue's own case: one replica, the next map waits for the restart, then ends."""
    log = str(tmp_path / "log")
    with rm.mapper(logged_nap, replicas=1, env=rm.Env(compute={"CPU": 0.25})) as m:
        m.wait_ready(timeout=60)
        threading.Timer(1.0, m.cancel).start()
        with pytest.raises(rm.MapCancelledError):
            bounded(lambda: m.map([3600], kwargs={"log": log}, timeout=3))
        pids = bounded(lambda: m.map([0.1, 0.2], kwargs={"log": log}, timeout=2))
        assert len(pids) == 2
        assert sorted(started(log)) == [0.1, 0.2, 3600.0]


# -- 2. inputs are never pulled under the pool's lock ------------------------------------------

def blocking_input(inputs: queue.Queue):
    while True:
        item = inputs.get()
        if item is None:
            return
        yield item


def test_a_blocking_input_in_one_thread_does_not_freeze_another_threads_map(backend):
    inputs: queue.Queue = queue.Queue()
    with rm.mapper(plus_one, replicas=2, env=rm.Env(compute={"CPU": 0.25}),
                   on_cluster=backend == "on_cluster") as m:
        blocked: list = []
        reader = threading.Thread(
            target=lambda: blocked.extend(m.imap(blocking_input(inputs), batch_size=1)),
            daemon=True)
        inputs.put(1)
        reader.start()
        # the first result comes while the input blocks (its feed's thread waits in it)
        assert wait_until(lambda: blocked == [2], seconds=60), blocked
        assert bounded(lambda: m.map(range(50), timeout=5), seconds=30) == list(range(1, 51))
        assert bounded(lambda: m.call(41), seconds=30) == 42
        inputs.put(2)
        inputs.put(None)
        reader.join(30)
        assert not reader.is_alive() and blocked == [2, 3]


def test_maps_started_while_an_imap_waits_for_its_consumer_end(backend):
    with rm.mapper(plus_one, replicas=2, env=rm.Env(compute={"CPU": 0.25}),
                   on_cluster=backend == "on_cluster") as m:
        def interleaved() -> tuple:
            lazy = m.imap(range(100), window=8)
            first = next(lazy)
            whole = m.map(range(10))
            rest = list(lazy)
            return first, whole, rest

        first, whole, rest = bounded(interleaved)
        assert first == 1 and whole == list(range(1, 11)) and rest == list(range(2, 101))
        pairs = bounded(lambda: list(zip(m.imap(range(30), window=4),
                                         m.imap(range(100, 130), window=4))))
        assert pairs == [(x + 1, x + 101) for x in range(30)]


# -- 3. a map inside an imap loop --------------------------------------------------------------

def test_a_map_and_a_call_inside_an_imap_loop_end(backend):
    with rm.mapper(plus_one, replicas=1, env=rm.Env(compute={"CPU": 0.25}),
                   on_cluster=backend == "on_cluster") as m:
        def nested() -> list:
            seen = []
            for result in m.imap(range(6), batch_size=1):
                seen.append((result, m.map([result], timeout=5)[0], m.call(result)))
            return seen

        assert bounded(nested) == [(x + 1, x + 2, x + 2) for x in range(6)]


# -- 4. async replicas and timeout= ------------------------------------------------------------

async def async_nap(x):
    await asyncio.sleep(x)
    return x


def test_an_async_replica_goes_on_after_a_cancelled_call_asked_the_board():
    """A call of an async replica that waited in its queue asks the map's end board; when an
    earlier call that asked was cancelled (with the question it asked), the next one asks again
    instead of calling ``is_canceled()``, which async actors do not support."""
    actor = ray.remote(function_replica_class(async_nap)).options(max_concurrency=1).remote(
        ray.put(async_nap))
    def payload(on: tuple, x: float) -> list:  # sent a second ago: it counts as a queued call
        return CallRequest("fn", [x], guard=Guard(on[0], on[1], None, time.time() - 1.0)).to_wire()

    try:
        for cancel_after in (0.0, 0.1, 0.2, 0.3, 0.5):  # while the first asks, or once it runs
            signal, end = open_end_signal()
            first = actor._rhmapper_run_async.remote(payload(signal, 2))
            second = actor._rhmapper_run_async.remote(payload(signal, 0.01))  # queued behind it
            time.sleep(cancel_after)
            ray.cancel(first)
            reply = BatchReply.from_wire(ray.get(second, timeout=30)).unpacked()
            end()
            assert reply.failures is None and reply.values == [0.01], cancel_after
    finally:
        ray.kill(actor)


def test_timeouts_on_an_async_replica_fail_only_their_items():
    with rm.mapper(async_nap, replicas=1, env=rm.Env(compute={"CPU": 0.25})) as m:
        results = bounded(lambda: m.map([5, 0.01, 5, 0.02], timeout=1, batch_size=1,
                                        return_exceptions=True))
        assert isinstance(results[0], TimeoutError) and isinstance(results[2], TimeoutError)
        assert results[1] == 0.01 and results[3] == 0.02


# -- 7. after PoolMismatchError ----------------------------------------------------------------

def test_after_a_pool_mismatch_every_later_map_raises_at_once():
    env = rm.Env(name="combo_mismatch", detached=True, compute={"CPU": 0.25})
    first = rm.mapper(plus_one, replicas=1, env=env)
    try:
        assert first.map([1]) == [2]
        second = rm.mapper(logged_nap, replicas=1, env=env)
        with pytest.raises(rm.PoolMismatchError):
            bounded(lambda: second.map([1]))
        for _ in range(2):
            with pytest.raises(rm.PoolMismatchError, match="combo_mismatch"):
                bounded(lambda: second.map([1, 2], timeout=2), seconds=20)
        second.shutdown(kill=False)
        assert first.map([5]) == [6], "the other mapper's replica was left alone"
    finally:
        first.shutdown(kill=True)


# -- 12. your actors busy with someone else's calls ---------------------------------------------

@ray.remote(max_concurrency=1)
class Sleeper:
    def __init__(self) -> None:
        self.naps = 0

    def nap(self, seconds):
        self.naps += 1
        time.sleep(seconds)
        return seconds

    def count(self):
        return self.naps


def test_items_that_never_start_before_their_deadline_come_back_as_timeouts():
    sleeper = Sleeper.remote()
    m = rm.mapper(Sleeper, method="nap", replicas=[sleeper]).wait_ready(timeout=60)
    busy = sleeper.nap.remote(8)  # someone else's call: the actor runs one call at a time
    try:
        began = time.monotonic()
        results = bounded(lambda: m.map([0.1, 0.2, 0.3], timeout=1, return_exceptions=True,
                                        batch_size=1))
        assert time.monotonic() - began < 8, "the map waited for the actor instead of its timeout"
        assert all(isinstance(result, TimeoutError) for result in results), results
        assert ray.get(busy, timeout=30) == 8
        assert ray.get(sleeper.count.remote(), timeout=30) == 1, "an item of the map ran"
    finally:
        m.shutdown()
        ray.kill(sleeper)
