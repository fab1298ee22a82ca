"""Why no replica of a pool can take work, now or later: the error a map raises instead of
waiting for ever, or None while a replica is ready or may yet start. Pure Python."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rhmapper.errors import NoReplicasError, PoolMismatchError, RhmapperError, UnschedulableError
from rhmapper.pool_records import ReplicaState

if TYPE_CHECKING:
    from rhmapper.pool_state import PoolState


def idle_error(state: "PoolState", unschedulable: UnschedulableError | None,
               now: float) -> RhmapperError | None:
    """Why no replica of ``state`` can take work, or None. ``unschedulable``: the error saying
    no node can ever host a replica, if found; ``now``: ``time.monotonic()``.

    Examples:
        >>> from rhmapper.pool_state import PoolState
        >>> print(idle_error(PoolState("empty", fingerprint={}), None, now=0.0))
        the mapper has no replicas: create it with replicas=N (or a list of your actors), or add some with m.add_replicas(N)
    """
    replicas = state.replicas
    if any(r.state is ReplicaState.READY for r in replicas):
        return None
    if not replicas:
        if state.refused is not None:
            return PoolMismatchError(state.refused)
        if state.scaling is not None and state.scaling.autoscale.max:
            return None  # the autoscaler creates replicas for the work waiting
        if not state.any_removed:
            return NoReplicasError(
                "the mapper has no replicas: create it with replicas=N (or a list of your "
                "actors), or add some with m.add_replicas(N)")
        return NoReplicasError(
            "the pool has no replicas left: every replica died or was dropped. "
            "Add replicas with Mapper.add_replicas().")
    starting = [r for r in replicas if r.state is ReplicaState.STARTING]
    if not starting and all(r.state is ReplicaState.BENCHED for r in replicas):
        return NoReplicasError(
            f"no replica can take work: all {len(replicas)} are your actors still "
            "running calls that outlived timeout= (a running call cannot be interrupted). "
            "Make the function return in time, or add replicas.", benched=True)
    if starting and unschedulable is not None:
        error = NoReplicasError(f"no replica is ready and none can start again: {unschedulable}")
        error.__cause__, error.__suppress_context__ = unschedulable, True
        return error
    if starting and state.ready_timeout is not None and all(
            now - r.started_at > state.ready_timeout for r in starting):
        return NoReplicasError(
            f"no replica is ready: {len(starting)} replica(s) of env {state.pool_name!r} have "
            f"not started within ready_timeout={state.ready_timeout}s (not enough free "
            f"{', '.join(state.resources) or 'resources'} on the cluster?)")
    return None
