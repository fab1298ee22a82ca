"""An in-process pool for unit tests of the scheduler: no Ray, deterministic, any scale.

Its policy is the real one: replicas, their states, slots and calls in flight live in a
`rhmapper.pool_state.PoolState`, and the fake carries out its actions as the Ray pool does (a
`Create` makes a new fake replica, a `Stop` retires one), so the fake cannot drift from the real
pool. What it fakes is Ray: replicas start after a while, calls answer in shuffled order when the
scheduler waits, a hung call never answers, and ``wait`` returns nothing but the time it was
given when nothing is done.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from rhmapper.pool_events import (
    Action,
    Create,
    Died,
    Drained,
    Fail,
    Probe,
    Probed,
    ProbeOutcome,
    Stop,
    Tick,
    Unavailable,
    Warn,
)
from rhmapper.pool_records import (
    CallRecord,
    ReplicaRecord,
    ReplicaState,
)
from rhmapper.pool_state import PoolState
from rhmapper.slots import INPUT_NEWS, Inbox
from rhmapper.wire import BatchReply, CallSpec, RemoteFailure, ReplicaDied


class FakeReplica(ReplicaRecord):
    """A replica record whose calls run ``fn`` in the driver's process."""

    queues_ahead = True  # as an auto replica, also when the fake plays your actors

    def __init__(self, name: str, owned: bool, capacity: int, fn: Callable, index: int,
                 log: list, starts_after: int = 0) -> None:
        super().__init__(name, owned=owned, requested=capacity, index=index)
        self.fn = fn
        self.starts_after = starts_after
        """How many of the pool's ``wait`` calls pass before this replica is ready."""
        self.peak_in_flight = 0
        self.alive = True
        self.calls: list = []
        self.log = log

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
    ``ReplicaDied`` and the pool replaces the replica (``replace=True``: they play auto
    replicas) or drops it (``replace=False``: they play your actors). A call holding an item
    for which ``hangs(item)`` is true never completes. ``starts_after[i]`` is how many ``wait``
    calls pass before replica ``i`` is ready (default: all ready at once).
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
        self.state = PoolState("fake", fingerprint={})
        self.slots = self.state.slots
        for index, delay in enumerate(starts_after or [0] * replicas):
            self._new(index, delay)
        self.retired: list[FakeReplica] = []
        self.random = random.Random(seed)
        self.waits = 0
        self._input_news = threading.Event()
        self._pending: list[FakeCall] = []
        self._start_ready()
        self.cancelled: list[FakeCall] = []
        self.abandoned: list[FakeCall] = []
        """Abandoned calls still holding their slot (answered at the next ``wait``, unless hung)."""
        self.lost_count = 0
        self.unavailable_count = 0
        self.warnings: list[str] = []

    @property
    def replicas(self) -> list[FakeReplica]:
        return self.state.replicas

    @property
    def all_replicas(self) -> list[FakeReplica]:
        return self.replicas + self.retired

    def _new(self, index: int, starts_after: int = 0, position: int | None = None) -> FakeReplica:
        replica = FakeReplica(f"fake_replica_{next(self._names)}", self.replace, self.capacity,
                              self.fn, index, self.log, starts_after)
        return self.state.join(replica, position)

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Create):
                self._new(action.index, self.waits, action.position)
            elif isinstance(action, Stop):
                action.replica.alive = False
                self.retired.append(action.replica)
            elif isinstance(action, Warn):
                self.warnings.append(action.message)
            elif isinstance(action, Fail):
                raise action.error
            else:
                assert isinstance(action, Probe)  # answered at the next wait

    def _start_ready(self) -> None:
        for replica in list(self.replicas):
            if replica.state is ReplicaState.STARTING and replica.starts_after <= self.waits:
                self._carry_out(self.state.handle(Probed(replica, ProbeOutcome.READY, fingerprint={})))

    def submit(self, replica: FakeReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> FakeCall:
        token = FakeCall(replica, start, list(items), call.star,
                         hung=any(self.hangs(item) for item in items), inbox=inbox)
        self.state.calls.submitted(token, CallRecord(None, replica, token.submitted_at),
                             asks_at_once=True)
        replica.peak_in_flight = max(replica.peak_in_flight, replica.in_flight)
        replica.calls.append((start, list(items)))
        self.log.append((replica.name, start, list(items)))
        self._pending.append(token)
        return token

    def notify(self, inbox: Inbox) -> None:
        inbox.put(INPUT_NEWS)
        self._input_news.set()

    def wait(self, inbox: Inbox, timeout: float) -> list:
        self._handle_events(inbox)
        answering = [token for token in self._pending if token.inbox is inbox and not token.hung]
        if not answering:
            if not inbox:
                self._input_news.wait(timeout)
            self._input_news.clear()
            return inbox.take()
        self.random.shuffle(answering)
        done = answering[: self.random.randint(1, len(answering))]
        for token in done:
            self._pending.remove(token)
        return done

    def _handle_events(self, inbox: Inbox) -> None:
        """What a pool does at each wait: abandoned calls answer (unless hung), replicas
        start, and a map with nothing in flight and no replica to take work raises why."""
        self.waits += 1
        answered = [token for token in self.abandoned if not token.hung]
        for token in answered:
            self.abandoned.remove(token)
        self._carry_out(self.state.handle(*map(Drained, answered), Tick(time.monotonic())))
        self._start_ready()
        if not inbox.owed and not self.slots:
            error = self.state.idle_error()
            if error is not None:
                raise error

    def fetch(self, token: FakeCall, replica: FakeReplica) -> BatchReply:
        self.state.calls.fetched(token, time.monotonic())
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
        self.state.calls.abandoned(token, replica, deadline, answered=False)

    def unavailable(self, replica: FakeReplica) -> None:
        self.unavailable_count += 1
        self._carry_out(self.state.handle(Unavailable(replica)))

    def lost(self, replica: FakeReplica, reason: BaseException) -> None:
        if replica not in self.replicas:
            return
        self.lost_count += 1
        self._carry_out(self.state.handle(Died(replica, str(reason))))
        self._start_ready()  # a replacement starts at once


class AnsweringPool(FakePool):
    """A `FakePool` whose calls answer by themselves, ``call_seconds`` after they were sent,
    from a thread of the pool (as Ray's callbacks do): the answer goes to its map's inbox (which
    wakes a map stepped by `rhmapper.async_driver`), the pool's slots get news, and the slot
    frees at the next ``wait`` of any map (as `rhmapper.replicas.ReplicaPool.handle_events`
    does). `close` stops its thread."""

    def __init__(self, replicas: int, call_seconds: float = 0.001, **options) -> None:
        super().__init__(replicas, **options)
        self.call_seconds = call_seconds
        self._changed = threading.Condition()
        self._due: list = []
        """Heap of (when it answers, number, call) of the calls in flight."""
        self._numbers = itertools.count()
        self._live: set = set()
        """Calls sent and not answered nor abandoned."""
        self._answered: list = []
        """Calls answered since the last ``wait`` (their slots free there)."""
        self._closed = False
        self._thread = threading.Thread(target=self._answer_due, daemon=True)
        self._thread.start()

    def submit(self, replica: FakeReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> FakeCall:
        token = super().submit(replica, call, start, items, budget, inbox)
        with self._changed:
            self._live.add(token)
            heapq.heappush(self._due, (time.monotonic() + self.call_seconds,
                                       next(self._numbers), token))
            self._changed.notify_all()
        return token

    def wait(self, inbox: Inbox, timeout: float) -> list:
        with self._changed:
            answered, self._answered = self._answered, []
        for token in answered:
            self.state.calls.answered(token)
        self._handle_events(inbox)
        with self._changed:
            if not inbox:
                self._changed.wait(timeout)
        return inbox.take()

    def abandon(self, token: FakeCall, replica: FakeReplica, deadline: float | None) -> None:
        with self._changed:
            self._live.discard(token)
        super().abandon(token, replica, deadline)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(10)

    def _answer_due(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not (
                        self._due and self._due[0][0] <= time.monotonic()):
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._closed:
                    return
                _, _, token = heapq.heappop(self._due)
                if token.hung or token not in self._live:
                    continue
                self._live.discard(token)
                self._pending.remove(token)
                self._answered.append(token)
                token.inbox.put(token)
                self._changed.notify_all()
            self.slots.pool_news()
