"""What a pool and its maps have done, without Ray: counters kept per call (never per item), the
snapshot `Mapper.stats` returns, and the sink that exports the same counts as Ray metrics.

```text
MapRun._complete ─ call_answered ─► ReplicaCounters (of the replica's record)
                                 └► MetricsSink (rhmapper.metrics, when metrics are on)
PoolState.move ── replica_died ──► deaths by replica name, and the sink
Mapper.stats() ── snapshot ──────► MapperStats: ReplicaStats per replica, MapSnapshot per map
```
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from rhmapper.diagnosis import RunningCall
from rhmapper.latency import LatencySketch

if TYPE_CHECKING:
    from rhmapper.plan import MapStats


class MetricsSink(Protocol):
    """Where a pool's counts go besides its own counters (`rhmapper.metrics.RayMetrics`)."""

    def call_answered(self, replica: str, items: int, failed: int, retried: int,
                      run_seconds: float | None, latency_seconds: float) -> None:
        """One call answered on ``replica``: ``items`` ran, ``failed`` of them failed (and
        ``retried`` of those run again), in ``run_seconds`` on the replica (``None``: not
        measured) and ``latency_seconds`` from sending to answer."""

    def timed_out(self, replica: str, items: int) -> None:
        """A call of ``items`` items outlived its ``timeout=`` on ``replica``."""

    def replica_died(self, replica: str) -> None:
        """``replica`` died (or its cluster was lost)."""


class ReplicaCounters:
    """What one replica ran, updated once per answered call.

    Examples:
        >>> counters = ReplicaCounters()
        >>> counters.call_answered(items=4, failed=1, retried=1, run_seconds=0.2)
        >>> counters.calls, counters.items, counters.failed, round(counters.busy_seconds, 2)
        (1, 4, 1, 0.2)
        >>> round(counters.item_seconds.quantile(0.5), 2)  # 0.2 s for 4 items
        0.05
    """

    __slots__ = ("calls", "items", "failed", "retried", "busy_seconds", "item_seconds")

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0
        self.failed = 0
        self.retried = 0
        self.busy_seconds = 0.0
        self.item_seconds = LatencySketch()
        """Each call's run time per item, counted once per item it ran."""

    def call_answered(self, items: int, failed: int, retried: int,
                      run_seconds: float | None) -> None:
        """Count one answered call."""
        self.calls += 1
        self.items += items
        self.failed += failed
        self.retried += retried
        if run_seconds is not None and items:
            self.busy_seconds += run_seconds
            self.item_seconds.add(run_seconds / items, items)


@dataclass(frozen=True)
class ReplicaStats:
    """One replica in a `MapperStats` snapshot.

    ``busy_share`` is the share of its slots' time spent running calls since it became ready
    (``capacity`` slots; 1.0: always full); ``items_per_second`` is over the same time;
    ``p50_item_seconds`` and ``p99_item_seconds`` are percentiles of the run time per item of
    its calls (within 5 %; ``None`` before any call). ``deaths`` counts the replicas of this
    name that died before (a replacement often takes another name: `MapperStats` counts them
    all).

    Examples:
        >>> ReplicaStats("r0", "ready", None, None, 2, 0, 10, 0, 0, 0, 0.5, 20.0, 0.01, 0.02).calls
        10
    """

    name: str
    state: str
    node_id: str | None
    pid: int | None
    capacity: int
    in_flight: int
    calls: int
    items: int
    failed: int
    retried: int
    busy_share: float
    items_per_second: float
    p50_item_seconds: float | None
    p99_item_seconds: float | None
    deaths: int = 0


