"""Autoscaling, without Ray: how many replicas a pool wants for the work waiting in its maps
(`ScalingPolicy`), each decision a value with its reason (`ScalingDecision`).

The maps of a pool report their backlog (`Backlog`: items waiting, and the time per item they
measured) as they run; `rhmapper.pool_state.PoolState.scale` asks the policy on every tick of
the Ray pool's scaler and turns its answer into ``Create`` and ``Stop`` actions::

    maps ─▶ Backlog ─┐
                     ├─▶ ScalingPolicy.decide ─▶ ScalingDecision (+n / -n / 0, and why)
    replicas ────────┘        (target within [min, max])   └─▶ PoolState: Create / Stop

Up: the work waiting (items × seconds per item, over the slots of a replica) is what replicas
started now would do in the time one takes to start; as many as that needs are asked for at
once, never above ``max``; auto replicas still starting beyond that (asked for when the items'
time was not yet measured, or for work since done) are stopped. Down: an auto replica with no
call in flight for ``idle_seconds``, while no map has work waiting, is stopped, never below
``min``.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rhmapper.checks import check_count, check_seconds
from rhmapper.pool_records import ReplicaState

_log = logging.getLogger(__name__)

START_SECONDS_GUESS = 5.0
"""How long a replica takes to start, until the pool measured one."""
START_SECONDS_WEIGHT = 0.5
"""The weight of the latest start in `ScalingPolicy.start_seconds` (a decaying mean)."""
HISTORY_KEPT = 100
"""Scaling decisions kept for `rhmapper.Mapper.scaling_history`."""


@dataclass(frozen=True)
class Autoscale:
    """``replicas=rm.Autoscale(min=0, max=32, idle_seconds=60)``: a pool of auto replicas that
    grows with the work waiting in its maps and shrinks when idle (see `rhmapper.autoscaling`).

    It starts with ``min`` replicas; a map with items waiting gets as many more as it needs, at
    once, up to ``max``; a replica with no call in flight for ``idle_seconds`` while no map has
    work waiting is stopped, down to ``min``. Your own actors (`rhmapper.Mapper.add_replicas`)
    count toward the size and are never stopped. ``min == max`` is a fixed pool.

    Examples:
        >>> import rhmapper as rm
        >>> with rm.mapper(abs, replicas=rm.Autoscale(min=0, max=2, idle_seconds=30)) as m:
        ...     m.map([-1, -2, 3])
        [1, 2, 3]
        >>> rm.Autoscale(min=3, max=2)
        Traceback (most recent call last):
        ...
        ValueError: Autoscale(min=3, max=2): min must be <= max
    """

    min: int = 0
    """Replicas kept when idle (your actors count)."""
    max: int = 8
    """Replicas at most (your actors count)."""
    idle_seconds: float = 60.0
    """How long an auto replica has no call in flight, with no work waiting, before it stops."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "min", check_count("Autoscale(min=...)", self.min, minimum=0))
        object.__setattr__(self, "max", check_count("Autoscale(max=...)", self.max))
        object.__setattr__(self, "idle_seconds",
                           check_seconds("Autoscale(idle_seconds=...)", self.idle_seconds))
        if self.min > self.max:
            raise ValueError(f"Autoscale(min={self.min}, max={self.max}): min must be <= max")


@dataclass(frozen=True)
class ScalingDecision:
    """One decision of the autoscaler: replicas asked for (``change`` > 0), stopped (< 0) or
    neither, from ``size`` replicas towards ``target``, and why.

    Examples:
        >>> print(ScalingDecision(at=0.0, change=3, size=1, target=4, reason="backlog"))
        up by 3 (1 -> 4): backlog
    """

    at: float
    """When (``time.time()``)."""
    change: int
    size: int
    """Replicas before (starting, ready or benched; your actors count)."""
    target: int
    reason: str

    def __str__(self) -> str:
        verb = "up by" if self.change > 0 else "down by" if self.change < 0 else "no change"
        amount = f" {abs(self.change)}" if self.change else ""
        return f"{verb}{amount} ({self.size} -> {self.size + self.change}): {self.reason}"


