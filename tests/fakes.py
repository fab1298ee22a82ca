"""An in-process pool for unit tests of the scheduler: no Ray, deterministic, any scale.

It behaves like the Ray pool where the scheduler can tell: replicas start after a while, a call
holds its slot until it answers (an abandoned one too), a hung call never answers, and ``wait``
returns nothing but the time it was given when nothing is done.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from rhmapper.errors import NoReplicasError
from rhmapper.slots import Inbox, SlotIndex
from rhmapper.wire import BatchReply, CallSpec, RemoteFailure, ReplicaDied


@dataclass(eq=False)
class FakeReplica:
    name: str
    capacity: int
    fn: Callable
    starts_after: int = 0
    """How many of the pool's ``wait`` calls pass before this replica is ready."""
    in_flight: int = 0
    peak_in_flight: int = 0
    queues_ahead: bool = True
    alive: bool = True
    calls: list = field(default_factory=list)
    log: list = field(default_factory=list)

    def max_items(self, call: CallSpec) -> int | None:
        return None


@dataclass(eq=False)
class FakeCall:
    replica: FakeReplica
    start: int
    items: list
    star: bool
    hung: bool
    inbox: Inbox | None
    submitted_at: float = field(default_factory=time.monotonic)


class ReplicaKiller(BaseException):
    """Raised by a fake's function to mean: this item kills its replica (or, with
    ``blames_items=False``, its replica is lost with its cluster while running it)."""

    def __init__(self, message: str, blames_items: bool = True) -> None:
        super().__init__(message)
        self.blames_items = blames_items


class FakePool:
    """Replicas run ``fn`` on each item when a call completes; completion order is shuffled.

    A function raising :class:`ReplicaKiller` kills its replica: the call's fetch raises
    ``ReplicaDied`` and the pool replaces the replica (``replace=True``) or drops it. A call
    holding an item for which ``hangs(item)`` is true never completes. ``starts_after[i]`` is how
    many ``wait`` calls pass before replica ``i`` is ready (default: all ready at once).
    """

    def __init__(self, replicas: int, fn: Callable = lambda x: x, capacity: int = 1,
                 seed: int = 0, replace: bool = True, item_seconds: float = 1e-6,
                 hangs: Callable = lambda item: False, starts_after: list[int] | None = None
                 ) -> None:
        self.fn = fn
        self.hangs = hangs
        self.item_seconds = item_seconds
        self.capacity = capacity
        self.replace = replace
        self._names = itertools.count()
        self.log: list = []
        """Every call in submission order: (replica name, start index, items)."""
        delays = starts_after or [0] * replicas
        self.slots = SlotIndex()
        self.replicas = [self._new(delay) for delay in delays]
        self.retired: list[FakeReplica] = []
        self.random = random.Random(seed)
        self.waits = 0
        self._pending: list[FakeCall] = []
        self._start_ready()
        self.cancelled: list[FakeCall] = []
        self.abandoned: list[FakeCall] = []
        """Abandoned calls still holding their slot (answered at the next ``wait``, unless hung)."""
        self.lost_count = 0
        self.unavailable_count = 0

    def _new(self, starts_after: int = 0) -> FakeReplica:
        return FakeReplica(f"fake_replica_{next(self._names)}", self.capacity, self.fn,
                           starts_after=starts_after, log=self.log)

    @property
    def all_replicas(self) -> list[FakeReplica]:
        return self.replicas + self.retired

    def _start_ready(self) -> None:
        for replica in self.replicas:
            if replica.alive and replica.starts_after <= self.waits:
                self.slots.join(replica)

    def submit(self, replica: FakeReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> FakeCall:
        self.slots.took(replica)
        replica.peak_in_flight = max(replica.peak_in_flight, replica.in_flight)
        replica.calls.append((start, list(items)))
        self.log.append((replica.name, start, list(items)))
        token = FakeCall(replica, start, list(items), call.star,
                         hung=any(self.hangs(item) for item in items), inbox=inbox)
        self._pending.append(token)
        return token

    def wait(self, inbox: Inbox, timeout: float) -> list:
        self.waits += 1
        self._answer_abandoned()
        self._start_ready()
        if not inbox.owed and not self.slots and not any(
                replica.alive and replica.starts_after > self.waits for replica in self.replicas):
            raise NoReplicasError("no fake replicas left")
        answering = [token for token in self._pending if token.inbox is inbox and not token.hung]
        if not answering:
            time.sleep(timeout)
            return []
        self.random.shuffle(answering)
        done = answering[: self.random.randint(1, len(answering))]
        for token in done:
            self._pending.remove(token)
        return done

    def _answer_abandoned(self) -> None:
        for token in [token for token in self.abandoned if not token.hung]:
            self.abandoned.remove(token)
            self.slots.gave_back(token.replica)

    def fetch(self, token: FakeCall, replica: FakeReplica) -> BatchReply:
        self.slots.gave_back(replica)
        if not token.replica.alive:
            raise ReplicaDied(f"{token.replica.name} died earlier")
        values, failures = [], {}
        for position, item in enumerate(token.items):
            try:
                values.append(token.replica.fn(*item) if token.star else token.replica.fn(item))
            except ReplicaKiller as killer:
                token.replica.alive = False
                raise ReplicaDied(f"{token.replica.name} died: {killer}",
                                  blames_items=killer.blames_items) from killer
            except Exception as error:
                failures[position] = RemoteFailure.capture(error)
                values.append(None)
        return BatchReply(values, failures or None, self.item_seconds * len(token.items))

    def sent_at(self, token: FakeCall, replica: FakeReplica) -> float:
        return token.submitted_at

    def abandon(self, token: FakeCall, replica: FakeReplica, deadline: float | None) -> None:
        self.cancelled.append(token)
        self.abandoned.append(token)
        if token in self._pending:
            self._pending.remove(token)

    def unavailable(self, replica: FakeReplica) -> None:
        self.unavailable_count += 1

    def lost(self, replica: FakeReplica, reason: BaseException) -> None:
        if replica not in self.replicas:
            return
        self.lost_count += 1
        replica.alive = False
        self.slots.leave(replica)
        self.replicas.remove(replica)
        self.retired.append(replica)
        if self.replace:
            self.replicas.append(self._new())
            self._start_ready()
