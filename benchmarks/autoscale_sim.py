"""Simulated autoscaling (issue 21, part 6): the real policy on a virtual clock, 10 to 1,000
replicas, against a hand-tuned fixed pool on the same bursty workload. No Ray.

The pool is the real `rhmapper.pool_state.PoolState` with ``scaling =
ScalingPolicy(Autoscale(...))``: its records, slots, call book, measured start time and every
scaling decision (`PoolState.scale`, asked every 0.5 virtual s, as the Ray pool's scaler does).
Only time is simulated: the modules that read ``time.monotonic()`` read the virtual clock, a
created replica is probed ready ``--start-seconds`` later, an item takes ``--item-seconds`` on a
slot, and what a map would report (items not yet started, seconds per item: unmeasured until
the first item of the first burst ends, then known, as maps after the first get it as a hint) is
reported to ``state.slots.backlog`` before each tick.

The workload: ``--bursts`` bursts, each ``--burst-starts`` x max x start-seconds replica-seconds
of items, the next arriving ``--gap-seconds`` after the last one ended. The fixed pool is the
same simulation at ``Autoscale(min=K, max=K)`` (a fixed pool), with K the smallest size whose
makespan is within 3% of max replicas' (found by bisection). Replica-seconds (replicas starting
or ready, integrated) count from the first burst to the end of the last, plus, for the
autoscaled pool, its way back to ``min`` after the last; makespan is the sum of the bursts'
times (the first one includes starting the pool, for both).

    python benchmarks/autoscale_sim.py                      # max 10, 100, 1000; bursts of 3 and 20
    python benchmarks/autoscale_sim.py --max 100 --burst-starts 5 --idle-seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import math
import types
from dataclasses import dataclass, field
from typing import Iterator
from unittest import mock

from rhmapper import pool_calls, pool_records, pool_state
from rhmapper.autoscaling import Autoscale, ScalingPolicy
from rhmapper.pool_events import Create, Probed, ProbeOutcome
from rhmapper.pool_records import CallRecord, ReplicaRecord
from rhmapper.pool_state import PoolState

TICK_SECONDS = 0.5
"""`rhmapper.replicas.SCALE_TICK_SECONDS` (not imported: that module imports Ray)."""
FIXED_SLACK = 0.03
"""The hand-tuned fixed pool: the smallest whose makespan is within this of the best's."""


@dataclass(frozen=True)
class Workload:
    """Bursts of equal items on replicas that take ``start_seconds`` to start."""

    bursts: int
    items: int
    """Items per burst."""
    item_seconds: float
    gap_seconds: float
    """From the end of a burst to the arrival of the next."""
    start_seconds: float
    concurrency: int


@dataclass
class Outcome:
    """What one simulated run used and took."""

    replica_seconds: float = 0.0
    makespan: float = 0.0
    to_min: list[float | None] = field(default_factory=list)
    """Per burst: from its end until the pool was at ``min`` (``None``: not before the next)."""
    peak: int = 0


@contextlib.contextmanager
def virtual_clock(clock: list[float]) -> Iterator[None]:
    """The pool state's modules read ``clock[0]`` as ``time.monotonic()``."""
    fake = types.SimpleNamespace(monotonic=lambda: clock[0])
    with contextlib.ExitStack() as stack:
        for module in (pool_state, pool_calls, pool_records):
            stack.enter_context(mock.patch.object(module, "time", fake))
        yield


