"""The async driver without Ray (issue 24): maps stepped by `rhmapper.async_driver.AsyncDriver`
on a fake pool whose calls answer by themselves from a thread, as Ray's do
(`tests.fakes.AnsweringPool`). Many maps share its one thread; none depends on the scheduler's
tick to make progress (the tick is set to a minute, so a missed wake-up would show as a stall);
the steps per answered call stay flat as the number of maps waiting for slots grows; a closed
map cancels its calls and never sends the rest.
"""

from __future__ import annotations

import threading
import time

import pytest

from rhmapper import scheduler
from rhmapper.async_driver import AsyncDriver, Stepper
from rhmapper.plan import MapPlan
from rhmapper.scheduler import MapRun
from rhmapper.wire import CallSpec
from tests.fakes import AnsweringPool

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def no_tick(monkeypatch):
    """Maps pause a minute unless woken: progress must come from wake-ups alone."""
    monkeypatch.setattr(scheduler, "WAIT_TICK_SECONDS", 60.0)


class Maps:
    """``count`` maps of ``items`` items each over ``pool``, stepped by ``driver``; their
    results, errors and steps (every chunk a map's generator yields, pauses included)."""

    def __init__(self, pool: AnsweringPool, count: int, items: int, driver: AsyncDriver,
                 batch_size: int | str = 1) -> None:
        self.results: dict[int, list] = {}
        self.errors: dict[int, BaseException] = {}
        self.steps = 0
        self._lock = threading.Lock()
        self.steppers = []
        for number in range(count):
            plan = MapPlan(CallSpec("fn"), collect=True, total=items, window=None,
                           batch_size=batch_size)
            inputs = list(range(number * items, (number + 1) * items))
            stepper = Stepper(
                lambda pacer, plan=plan, inputs=inputs: self._counted(
                    MapRun(pool, plan, inputs, pacer=pacer)),
                lambda chunk, paused, number=number: self._got(number, chunk, paused),
                lambda error, number=number: self._ended(number, error))
            self.steppers.append(stepper)
        for stepper in self.steppers:
            driver.start(stepper)

    def _counted(self, run: MapRun):
        for chunk in run.chunks():
            with self._lock:
                self.steps += 1
            yield chunk
        yield run.results

    def _got(self, number: int, chunk: list, paused: bool) -> None:
        if not paused:
            self.results[number] = chunk

    def _ended(self, number: int, error: BaseException | None) -> None:
        if error is not None:
            self.errors[number] = error

    def wait(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        return all(stepper.ended.wait(max(0.0, deadline - time.monotonic()))
                   for stepper in self.steppers)


def test_many_maps_share_the_drivers_one_thread_and_get_their_own_results(no_tick):
    pool = AnsweringPool(4, fn=lambda x: x * 3, capacity=2, call_seconds=0.001)
    driver = AsyncDriver()
    before = set(threading.enumerate())
    try:
        maps = Maps(pool, count=200, items=10, driver=driver, batch_size="auto")
        assert maps.wait(60), "maps still running after 60 s: a wake-up was missed"
        started = set(threading.enumerate()) - before
    finally:
        pool.close()
    assert not maps.errors
    assert maps.results == {n: [3 * x for x in range(10 * n, 10 * n + 10)] for n in range(200)}
    assert [thread.name for thread in started] == ["rhmapper-async"]


def steps_per_call(maps_count: int) -> float:
    pool = AnsweringPool(2, fn=lambda x: x, capacity=1, call_seconds=0.0005)
    try:
        maps = Maps(pool, count=maps_count, items=5, driver=AsyncDriver())
        assert maps.wait(60), "maps still running after 60 s: a wake-up was missed"
    finally:
        pool.close()
    assert not maps.errors and len(maps.results) == maps_count
    return maps.steps / len(pool.log)


def test_the_steps_per_answered_call_do_not_grow_with_the_maps_waiting_for_slots(no_tick):
    """Two slots, and 10 or 400 maps of one-item calls waiting for them: each answered call
    wakes its own map and one starved map, not every waiting map."""
    few, many = steps_per_call(10), steps_per_call(400)
    assert many <= 1.5 * few + 1.0 and many < 5, (few, many)


def test_a_closed_map_cancels_its_calls_and_sends_no_more(no_tick):
    pool = AnsweringPool(2, fn=lambda x: x, capacity=1, call_seconds=0.0005,
                         hangs=lambda item: item == 0)
    try:
        maps = Maps(pool, count=1, items=50, driver=AsyncDriver())
        deadline = time.monotonic() + 30
        while len(pool.log) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        maps.steppers[0].close()
        assert maps.wait(30)
        sent = len(pool.log)
        time.sleep(0.2)
        assert len(pool.log) == sent < 50  # nothing was sent once it closed
        cancelled = [call.items for call in pool.cancelled]
        assert [0] in cancelled and len(cancelled) <= 4  # the hung call and those in flight
    finally:
        pool.close()
