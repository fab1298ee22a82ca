"""What the replica pool keeps, without Ray: a record per replica (its state, with the table of
allowed moves, and its slots) and a record per call in flight."""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from typing import Any

from rhmapper.pool_stats import ReplicaCounters

_HISTORY_KEPT = 16


class Reason(enum.Enum):
    """Why the pool changed a replica, or why it acts."""

    ADDED = "added"
    PROBED = "its probe answered"
    RESTARTING = "Ray reports it unavailable (it may be restarting)"
    DIED = "it died"
    REPLACES_DEAD = "replaces a replica that died"
    INIT_FAILED = "its constructor failed"
    RUNTIME_ENV_FAILED = "its runtime_env could not be set up"
    MISMATCHED = "it was built from something else than this mapper"
    REPLACES_MISMATCHED = "replaces a replica built from something else"
    OVERTIME = "a call that outlived timeout= kept running"
    BENCHED_CALL_ANSWERED = "the call it was benched for answered"
    DROPPED = "dropped"
    SHUT_DOWN = "the pool shut down"
    CLUSTER_LOST = "its cluster is unreachable"
    SCALED_UP = "the autoscaler asked for it"
    SCALED_DOWN = "the autoscaler stopped it (idle, or no longer needed while starting)"


class ReplicaState(enum.Enum):
    """Where a replica is in its life, as the pool sees it."""

    STARTING = "starting"
    """Created (or restarting): waiting for its probe to answer."""
    READY = "ready"
    """Takes calls."""
    BENCHED = "benched"
    """Your actor, still running a call that outlived ``timeout=``: takes no calls until it
    answers."""
    DEAD = "dead"
    """Gone from the pool."""


TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    ReplicaState.STARTING: frozenset({ReplicaState.READY, ReplicaState.STARTING,
                                      ReplicaState.DEAD}),
    ReplicaState.READY: frozenset({ReplicaState.STARTING, ReplicaState.BENCHED,
                                   ReplicaState.DEAD}),
    ReplicaState.BENCHED: frozenset({ReplicaState.READY, ReplicaState.DEAD}),
    ReplicaState.DEAD: frozenset(),
}
"""The states a replica may move to from each state; any other move is a bug (it raises)."""


class IllegalTransition(RuntimeError):
    """A replica was moved between states the transitions table does not allow: a bug in
    rhmapper, reported with the replica's history."""


class ReplicaRecord:
    """One replica as the pool's policy sees it: its name, owner, slots and state.

    Examples:
        >>> record = ReplicaRecord("double_replica_0", owned=True, requested=2, index=0)
        >>> record.state, record.capacity
        (<ReplicaState.STARTING: 'starting'>, 2)
    """

    def __init__(self, name: str, owned: bool, requested: int | None,
                 index: int | None = None, cluster: str | None = None) -> None:
        self.name = name
        self.owned = owned
        """Whether the pool created it (an auto replica, killed with the pool) or it is yours."""
        self.requested = requested
        """Calls in flight asked for; ``None`` (your actors): its ``max_concurrency``."""
        self.capacity = requested or 1
        """Calls the pool keeps in flight on it (fitted to ``max_concurrency`` when probed)."""
        self.in_flight = 0
        """Calls holding one of its slots (counted by the slot index)."""
        self.index = index
        """An auto replica's index in its pool's names (``None`` for your actors)."""
        self.cluster = cluster
        """The address of the replica's cluster, when the mapper spans several."""
        self.state = ReplicaState.STARTING
        self.history: collections.deque[tuple[ReplicaState, Reason]] = collections.deque(
            [(ReplicaState.STARTING, Reason.ADDED)], maxlen=_HISTORY_KEPT)
        self.started_at = time.monotonic()
        """When it was created or last probed again."""
        self.node_id: str | None = None
        self.pid: int | None = None
        """The process id of its actor (from its probe)."""
        self.ready_at: float | None = None
        """When it first became ready (``time.monotonic()``)."""
        self.counters = ReplicaCounters()
        """What it ran (see `rhmapper.pool_stats`)."""
        self.unsure = False
        """Whether calls that failed as unavailable may still run there (Ray cannot say)."""
        self.abandoned_running = 0
        """Abandoned calls of it not answered yet."""
        self.idle_since = self.started_at
        """When its last call in flight ended (``time.monotonic()``; the autoscaler reads it)."""

    @property
    def queues_ahead(self) -> bool:
        """Only an auto replica gets a call queued beyond its slots (see `scheduler.Replica`)."""
        return self.owned


@dataclasses.dataclass
class CallRecord:
    """A call in flight, as the pool keeps it until it is fetched (or, abandoned, answered)."""

    future: Any
    """Where its answer arrives (the Ray pool's future; anything for the fakes)."""
    replica: ReplicaRecord
    submitted_at: float
    """When it was sent (``time.monotonic()``)."""
    direct: bool = False
    """Whether it calls your async method directly (its reply is the bare value)."""
    key: str | None = None
    """Its map's end-signal key."""
    holds_slot: bool = True
    """Whether its slot is still taken: given back when it answers, before its map fetches it,
    so that a map that reads its results late (a suspended ``imap``) holds no slot another map
    needs."""


def fit_capacity(replica: ReplicaRecord, max_concurrency: int | None) -> bool:
    """Fit your actor's slots to what it runs at once (an unreadable limit counts as 1);
    returns whether fewer slots than asked fit.

    Examples:
        >>> record = ReplicaRecord("actor(1)", owned=False, requested=4)
        >>> fit_capacity(record, 2), record.capacity
        (True, 2)
    """
    limit = max_concurrency or 1
    fewer = replica.requested is not None and replica.requested > limit
    replica.capacity = limit if replica.requested is None else min(replica.requested, limit)
    return fewer