@dataclass(frozen=True)
class MapSnapshot:
    """One running map in a `MapperStats` snapshot: items ``done`` (``failed`` of them failed),
    items run again (``retried``), items past ``timeout=`` (``timed_out``), ``calls`` answered
    and ``in_flight``, items ``waiting`` to be sent (``None``: an iterator of unknown length),
    ``items_per_second`` since it started ``seconds`` ago, percentiles of its calls' time
    from sending to answer, and the replicas that died under its calls.

    Examples:
        >>> MapSnapshot(1, 100, 0, 0, 0, 5, 2, 50, 10.0, 10.0, 0.1, 0.3).items_per_second
        10.0
    """

    map_id: int
    done: int
    failed: int
    retried: int
    timed_out: int
    calls: int
    in_flight: int
    waiting: int | None
    items_per_second: float
    seconds: float
    p50_call_seconds: float | None
    p99_call_seconds: float | None
    replicas_lost: int = 0
    """Replicas that died under its calls."""

    @classmethod
    def of(cls, map_id: int, stats: MapStats, in_flight: int, waiting: int | None,
           now: float) -> MapSnapshot:
        """The snapshot of a map whose counters are ``stats``, as of ``now``
        (``time.monotonic()``; a map that ended: when it ended).

        Examples:
            >>> from rhmapper.plan import MapStats
            >>> stats = MapStats(done=30, started_at=10.0)
            >>> MapSnapshot.of(1, stats, in_flight=2, waiting=5, now=13.0).items_per_second
            10.0
        """
        seconds = max(1e-9, now - stats.started_at)
        return cls(map_id, stats.done, stats.failures, stats.retries, stats.timed_out,
                   stats.calls, in_flight, waiting, stats.done / seconds, seconds,
                   stats.call_seconds.quantile(0.5), stats.call_seconds.quantile(0.99),
                   stats.replicas_lost)