class Backlog:
    """The work waiting in each running map of a pool, as the maps report it (a dict update per
    report: O(1)).

    Examples:
        >>> backlog = Backlog()
        >>> backlog.report("map-a", items=100, item_seconds=0.5)
        >>> backlog.report("map-b", items=10, item_seconds=None)
        >>> backlog.items(), backlog.replica_seconds(default_item_seconds=1.0)
        (110, 60.0)
        >>> backlog.report("map-a", items=0, item_seconds=0.5); backlog.items()
        10
    """

    def __init__(self) -> None:
        self._maps: dict[Any, tuple[int, float | None]] = {}
        self.watched = False
        """Whether an autoscaler reads it (the maps of a pool without one report nothing)."""
        self.on_new_work: Callable[[], None] | None = None
        """Called when a map that had no work waiting reports some (the autoscaler decides at
        once instead of at its next tick)."""

    def report(self, key: Any, items: int, item_seconds: float | None) -> None:
        """Map ``key`` has ``items`` waiting, each taking ``item_seconds`` (``None``: not
        measured yet); 0 items (its end) forgets it."""
        if items:
            new = key not in self._maps
            self._maps[key] = (items, item_seconds)
            if new and self.on_new_work is not None:
                self.on_new_work()
        else:
            self._maps.pop(key, None)

    def items(self) -> int:
        """Items waiting in all maps."""
        return sum(items for items, _ in list(self._maps.values()))

    def replica_seconds(self, default_item_seconds: float) -> float:
        """Seconds of one slot's work waiting in all maps (an unmeasured item counts
        ``default_item_seconds``)."""
        return sum(items * (default_item_seconds if seconds is None else seconds)
                   for items, seconds in list(self._maps.values()))


class ReplicaCount(int):
    """How many replicas a pool has (starting, ready or benched): an ``int``, which also says
    how many are ``ready`` and ``starting``, and the autoscaler's ``target`` (for a fixed pool,
    the count itself).

    Examples:
        >>> count = ReplicaCount(3, ready=2, starting=1, target=4)
        >>> count, count + 1, (count.ready, count.starting, count.target)
        (3, 4, (2, 1, 4))
    """

    ready: int
    starting: int
    target: int

    def __new__(cls, total: int, ready: int, starting: int, target: int) -> "ReplicaCount":
        count = super().__new__(cls, total)
        count.ready, count.starting, count.target = ready, starting, target
        return count

    def __getnewargs__(self) -> tuple[int, int, int, int]:
        return int(self), self.ready, self.starting, self.target


def replica_count(replicas: list, scaling: "ScalingPolicy | None") -> ReplicaCount:
    """The `ReplicaCount` of a pool's live ``replicas`` (records with a ``state``).

    Examples:
        >>> from rhmapper.pool_records import ReplicaRecord
        >>> replica_count([ReplicaRecord("r", owned=True, requested=1)], None).starting
        1
    """
    ready = sum(replica.state is ReplicaState.READY for replica in replicas)
    starting = sum(replica.state is ReplicaState.STARTING for replica in replicas)
    last = scaling.last if scaling is not None else None
    return ReplicaCount(len(replicas), ready, starting,
                        len(replicas) if last is None else last.target)


