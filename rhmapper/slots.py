"""What a pool tells the scheduler without being asked to scan: its ready replicas ordered by
free slots (`SlotIndex`), and each map's finished calls (`Inbox`).

Both cost O(1) (amortised, O(log k) for k distinct loads) per call started or finished, whatever
the number of replicas or calls in flight. No Ray here: the Ray pool, the unit tests' fake pool
and the simulated pool of `benchmarks/sim_scale.py` all keep their slots in a `SlotIndex`.
"""

from __future__ import annotations

import collections
import heapq
import threading
from typing import Any, Callable, Protocol

from rhmapper.autoscaling import Backlog
from rhmapper.pool_stats import PoolBoard


class Slotted(Protocol):
    """What the index needs of a replica."""

    name: str
    capacity: int
    in_flight: int


class SlotIndex:
    """The ready replicas of a pool, by load: ``in_flight - capacity`` (negative: free slots).

    The least loaded replica comes first; equally loaded ones take turns (each bucket is first
    in, first out), so one-call maps visit the replicas in turn. The index owns the slot count:
    `took` and `gave_back` change ``in_flight``, also of replicas that are not ready.

    Each method holds ``lock`` (re-entrant). A pool uses it as its own lock, and a scheduler
    holds it from choosing a replica to taking its slot, so maps run from several threads
    share one pool without two of them filling the same free slot.

    Examples:
        >>> class Replica:
        ...     def __init__(self, name, capacity):
        ...         self.name, self.capacity, self.in_flight = name, capacity, 0
        >>> a, b = Replica("a", capacity=1), Replica("b", capacity=2)
        >>> index = SlotIndex(); index.join(a); index.join(b)
        >>> index.least_loaded().name          # b has two free slots, a one
        'b'
        >>> index.took(b); index.took(b); index.least_loaded().name
        'a'
        >>> index.took(a); index.least_loaded() is None, index.least_loaded(spare=1).name
        (True, 'b')
        >>> len(index), index.total
        (2, 3)
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._buckets: dict[int, dict[Any, None]] = {}
        self._loads: list[int] = []
        """A heap of loads whose bucket may hold replicas (empty buckets are dropped lazily)."""
        self._load_of: dict[Any, int] = {}
        self.total = 0
        """Slots of the ready replicas, in all."""
        self._busy = 0
        """Calls in flight on the ready replicas, in all."""
        self.backlog = Backlog()
        """The work waiting in the maps of the pool (or pools) of these slots, as they report it
        for the autoscaler."""
        self.board = PoolBoard()
        """What the maps of the pool (or pools) of these slots did (`Mapper.stats`)."""
        self.news_listener: Callable[[], None] | None = None
        """Called (from any thread) when slots may have freed: a call answered, a replica
        became ready, an abandoned call gave its slot back. Set by `rhmapper.async_driver`,
        whose maps wait for slots without a thread of their own."""

    def pool_news(self) -> None:
        """Slots may have freed (see `news_listener`)."""
        listener = self.news_listener
        if listener is not None:
            listener()

    def __len__(self) -> int:
        """How many replicas are ready."""
        return len(self._load_of)

    def __contains__(self, replica: Any) -> bool:
        return replica in self._load_of

    def join(self, replica: Slotted) -> None:
        """``replica`` is ready to take calls."""
        with self.lock:
            if replica not in self._load_of:
                self.total += replica.capacity
                self._busy += replica.in_flight
                self._place(replica)

    def leave(self, replica: Slotted) -> None:
        """``replica`` takes no more calls (starting again, benched or gone)."""
        with self.lock:
            load = self._load_of.pop(replica, None)
            if load is not None:
                del self._buckets[load][replica]
                self.total -= replica.capacity
                self._busy -= replica.in_flight

    def took(self, replica: Slotted) -> None:
        """A call started on ``replica``."""
        with self.lock:
            replica.in_flight += 1
            self._busy += replica in self._load_of
            self._move(replica)

    def gave_back(self, replica: Slotted) -> None:
        """A call of ``replica`` answered (or was given up for lost)."""
        with self.lock:
            replica.in_flight -= 1
            self._busy -= replica in self._load_of
            self._move(replica)

    def free(self, spare: int = 0) -> int:
        """How many more calls the ready replicas take now (``spare`` more each may queue)."""
        return self.total + spare * len(self._load_of) - self._busy

    def least_loaded(self, spare: int = 0, avoid: Any = None) -> Any | None:
        """The ready replica with the most free slots, or ``None`` if none has a free one.

        ``spare`` extra calls may wait in a full replica's queue. ``avoid`` is a replica to pass
        over while another one has room.
        """
        with self.lock:
            return self._least_loaded(spare, avoid)

    def _least_loaded(self, spare: int, avoid: Any) -> Any | None:
        while self._loads:
            load = self._loads[0]
            bucket = self._buckets.get(load)
            if bucket:
                break
            heapq.heappop(self._loads)
            self._buckets.pop(load, None)
        else:
            return None
        if load >= spare:
            return None
        first = next(iter(bucket))
        if first is not avoid:
            return first
        return self._other_than(first, spare) or first

    def _other_than(self, avoided: Any, spare: int) -> Any | None:
        """The least loaded replica other than ``avoided`` (the first of its bucket)."""
        bucket = self._buckets[self._load_of[avoided]]
        if len(bucket) > 1:
            replicas = iter(bucket)
            next(replicas)
            return next(replicas)
        for load in sorted(self._loads)[1:]:
            if load >= spare:
                return None
            if self._buckets.get(load):
                return next(iter(self._buckets[load]))
        return None

    def _move(self, replica: Slotted) -> None:
        load = self._load_of.get(replica)
        if load is not None:
            del self._buckets[load][replica]
            self._place(replica)

    def _place(self, replica: Slotted) -> None:
        load = replica.in_flight - replica.capacity
        self._load_of[replica] = load
        bucket = self._buckets.get(load)
        if bucket is None:
            bucket = self._buckets[load] = {}
            heapq.heappush(self._loads, load)
        bucket[replica] = None


INPUT_NEWS = "input-news"
"""What `Pool.notify` puts in a map's `Inbox`: its input feed has items for it, or ended."""


class Inbox:
    """One map's finished calls, put by its pool (from any thread) as they finish.

    Examples:
        >>> inbox = Inbox(); inbox.put("call-1"); inbox.take()
        ['call-1']
    """

    def __init__(self) -> None:
        self._done: collections.deque = collections.deque()
        self.owed = 0
        """How many calls of this map are in flight (the map sets it before it waits)."""
        self.on_put: Callable[[], None] | None = None
        """Called after each `put` (from the putting thread): wakes a map that waits without
        a thread of its own (`rhmapper.pacing.Pacer`)."""

    def __bool__(self) -> bool:
        return bool(self._done)

    def put(self, token: Any) -> None:
        """The call ``token`` answered."""
        self._done.append(token)
        if self.on_put is not None:
            self.on_put()

    def take(self) -> list:
        """The calls that answered since the last `take`."""
        done = list(self._done)
        self._done.clear()
        return done