@dataclass(frozen=True)
class MapperStats:
    """A snapshot of a mapper: each replica (`ReplicaStats`) and each map running
    (`MapSnapshot`), taken at ``taken_at`` (seconds since the epoch).

    Examples:
        >>> board = PoolBoard()
        >>> print(board.snapshot([]))  # no replica, no map running
        replica                      state     calls    items  failed  retried  busy  items/s   p50 item   p99 item  deaths
    """

    replicas: list[ReplicaStats]
    maps: list[MapSnapshot]
    replica_deaths: int = 0
    """Replicas of the pool that died since it was made (those that died have left
    ``replicas``; their replacements may have other names)."""
    taken_at: float = field(default_factory=time.time)

    def __str__(self) -> str:
        lines = ["replica                      state     calls    items  failed  retried  "
                 "busy  items/s   p50 item   p99 item  deaths"]
        for replica in self.replicas:
            lines.append(
                f"{replica.name[:28]:<28} {replica.state:<8} {replica.calls:>6} "
                f"{replica.items:>8} {replica.failed:>7} {replica.retried:>8} "
                f"{replica.busy_share:>5.0%} {replica.items_per_second:>8.1f} "
                f"{_seconds(replica.p50_item_seconds):>10} "
                f"{_seconds(replica.p99_item_seconds):>10} {replica.deaths:>7}")
        for snapshot in self.maps:
            waiting = "?" if snapshot.waiting is None else snapshot.waiting
            lines.append(
                f"map {snapshot.map_id}: {snapshot.done} done ({snapshot.failed} failed, "
                f"{snapshot.retried} retried, {snapshot.timed_out} timed out), "
                f"{snapshot.in_flight} calls in flight, {waiting} waiting, "
                f"{snapshot.items_per_second:.1f} items/s over {snapshot.seconds:.1f} s, "
                f"p99 call {_seconds(snapshot.p99_call_seconds)}")
        if self.replica_deaths:
            lines.append(f"{self.replica_deaths} replica(s) of the pool died so far")
        return "\n".join(lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


class RunningMap(Protocol):
    """What the board reads of a running map (`rhmapper.scheduler.MapRun`)."""

    stats: MapStats

    def in_flight_calls(self) -> int:
        """Calls of the map in flight."""

    def waiting_items(self) -> int | None:
        """Items not yet sent (``None``: unknown, an iterator)."""

    def calls_running(self) -> list[tuple[int, int, Any, float]]:
        """Each call in flight: its first item, its number of items, its replica and when it
        was sent (``time.monotonic()``)."""


class PoolBoard:
    """A pool's observations: its running maps, replica deaths, and the metrics sink.

    Every method is O(1) but `snapshot`, which is O(replicas + maps) and runs when asked.

    Examples:
        >>> board = PoolBoard()
        >>> board.replica_died("r0"); board.replica_died("r0"); board.deaths["r0"]
        2
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, RunningMap] = {}
        self._map_ids = iter(range(1, 2**63))
        self.deaths: collections.Counter[str] = collections.Counter()
        self.sink: MetricsSink | None = None
        """Set by the Ray pool when metrics are on."""

    def map_started(self, running: RunningMap) -> int:
        """Register a running map; its id in snapshots."""
        with self._lock:
            map_id = next(self._map_ids)
            self._maps[map_id] = running
        return map_id

    def map_ended(self, map_id: int) -> None:
        """The map ``map_id`` ended: it leaves the snapshots."""
        with self._lock:
            self._maps.pop(map_id, None)

    def running(self) -> dict[int, RunningMap]:
        """The running maps, by id (a copy)."""
        with self._lock:
            return dict(self._maps)

    def call_answered(self, replica: Any, items: int, failed: int, retried: int,
                      run_seconds: float | None, latency_seconds: float) -> None:
        """One call answered: the replica's counters (maps of several threads share a replica:
        under the board's lock), and the sink."""
        with self._lock:
            replica.counters.call_answered(items, failed, retried, run_seconds)
        sink = self.sink
        if sink is not None:
            sink.call_answered(replica.name, items, failed, retried, run_seconds,
                               latency_seconds)

    def timed_out(self, replica: Any, items: int) -> None:
        """A call of ``items`` items outlived its ``timeout=`` on ``replica``: for the sink."""
        sink = self.sink
        if sink is not None:
            sink.timed_out(replica.name, items)

    def replica_died(self, name: str) -> None:
        """The replica ``name`` died (or its cluster was lost)."""
        with self._lock:
            self.deaths[name] += 1
        sink = self.sink
        if sink is not None:
            sink.replica_died(name)

    def snapshot(self, replicas: Iterable[Any], now: float | None = None) -> MapperStats:
        """The `MapperStats` of ``replicas`` (the pool's `ReplicaRecord` objects) and the running
        maps."""
        now = time.monotonic() if now is None else now
        # Read without the lock that every answered call takes: a bucket is counted before the
        # total, so a percentile read meanwhile is of the calls counted so far.
        replica_stats = [self._replica_stats(replica, now) for replica in replicas]
        with self._lock:
            deaths = sum(self.deaths.values())
        maps = [MapSnapshot.of(map_id, running.stats, running.in_flight_calls(),
                               running.waiting_items(), now)
                for map_id, running in sorted(self.running().items())]
        return MapperStats(replica_stats, maps, deaths)

    def map_snapshot(self, stats: MapStats, ended_at: float | None) -> MapSnapshot:
        """The snapshot of the map counting in ``stats``: running (its calls in flight and
        items waiting), or ended at ``ended_at`` (``time.monotonic()``; its map id is then 0).
        """
        for map_id, running in self.running().items():
            if running.stats is stats:
                return MapSnapshot.of(map_id, stats, running.in_flight_calls(),
                                      running.waiting_items(), time.monotonic())
        return MapSnapshot.of(0, stats, 0, 0, ended_at or time.monotonic())

    def longest_calls(self, limit: int, now: float | None = None) -> list[RunningCall]:
        """The ``limit`` calls in flight running longest, longest first (O(calls in flight),
        when asked)."""
        now = time.monotonic() if now is None else now
        calls = []
        for map_id, running in self.running().items():
            p99 = running.stats.call_seconds.quantile(0.99)
            for first, items, replica, sent_at in running.calls_running():
                calls.append(RunningCall(map_id, first, items, replica.name, replica.node_id,
                                         replica.pid, now - sent_at, p99))
        return heapq.nlargest(limit, calls, key=lambda call: call.seconds)

    def _replica_stats(self, replica: Any, now: float) -> ReplicaStats:
        counters: ReplicaCounters = replica.counters
        ready_for = now - replica.ready_at if replica.ready_at is not None else 0.0
        busy = counters.busy_seconds / (ready_for * replica.capacity) if ready_for > 0 else 0.0
        return ReplicaStats(
            replica.name, replica.state.value, replica.node_id, replica.pid, replica.capacity,
            replica.in_flight, counters.calls, counters.items, counters.failed, counters.retried,
            min(1.0, busy), counters.items / ready_for if ready_for > 0 else 0.0,
            counters.item_seconds.quantile(0.5), counters.item_seconds.quantile(0.99),
            self.deaths[replica.name])