class ScalingPolicy:
    """What `Autoscale` decides on each tick, from the backlog and the replicas.

    Examples:
        >>> from rhmapper.pool_records import ReplicaRecord, ReplicaState
        >>> policy = ScalingPolicy(Autoscale(min=0, max=10, idle_seconds=60))
        >>> policy.started(15.0); policy.started(5.0); policy.start_seconds  # measured starts
        7.5
        >>> backlog = Backlog(); backlog.report("m", items=1000, item_seconds=0.075)
        >>> decision, stop = policy.decide(now=0.0, backlog=backlog, concurrency=1, replicas=[])
        >>> print(decision)  # 1000 x 0.075 s = 75 s of work: 10 replicas do it in one start time
        up by 10 (0 -> 10): backlog of 1000 items x 0.075 s per item = 75 replica-seconds; a replica starts in 7.5 s
        >>> idle = ReplicaRecord("r0", owned=True, requested=1, index=0)
        >>> idle.state, idle.idle_since = ReplicaState.READY, 0.0
        >>> decision, stop = policy.decide(now=61.0, backlog=Backlog(), concurrency=1,
        ...                                replicas=[idle])
        >>> print(decision), [replica.name for replica in stop]
        down by 1 (1 -> 0): 1 replica(s) idle for 60 s or more, no work waiting
        (None, ['r0'])
    """

    def __init__(self, autoscale: Autoscale) -> None:
        self.autoscale = autoscale
        self.history: collections.deque[ScalingDecision] = collections.deque(maxlen=HISTORY_KEPT)
        """Recent decisions: every change, and the first no-op after one."""
        self.last: ScalingDecision | None = None
        """The latest decision (kept in `history` or not)."""
        self.start_seconds = START_SECONDS_GUESS
        """How long an auto replica takes to start, as measured (see `started`)."""
        self._work_seen_at: float | None = None
        """When a decision last saw work waiting (or the first decision)."""

    def started(self, seconds: float) -> None:
        """An auto replica took ``seconds`` to start."""
        self.start_seconds += START_SECONDS_WEIGHT * (seconds - self.start_seconds)

    def decide(self, now: float, backlog: Backlog, concurrency: int, replicas: Iterable[Any],
               wall_time: float = 0.0) -> tuple[ScalingDecision, list[Any]]:
        """The decision for this tick, and the replicas to stop, newest first: with work waiting,
        auto replicas still starting beyond the target; without, auto replicas ready with no
        call in flight, idle since ``idle_since`` + ``idle_seconds`` <= ``now``, and those still
        starting when no work has waited for ``idle_seconds``.
        ``replicas``: the pool's live replicas (records with ``owned``, ``state``,
        ``in_flight``, ``abandoned_running``, ``idle_since``)."""
        scale, start_seconds = self.autoscale, self.start_seconds
        live = [replica for replica in replicas if replica.state is not ReplicaState.DEAD]
        size = len(live)
        items = backlog.items()
        if self._work_seen_at is None:
            self._work_seen_at = now
        if items:
            self._work_seen_at = now
            work = backlog.replica_seconds(default_item_seconds=start_seconds)
            needed = max(1, math.ceil(work / (concurrency * max(start_seconds, 1e-3))))
            target = min(scale.max, max(scale.min, needed))
            reason = (f"backlog of {items} items x {_seconds(work / items)} per item = "
                      f"{_seconds(work, unit=' replica-seconds')}; a replica starts in "
                      f"{_seconds(start_seconds)}")
            if needed > scale.max and target == scale.max:
                reason += f"; at max={scale.max}"
            if target >= size:
                return self._record(wall_time, target - size, size, target, reason), []
            surplus = [replica for replica in reversed(live)
                       if replica.owned and replica.state is ReplicaState.STARTING]
            stop = surplus[:size - target]
            if stop:
                reason += f"; {len(stop)} replica(s) still starting are not needed"
            return self._record(wall_time, -len(stop), size, size - len(stop), reason), stop
        if size < scale.min:
            return self._record(wall_time, scale.min - size, size, scale.min,
                                f"below min={scale.min}"), []
        no_work_long = now - self._work_seen_at >= scale.idle_seconds
        idle = [replica for replica in reversed(live)
                if replica.owned and (
                    replica.state is ReplicaState.READY and not replica.in_flight
                    and not replica.abandoned_running
                    and now - replica.idle_since >= scale.idle_seconds
                    or replica.state is ReplicaState.STARTING and no_work_long)]
        stop = idle[:max(0, size - scale.min)]
        if stop:
            return self._record(
                wall_time, -len(stop), size, size - len(stop),
                f"{len(stop)} replica(s) idle for {_seconds(scale.idle_seconds)} or more, "
                "no work waiting"), stop
        reason = "no work waiting" if size <= scale.min else (
            f"no work waiting; replicas stop once idle for {_seconds(scale.idle_seconds)}")
        return self._record(wall_time, 0, size, size, reason), []

    def _record(self, at: float, change: int, size: int, target: int,
                reason: str) -> ScalingDecision:
        decision = ScalingDecision(at, change, size, target, reason)
        self.last = decision
        last = self.history[-1] if self.history else None
        if change or last is None or last.change:
            self.history.append(decision)
        _log.debug("autoscaler: %s", decision)
        return decision


def _seconds(value: float, unit: str = " s") -> str:
    """``value`` seconds, to about 3 significant digits.

    Examples:
        >>> _seconds(0.0123456), _seconds(50.0, unit=" replica-seconds")
        ('0.0123 s', '50 replica-seconds')
    """
    return f"{value:.3g}{unit}"
