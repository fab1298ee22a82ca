"""An in-process pool for unit tests of the scheduler: no Ray, deterministic, any scale."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Callable

from rhmapper.errors import NoReplicasError
from rhmapper.wire import BatchReply, RemoteFailure
from rhmapper.scheduler import CallSpec, ReplicaDied


@dataclass
class FakeReplica:
    name: str
    capacity: int
    fn: Callable
    in_flight: int = 0
    peak_in_flight: int = 0
    alive: bool = True
    calls: list = field(default_factory=list)
    log: list = field(default_factory=list)

    def submit(self, call: CallSpec, start: int, items: list, budget: float | None = None
               ) -> "FakeCall":
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.calls.append((start, list(items)))
        self.log.append((self.name, start, list(items)))
        return FakeCall(self, start, list(items), call.star)

    def release(self) -> None:
        self.in_flight -= 1

    def max_items(self, call: CallSpec) -> int | None:
        return None


@dataclass(eq=False)
class FakeCall:
    replica: FakeReplica
    start: int
    items: list
    star: bool


class ReplicaKiller(BaseException):
    """Raised by a fake's function to mean: this item kills its replica."""


class FakePool:
    """Replicas run ``fn`` on each item when a call completes; completion order is shuffled.

    A function raising :class:`ReplicaKiller` kills its replica: the call's fetch raises
    ``ReplicaDied`` and the pool replaces the replica (``replace=True``) or drops it.
    """

    def __init__(self, replicas: int, fn: Callable = lambda x: x, capacity: int = 1,
                 seed: int = 0, replace: bool = True, item_seconds: float = 1e-6) -> None:
        self.fn = fn
        self.item_seconds = item_seconds
        self.capacity = capacity
        self.replace = replace
        self._names = itertools.count()
        self.log: list = []
        """Every call in submission order: (replica name, start index, items)."""
        self.replicas = [self._new() for _ in range(replicas)]
        self.retired: list[FakeReplica] = []
        self.random = random.Random(seed)
        self.calls_started = 0
        self.cancelled: list[FakeCall] = []
        self.lost_count = 0
        self.unavailable_count = 0

    def _new(self) -> FakeReplica:
        return FakeReplica(f"fake_replica_{next(self._names)}", self.capacity, self.fn, log=self.log)

    @property
    def all_replicas(self) -> list[FakeReplica]:
        return self.replicas + self.retired

    def dispatchable(self) -> list[FakeReplica]:
        return [replica for replica in self.replicas if replica.alive]

    def wait(self, tokens: list, timeout: float) -> list:
        if not tokens and not self.dispatchable():
            raise NoReplicasError("no fake replicas left")
        tokens = list(tokens)
        self.random.shuffle(tokens)
        return tokens[: self.random.randint(1, len(tokens))] if tokens else []

    def fetch(self, token: FakeCall) -> BatchReply:
        if not token.replica.alive:
            raise ReplicaDied(f"{token.replica.name} died earlier")
        values, failures = [], {}
        for position, item in enumerate(token.items):
            try:
                values.append(token.replica.fn(*item) if token.star else token.replica.fn(item))
            except ReplicaKiller as killer:
                token.replica.alive = False
                raise ReplicaDied(f"{token.replica.name} died: {killer}") from killer
            except Exception as error:
                failures[position] = RemoteFailure.capture(error)
                values.append(None)
        return BatchReply(values, failures or None, self.item_seconds * len(token.items))

    def abandon(self, token: FakeCall, replica: FakeReplica, timed_out: bool = False) -> None:
        self.cancelled.append(token)
        replica.release()

    def unavailable(self, replica: FakeReplica) -> None:
        self.unavailable_count += 1

    def lost(self, replica: FakeReplica, reason: BaseException) -> None:
        if replica not in self.replicas:
            return
        self.lost_count += 1
        replica.alive = False
        self.replicas.remove(replica)
        self.retired.append(replica)
        if self.replace:
            self.replicas.append(self._new())
