"""The pool state machine's vocabulary, without Ray: the events the Ray pool reports to
`rhmapper.pool_state.PoolState.handle` and the actions it gets back, each action with its
`rhmapper.pool_records.Reason`.

Examples:
    >>> from rhmapper.pool_records import ReplicaRecord
    >>> replica = ReplicaRecord("p_replica_0", owned=True, requested=1, index=0)
    >>> Died(replica, "node lost").cause, Create(0, Reason.REPLACES_DEAD, position=0).position
    ('node lost', 0)
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Union

from rhmapper.errors import RhmapperError
from rhmapper.pool_records import Reason, ReplicaRecord


class ProbeOutcome(enum.Enum):
    """What a replica's probe said."""

    READY = "ready"
    UNAVAILABLE = "unavailable"
    """Ray could not reach it for now (restarting, or its node unreachable)."""
    DIED = "died"
    INIT_FAILED = "init failed"
    RUNTIME_ENV_FAILED = "runtime_env failed"


@dataclasses.dataclass(frozen=True)
class Probed:
    """A replica's probe answered. ``fingerprint``: what it was built from (auto replicas);
    ``max_concurrency``: its limit (your actors); ``detail``: the error, for failures, and
    ``cause`` the exception itself (the cause of the error the pool raises)."""

    replica: ReplicaRecord
    outcome: ProbeOutcome
    detail: str = ""
    cause: BaseException | None = None
    fingerprint: dict | None = None
    max_concurrency: int | None = None
    node_id: str | None = None
    pid: int | None = None


@dataclasses.dataclass(frozen=True)
class Died:
    """A replica died (a call or probe said so)."""

    replica: ReplicaRecord
    cause: str


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """Ray reports a replica unavailable: it may come back."""

    replica: ReplicaRecord


@dataclasses.dataclass(frozen=True)
class ClusterLost:
    """The pool's cluster (its address) stopped answering."""

    cluster: str | None
    cause: str


@dataclasses.dataclass(frozen=True)
class Drained:
    """An abandoned call answered."""

    token: Any


@dataclasses.dataclass(frozen=True)
class Tick:
    """Time passed (any map's wait): look at abandoned calls past their deadline."""

    now: float


Event = Union[Probed, Died, Unavailable, ClusterLost, Drained, Tick]


@dataclasses.dataclass(frozen=True)
class Create:
    """Start an auto replica under index ``index`` (the next free one if Ray still holds its
    name), at ``position`` in the pool's order (``None``: last); when ``wait_for_name`` is set,
    first wait until Ray has released that name."""

    index: int
    reason: Reason
    position: int | None = None
    wait_for_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Stop:
    """Let go of a replica that left the pool: close its compiled graph, and kill the actor
    when ``kill`` (only ever an auto replica's)."""

    replica: ReplicaRecord
    kill: bool
    reason: Reason


@dataclasses.dataclass(frozen=True)
class Probe:
    """Ask the replica again whether it is up."""

    replica: ReplicaRecord
    reason: Reason


@dataclasses.dataclass(frozen=True)
class Warn:
    """Tell the user (a ``RuntimeWarning``)."""

    message: str
    reason: Reason


@dataclasses.dataclass(frozen=True)
class Fail:
    """Raise ``error`` once every other action was carried out."""

    error: RhmapperError
    reason: Reason


Action = Union[Create, Stop, Probe, Warn, Fail]