class Simulation:
    """One pool under ``autoscale`` running ``workload``, event by event (see the module
    docstring).

    Examples:
        >>> work = Workload(bursts=2, items=40, item_seconds=1.0, gap_seconds=20.0,
        ...                 start_seconds=5.0, concurrency=1)
        >>> auto = Simulation(Autoscale(min=0, max=4, idle_seconds=5), work).run()
        >>> auto.peak, auto.makespan, auto.to_min  # 5 s start + 10 s, + 0.5 s to the first tick
        (4, 30.5, [5.0, 5.0])
        >>> Simulation(Autoscale(min=4, max=4), work).run().makespan    # 5 s start once
        25.0
    """

    def __init__(self, autoscale: Autoscale, workload: Workload) -> None:
        self.autoscale, self.work = autoscale, workload
        self.clock = [0.0]
        self.state = PoolState("sim", fingerprint={})
        self.state.scaling = ScalingPolicy(autoscale)
        self.events: list[tuple[float, int, str, object]] = []
        self._sequence = itertools.count()
        self.outcome = Outcome()
        self.waiting = 0
        """Items of the current burst not started."""
        self.running = 0
        self.item_seconds: float | None = None
        """What the maps report: unmeasured until the first item ends."""
        self.burst_started = 0.0
        self.burst_ended: float | None = None
        """When the last burst ended, until the pool is back at min."""

    def run(self) -> Outcome:
        """Simulate until the last burst ended and the pool is back at ``min``."""
        with virtual_clock(self.clock):
            self._push(0.0, "tick")
            self._push(0.0, "burst")
            last = 0.0
            while True:
                at, _, kind, subject = heapq.heappop(self.events)
                self.outcome.replica_seconds += len(self.state.replicas) * (at - last)
                self.clock[0] = last = at
                if kind == "tick":
                    if self._tick():
                        return self.outcome
                elif kind == "burst":
                    self.waiting, self.burst_started, self.burst_ended = self.work.items, at, None
                    self.outcome.to_min.append(None)
                elif kind == "ready":
                    if self.state.handle(Probed(subject, ProbeOutcome.READY, fingerprint={})):
                        raise AssertionError("a ready replica's probe asked for actions")
                elif kind == "done":
                    self._done(subject)
                self._dispatch()

    def _push(self, at: float, kind: str, subject: object = None) -> None:
        heapq.heappush(self.events, (at, next(self._sequence), kind, subject))

    def _tick(self) -> bool:
        """Report the backlog, scale; whether the simulation is over."""
        now, state = self.clock[0], self.state
        state.slots.backlog.report("burst", self.waiting, self.item_seconds)
        actions = state.scale(now, now, self.work.concurrency)
        for action in actions:
            if isinstance(action, Create):
                replica = state.join(ReplicaRecord(f"sim_{action.index}", owned=True,
                                                   requested=self.work.concurrency,
                                                   index=action.index))
                self._push(now + self.work.start_seconds, "ready", replica)
        self.outcome.peak = max(self.outcome.peak, len(state.replicas))
        if self.burst_ended is not None and len(state.replicas) <= self.autoscale.min:
            self.outcome.to_min[-1] = now - self.burst_ended
            self.burst_ended = None
            if len(self.outcome.to_min) == self.work.bursts:
                return True
        self._push(now + TICK_SECONDS, "tick")
        return False

    def _dispatch(self) -> None:
        slots, now = self.state.slots, self.clock[0]
        while self.waiting:
            replica = slots.least_loaded()
            if replica is None:
                return
            token = object()
            self.state.calls.submitted(token, CallRecord(None, replica, now), asks_at_once=False)
            self._push(now + self.work.item_seconds, "done", token)
            self.waiting -= 1
            self.running += 1

    def _done(self, token: object) -> None:
        now = self.clock[0]
        self.state.calls.fetched(token, now)
        self.running -= 1
        self.item_seconds = self.work.item_seconds
        if self.waiting or self.running:
            return
        self.outcome.makespan += now - self.burst_started
        self.burst_ended = now
        if len(self.outcome.to_min) < self.work.bursts:
            self._push(now + self.work.gap_seconds, "burst")


def fixed_pool(workload: Workload, largest: int) -> tuple[int, Outcome]:
    """The hand-tuned fixed pool: the smallest size up to ``largest`` whose makespan is within
    `FIXED_SLACK` of ``largest`` replicas' (makespan does not grow with the size: bisection)."""
    def run(size: int) -> Outcome:
        return Simulation(Autoscale(min=size, max=size), workload).run()

    best = run(largest)
    low, high, found = 1, largest, best
    while low < high:
        middle = (low + high) // 2
        outcome = run(middle)
        if outcome.makespan <= (1 + FIXED_SLACK) * best.makespan:
            high, found = middle, outcome
        else:
            low = middle + 1
    return high, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", default="10,100,1000", help="Autoscale(max=...), each")
    parser.add_argument("--burst-starts", default="3,20",
                        help="work per burst, in max x start-seconds replica-seconds, each")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--item-seconds", type=float, default=1.0)
    parser.add_argument("--start-seconds", type=float, default=5.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--gap-seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    print(f"virtual s: item {args.item_seconds}, replica start {args.start_seconds}, "
          f"idle_seconds {args.idle_seconds}, gap {args.gap_seconds}; {args.bursts} bursts; "
          f"concurrency {args.concurrency}; Autoscale(min=0, max=...)\n")
    print("| max | burst (items) | fixed K | replica-s auto / fixed | makespan auto / fixed "
          "| makespan auto, fixed (s) | to min after bursts (s) | goals met |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for largest, starts in itertools.product(map(int, args.max.split(",")),
                                             map(float, args.burst_starts.split(","))):
        items = math.ceil(starts * largest * args.start_seconds * args.concurrency
                          / args.item_seconds)
        workload = Workload(args.bursts, items, args.item_seconds, args.gap_seconds,
                            args.start_seconds, args.concurrency)
        auto = Simulation(Autoscale(min=0, max=largest, idle_seconds=args.idle_seconds),
                          workload).run()
        size, fixed = fixed_pool(workload, largest)
        cost = auto.replica_seconds / fixed.replica_seconds
        slower = auto.makespan / fixed.makespan
        to_min = ", ".join("-" if t is None else f"{t:g}" for t in auto.to_min)
        met = [cost <= 1.15, slower <= 1.05,
               all(t is not None and t <= args.idle_seconds + 2 for t in auto.to_min)]
        print(f"| {largest} | {items:,} | {size} | {cost:.2f} | {slower:.2f} "
              f"| {auto.makespan:g}, {fixed.makespan:g} | {to_min} "
              f"| {'/'.join('yes' if ok else 'NO' for ok in met)} |", flush=True)
    print("\ngoals: replica-s <= 1.15, makespan <= 1.05, at min <= idle_seconds + 2 s")


if __name__ == "__main__":
    main()
