"""Simulated scale: the real scheduler (`MapRun`) driving a pool of up to 10,000 replicas, no Ray.

The pool (`SimPool`) runs on a virtual clock; its replicas, slots and calls in flight are the real
pool state's (`rhmapper.pool_state.PoolState` and its `CallBook`), so their cost is measured too. Every call takes ``call_seconds`` of virtual time
on its replica. The clock also advances by the real time the scheduler spends between two waits,
so a scheduler that is slow to dispatch leaves replicas idle, as it would on a real cluster.
Reported per configuration (replicas x concurrency):

- scheduler microseconds per call and per item (real time of the map / calls, / items),
- pool utilisation: busy replica time / (slots x virtual makespan), for the call durations given,
- its ceiling: the utilisation one driver can sustain at that cost per call,
  ``call_seconds / (slots x seconds per call)``: beyond it the pool asks for more calls per
  second than a Python loop can start (batches, i.e. more items per call, are the way there).

    python benchmarks/sim_scale.py                       # 10 .. 10,000 replicas x 1 and 4
    python benchmarks/sim_scale.py --replicas 10,100 --max-seconds 5
    python benchmarks/sim_scale.py --plot docs/img/sim_scale.png   # needs matplotlib: .[bench]
    python benchmarks/sim_scale.py --batch-size 100    # 100 items per call

One item per call by default (``--batch-size 1``), so calls = items. Each configuration stops after
``--max-seconds`` of real time (an unordered map over an endless input), so the slow
configurations report a cost per call from the calls that completed (none at all, when the
first round of dispatch alone outlasts the time given).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

from rhmapper.pool_events import Probed, ProbeOutcome
from rhmapper.pool_records import CallRecord, ReplicaRecord
from rhmapper.pool_state import PoolState
from rhmapper.plan import MapPlan
from rhmapper.scheduler import MapRun
from rhmapper.slots import INPUT_NEWS, Inbox
from rhmapper.wire import BatchReply, CallSpec


class SimReplica(ReplicaRecord):
    """A replica record of the real pool state, whose calls take virtual time."""

    def max_items(self, call: CallSpec) -> int | None:
        return None


@dataclass(eq=False)
class SimCall:
    replica: SimReplica
    items: list


class SimPool:
    """A pool of ``replicas`` x ``capacity`` slots on a virtual clock (see the module docstring)."""

    def __init__(self, replicas: int, capacity: int, call_seconds: float) -> None:
        self.state = PoolState("sim", fingerprint={})
        """The real pool state: its records, slots and call book, at the simulated scale."""
        self.slots = self.state.slots
        for index in range(replicas):
            replica = self.state.join(SimReplica(f"sim_replica_{index}", owned=True,
                                                 requested=capacity, index=index))
            assert self.state.handle(Probed(replica, ProbeOutcome.READY, fingerprint={})) == []
        self.call_seconds = call_seconds
        self.calls = 0
        self._input_news = threading.Event()
        self.clock = 0.0
        self.busy = 0.0
        self._done: list[tuple[float, int, SimCall]] = []
        self._sequence = itertools.count()
        self._real = time.perf_counter()

    def _catch_up(self) -> None:
        """The scheduler's own (real) time passes on the virtual clock too."""
        now = time.perf_counter()
        self.clock += now - self._real
        self._real = now

    def submit(self, replica: SimReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> SimCall:
        self._catch_up()
        self.calls += 1
        token = SimCall(replica, items)
        self.state.calls.submitted(token, CallRecord(None, replica, self.clock), asks_at_once=False)
        heapq.heappush(self._done, (self.clock + self.call_seconds, next(self._sequence), token))
        self.busy += self.call_seconds
        return token

    def notify(self, inbox: Inbox) -> None:
        inbox.put(INPUT_NEWS)
        self._input_news.set()

    def wait(self, inbox: Inbox, timeout: float) -> list:
        """The calls that end first on the virtual clock (one map runs on this pool); with none
        in flight, input news (in real time)."""
        self._catch_up()
        if not self._done:
            if not inbox:
                self._input_news.wait(timeout)
            self._input_news.clear()
            return inbox.take()
        done_at, _, first = heapq.heappop(self._done)
        done = [first]
        while self._done and self._done[0][0] <= done_at:
            done.append(heapq.heappop(self._done)[2])
        self.clock = max(self.clock, done_at)
        self._real = time.perf_counter()
        return done

    def fetch(self, token: SimCall, replica: SimReplica) -> BatchReply:
        self.state.calls.fetched(token, self.clock)
        return BatchReply(token.items, None, self.call_seconds)

    def sent_at(self, token: SimCall, replica: SimReplica) -> float:
        raise AssertionError("no map of the simulation has a timeout")

    def abandon(self, token: Any, replica: SimReplica, deadline: float | None) -> None:
        self.busy -= self.call_seconds  # an abandoned call's remaining time is not work

    def lost(self, replica: SimReplica, reason: BaseException) -> None:
        raise AssertionError("no replica dies in the simulation")

    def unavailable(self, replica: SimReplica) -> None:
        raise AssertionError("no replica restarts in the simulation")


@dataclass
class SimResult:
    replicas: int
    concurrency: int
    call_seconds: float
    calls: int
    items: int
    us_per_call: float
    us_per_item: float
    utilisation: float

    @property
    def ceiling(self) -> float:
        """The utilisation one driver can sustain at this cost per call."""
        return min(1.0, self.call_seconds * 1e6 / (self.replicas * self.concurrency
                                                    * self.us_per_call))


def simulate(replicas: int, concurrency: int, call_seconds: float, max_seconds: float,
             max_items: int | None = None, batch_size: int = 1) -> SimResult:
    """Run one configuration; results are checked (each item comes back as itself, in order).

    Examples:
        >>> result = simulate(10, 1, 0.01, max_seconds=0.2, max_items=500)
        >>> result.calls, result.items, 0.0 < result.utilisation <= 1.0
        (500, 500, True)
    """
    pool = SimPool(replicas, concurrency, call_seconds)
    plan = MapPlan(CallSpec("fn"), ordered=False, batch_size=batch_size,
                   window=4 * replicas * concurrency * batch_size)
    source = itertools.count() if max_items is None else iter(range(max_items))
    run = MapRun(pool, plan, source)
    started = time.perf_counter()
    seen = set()
    for chunk in run.chunks():
        seen.update(chunk)
        if time.perf_counter() - started > max_seconds:
            break
    elapsed = time.perf_counter() - started
    items = run.stats.done
    if seen != set(range(len(seen))) or len(seen) != items:
        raise AssertionError("an item came back twice, changed, or not at all")
    slots = replicas * concurrency
    return SimResult(replicas, concurrency, call_seconds, pool.calls, items,
                     elapsed / pool.calls * 1e6 if items else float("inf"),
                     elapsed / items * 1e6 if items else float("inf"),
                     min(1.0, pool.busy / (slots * pool.clock)) if pool.clock else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="10,100,1000,10000")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--call-seconds", default="0.01,0.1")
    parser.add_argument("--max-seconds", type=float, default=10.0,
                        help="real seconds per configuration")
    parser.add_argument("--batch-size", type=int, default=1, help="items per call")
    parser.add_argument("--plot", metavar="PNG", help="also draw the growth curves (matplotlib)")
    args = parser.parse_args()
    print(f"{'replicas':>9} {'conc':>5} {'call s':>7} {'calls':>9} {'us/call':>9} {'us/item':>9} "
          f"{'util':>6} {'ceiling':>8}")
    results = []
    for replicas, concurrency, call_seconds in itertools.product(
            map(int, args.replicas.split(",")), map(int, args.concurrency.split(",")),
            map(float, args.call_seconds.split(","))):
        result = simulate(replicas, concurrency, call_seconds, args.max_seconds,
                          batch_size=args.batch_size)
        results.append(result)
        print(f"{replicas:>9} {concurrency:>5} {call_seconds:>7} {result.calls:>9} "
              f"{result.us_per_call:>9.1f} {result.us_per_item:>9.2f} {result.utilisation:>6.1%} "
              f"{result.ceiling:>8.1%}   "
              f"({result.us_per_call / results[0].us_per_call:.1f}x the first row's cost per call)",
              flush=True)
    if args.plot:
        plot(results, args.plot)


def plot(results: list[SimResult], path: str) -> None:
    """Cost per call and utilisation (with its ceiling, dotted) against replicas, one line per
    (concurrency, call time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cost, busy) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r.concurrency, r.call_seconds) for r in results}):
        line = [r for r in results if (r.concurrency, r.call_seconds) == key]
        label = f"concurrency {key[0]}, {key[1] * 1e3:g} ms calls"
        cost.plot([r.replicas for r in line], [r.us_per_call for r in line], marker="o", label=label)
        [drawn] = busy.plot([r.replicas for r in line], [100 * r.utilisation for r in line],
                            marker="o", label=label)
        busy.plot([r.replicas for r in line], [100 * r.ceiling for r in line], linestyle=":",
                  color=drawn.get_color())
    cost.set(xscale="log", xlabel="replicas", ylabel="scheduler µs per call",
             ylim=(0, 1.5 * max(r.us_per_call for r in results)), title="Scheduler cost per call")
    busy.set(xscale="log", xlabel="replicas", ylabel="% of slot time busy", ylim=(0, 105),
             title="Pool utilisation (dotted: one driver's ceiling)")
    for axes in (cost, busy):
        axes.grid(True, which="both", alpha=0.3)
    busy.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
