"""The replica pool's policy, without Ray: replica records, their states, the calls in flight.

The Ray pool (`rhmapper.replicas.ReplicaPool`) turns what Ray tells it into events, hands them
to `PoolState.handle` and carries out the actions it gets back::

    Ray callbacks, probes, errors            PoolState (this module)          ReplicaPool (Ray)
    ─────────────────────────────  events   ─────────────────────────  actions ─────────────────
    a probe answered   ─▶ Probed     ──▶    replica records, states,   ──▶  Create  an actor
    a replica failed   ─▶ Died              the transitions table,          Stop    (kill) one
    Ray: unavailable   ─▶ Unavailable       calls in flight (draining,      Probe   it again
    a connection lost  ─▶ ClusterLost       overtime), slots, refusals      Warn    the user
    an abandoned call  ─▶ Drained                                           Fail    (raise)
    any map's wait     ─▶ Tick

Calls are counted by `calls` (a `rhmapper.pool_calls.CallBook`) directly: they are the hot path
of every map and never change a replica's state by themselves; what the events and actions are is
`rhmapper.pool_events`, what a replica's record holds and where it may move is
`rhmapper.pool_records`. Each action carries a `Reason`. Not thread-safe: the Ray pool calls it
under its lock (the slot index's).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable

from rhmapper.autoscaling import ScalingPolicy
from rhmapper.errors import PoolMismatchError, RhmapperError, UnschedulableError
from rhmapper.pool_calls import CallBook
from rhmapper.pool_idle import idle_error
from rhmapper.pool_events import (
    Action,
    ClusterLost,
    Create,
    Died,
    Drained,
    Event,
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
    TRANSITIONS,
    IllegalTransition,
    Reason,
    ReplicaRecord,
    ReplicaState,
    fit_capacity,
)
from rhmapper.slots import SlotIndex

FEASIBILITY_RECHECK_SECONDS = 1.0
"""While replicas are starting, how often the pool asks whether the cluster can ever host one."""
_DEATHS = frozenset({Reason.REPLACES_DEAD, Reason.DIED, Reason.CLUSTER_LOST})
"""Why a replica leaves the pool when it died (counted in `rhmapper.pool_stats.PoolBoard`)."""


class PoolState:
    """The replicas of one pool, their calls in flight and every policy decision about them.

    ``pool_name`` names the pool in messages; ``fingerprint`` is what its auto replicas must be
    built from; ``resources`` names what a replica asks of a node (for messages).

    Examples:
        >>> state = PoolState("double", fingerprint={"target": "ab12"})
        >>> [action.index for action in state.add_auto(2)]
        [0, 1]
        >>> a = state.join(ReplicaRecord("double_replica_0", owned=True, requested=1, index=0))
        >>> state.handle(Probed(a, ProbeOutcome.READY, fingerprint={"target": "ab12"}))
        []
        >>> a.state, len(state.slots)
        (<ReplicaState.READY: 'ready'>, 1)
        >>> [type(action).__name__ for action in state.handle(Died(a, "node lost"))]
        ['Stop', 'Create']
    """

    def __init__(self, pool_name: str, fingerprint: dict, replace_mismatched: bool = False,
                 ready_timeout: float | None = None, resources: Iterable[str] = (),
                 slots: SlotIndex | None = None) -> None:
        self.pool_name = pool_name
        self.fingerprint = fingerprint
        self.replace_mismatched = replace_mismatched
        self.ready_timeout = ready_timeout
        self.resources = list(resources)
        self.replicas: list[Any] = []
        """The pool's replicas in order (records, or the Ray pool's `RayReplica` subclasses)."""
        self.slots = slots if slots is not None else SlotIndex()
        """The ready replicas by load; shared by the pools of one mapper on several clusters."""
        self.calls = CallBook(self.slots)
        """The calls in flight: their slots, the abandoned ones draining, overtime."""
        self.refused: str | None = None
        """Why a named replica was refused (`PoolMismatchError`), said again by later maps."""
        self.any_removed = False
        """Whether a replica ever left the pool (an empty pool then says so)."""
        self.unreachable = False
        """Whether the pool's cluster stopped answering."""
        self._feasible_checked_at = 0.0
        self.scaling: ScalingPolicy | None = None
        """The autoscaler's policy, if the pool autoscales (see `scale`)."""

    # -- membership -----------------------------------------------------------------------------

    def free_index(self, start: int = 0, name_of: Any = None) -> int:
        """The first index from ``start`` whose name no replica of the pool holds.
        ``name_of(index)`` gives a name (default: ``<pool>_replica_<index>``)."""
        taken = {replica.name for replica in self.replicas}
        name_of = name_of or (lambda index: f"{self.pool_name}_replica_{index}")
        return next(index for index in itertools.count(start) if name_of(index) not in taken)

    def add_auto(self, count: int, name_of: Any = None,
                 reason: Reason = Reason.ADDED) -> list[Create]:
        """Actions creating ``count`` auto replicas at the first free indices."""
        actions, index = [], -1
        for _ in range(count):
            index = self.free_index(index + 1, name_of)
            actions.append(Create(index, reason))
        return actions

    def scale(self, now: float, wall_time: float, concurrency: int,
              name_of: Any = None) -> list[Action]:
        """The actions of the autoscaler's decision for this tick (see
        `rhmapper.autoscaling.ScalingPolicy`): auto replicas to create, or idle ones to stop."""
        assert self.scaling is not None
        decision, stop = self.scaling.decide(now, self.slots.backlog, concurrency, self.replicas,
                                             wall_time)
        if decision.change > 0:
            return list(self.add_auto(decision.change, name_of, Reason.SCALED_UP))
        return [self._remove(replica, Reason.SCALED_DOWN) for replica in stop]

    def join(self, replica: Any, position: int | None = None) -> Any:
        """A created replica joins the pool (starting: its probe was sent); returns it."""
        if position is None:
            self.replicas.append(replica)
        else:
            self.replicas.insert(position, replica)
        return replica

    def drop(self, count: int) -> list[Action]:
        """Remove ``count`` replicas: the newest auto replicas first (killed), then your actors.

        Examples:
            >>> state = PoolState("p", fingerprint={})
            >>> yours = state.join(ReplicaRecord("actor(1)", owned=False, requested=None))
            >>> auto = state.join(ReplicaRecord("p_replica_0", owned=True, requested=1, index=0))
            >>> [(action.replica.name, action.kill) for action in state.drop(1)]
            [('p_replica_0', True)]
            >>> state.drop(2)
            Traceback (most recent call last):
            ...
            ValueError: cannot drop 2 replicas: the pool has 1
        """
        if count > len(self.replicas):
            raise ValueError(f"cannot drop {count} replicas: the pool has {len(self.replicas)}")
        order = [r for r in reversed(self.replicas) if r.owned] + [
            r for r in reversed(self.replicas) if not r.owned]
        return [self._remove(replica, Reason.DROPPED) for replica in order[:count]]

    def shutdown(self, kill: bool = True) -> list[Action]:
        """Every replica leaves the pool; auto replicas are killed if ``kill``."""
        return [self._remove(replica, Reason.SHUT_DOWN, kill)
                for replica in list(self.replicas)]

    def _remove(self, replica: ReplicaRecord, reason: Reason, kill: bool = True) -> Stop:
        if replica in self.replicas:
            self.replicas.remove(replica)
        self.move(replica, ReplicaState.DEAD, reason)
        self.any_removed = True
        return Stop(replica, kill=replica.owned and kill, reason=reason)

    def move(self, replica: ReplicaRecord, state: ReplicaState, reason: Reason) -> None:
        """Move ``replica`` to ``state`` (only a READY replica is in `slots`); raises
        `IllegalTransition` for a move the table does not allow."""
        if state not in TRANSITIONS[replica.state]:
            history = ", ".join(f"{s.value} ({r.value})" for s, r in replica.history)
            raise IllegalTransition(
                f"replica {replica.name} cannot go from {replica.state.value} to {state.value} "
                f"({reason.value}); its history: {history}")
        replica.state = state
        replica.history.append((state, reason))
        if state is ReplicaState.READY:
            if replica.ready_at is None:
                replica.ready_at = time.monotonic()
            self.slots.join(replica)
        else:
            self.slots.leave(replica)
            if reason in _DEATHS:
                self.slots.board.replica_died(replica.name)

    # -- events ---------------------------------------------------------------------------------

    def handle(self, *events: Event) -> list[Action]:
        """Act on ``events`` in order; the actions for the Ray pool to carry out, in order."""
        actions: list[Action] = []
        for event in events:
            actions.extend(self._handlers[type(event)](self, event))
        return actions

    def _probed(self, event: Probed) -> list[Action]:
        replica = event.replica
        if replica.state is not ReplicaState.STARTING or replica not in self.replicas:
            return []  # a stale answer: the replica moved on meanwhile
        outcome = event.outcome
        if outcome is ProbeOutcome.UNAVAILABLE:  # restarting, or unreachable for now
            return self._probe(replica, Reason.RESTARTING)
        if outcome is ProbeOutcome.DIED:
            return self._died(Died(replica, event.detail))
        if outcome is ProbeOutcome.RUNTIME_ENV_FAILED:
            return [self._remove(replica, Reason.RUNTIME_ENV_FAILED), Fail(_caused(RhmapperError(
                f"replica {replica.name} could not set up its runtime_env {event.detail}. "
                "Check Env.reqs / working_dir / py_modules. It was dropped from the pool."),
                event.cause), Reason.RUNTIME_ENV_FAILED)]
        if outcome is ProbeOutcome.INIT_FAILED:
            return [self._remove(replica, Reason.INIT_FAILED), Fail(_caused(RhmapperError(
                f"replica {replica.name} failed in its constructor: {event.detail}. "
                "It was dropped from the pool."), event.cause), Reason.INIT_FAILED)]
        if replica.owned and event.fingerprint != self.fingerprint:
            return self._mismatched(replica, event.fingerprint)
        replica.node_id, replica.pid = event.node_id, event.pid
        actions: list[Action] = []
        if not replica.owned and fit_capacity(replica, event.max_concurrency):
            actions.append(Warn(
                f"replica {replica.name} runs at most {replica.capacity} call(s) at once (its "
                f"max_concurrency); the pool keeps {replica.capacity} in flight on it, not the "
                f"{replica.requested} asked for. Create the actor with "
                ".options(max_concurrency=...) to run more.", Reason.PROBED))
        now = time.monotonic()
        if replica.owned and self.scaling is not None:
            self.scaling.started(now - replica.started_at)
        replica.idle_since = now
        self.move(replica, ReplicaState.READY, Reason.PROBED)
        return actions

    def _mismatched(self, replica: ReplicaRecord, found: dict | None) -> list[Action]:
        """An existing named replica was built from something else: refuse it (it leaves the
        pool alive: it is another mapper's), or (when asked) kill it and build a new one under
        its name."""
        if self.replace_mismatched:
            return self._replace(replica, Reason.REPLACES_MISMATCHED, wait_for_name=True)
        differs = sorted(key for key in self.fingerprint
                         if (found or {}).get(key) != self.fingerprint[key]) or ["all of it"]
        self.refused = (
            f"pool {self.pool_name!r} already has replica {replica.name}, built from another "
            f"{', '.join(differs)} than this mapper's; it would run the old code, so the "
            f"mapper will not use it. Kill the old pool (`rhmapper kill {self.pool_name}`), "
            "use another Env name, or pass rm.mapper(..., replace_mismatched=True) to kill "
            "and rebuild its replicas.")
        return [self._remove(replica, Reason.MISMATCHED, kill=False),
                Fail(PoolMismatchError(self.refused), Reason.MISMATCHED)]

    def _died(self, event: Died) -> list[Action]:
        replica = event.replica
        if replica.state is ReplicaState.DEAD or replica not in self.replicas:
            return []
        if replica.owned:
            return self._replace(replica, Reason.REPLACES_DEAD, wait_for_name=False)
        cause = event.cause.splitlines()[0] if event.cause else "unknown"
        return [self._remove(replica, Reason.DIED), Warn(
            f"replica {replica.name} (your actor) died and was dropped from the pool; its "
            f"work goes to the other replicas. Cause: {cause}", Reason.DIED)]

    def _replace(self, replica: ReplicaRecord, reason: Reason,
                 wait_for_name: bool) -> list[Action]:
        """Stop the auto replica ``replica`` and create a new one at its place in the pool, under
        its name (once Ray released it, if ``wait_for_name``; else the next free one)."""
        position = self.replicas.index(replica)
        stop = self._remove(replica, reason)
        return [stop, Create(replica.index, reason, position,
                             replica.name if wait_for_name else None)]

    def _unavailable(self, event: Unavailable) -> list[Action]:
        replica = event.replica
        replica.unsure = True  # its failed calls may yet run: later calls may queue behind
        if replica.state is ReplicaState.READY:
            return self._probe(replica, Reason.RESTARTING)
        return []

    def _probe(self, replica: ReplicaRecord, reason: Reason) -> list[Action]:
        self.move(replica, ReplicaState.STARTING, reason)
        replica.started_at = time.monotonic()
        return [Probe(replica, reason)]

    def _cluster_lost(self, event: ClusterLost) -> list[Action]:
        """Every replica leaves the pool (none can be replaced there), with one warning."""
        if self.unreachable:
            return []
        self.unreachable = True
        lost = list(self.replicas)
        for replica in lost:
            self.replicas.remove(replica)
            self.move(replica, ReplicaState.DEAD, Reason.CLUSTER_LOST)
        self.any_removed = self.any_removed or bool(lost)
        self.calls.forget_draining()
        if not lost:
            return []
        return [Warn(f"cluster {event.cluster} is unreachable: its {len(lost)} replica(s) left the "
                     "pool, and their work goes to the other clusters' replicas. Cause: "
                     f"{event.cause}", Reason.CLUSTER_LOST)]

    def _drained(self, event: Drained) -> list[Action]:
        """An abandoned call answered: its slot is free again (and its replica, if benched for
        it and for no other call)."""
        replica = self.calls.drained(event.token)
        if (replica is not None and replica.state is ReplicaState.BENCHED
                and not replica.abandoned_running):
            self.move(replica, ReplicaState.READY, Reason.BENCHED_CALL_ANSWERED)
        return []

    def _tick(self, event: Tick) -> list[Action]:
        """An abandoned call still running `STUCK_GRACE_SECONDS` past its deadline takes its
        replica out of rotation, as a running call cannot be interrupted: an auto replica is
        restarted, your actor benched until the call answers. Abandoned calls of maps without
        ``timeout=`` keep their slot until they answer."""
        actions: list[Action] = []
        for token, replica in self.calls.overdue(event.now):
            if replica.state is not ReplicaState.READY:  # look again once back in rotation
                self.calls.look_again(token, event.now)
            elif replica.owned:
                self.calls.release(token)
                actions.extend(self._replace(replica, Reason.OVERTIME, wait_for_name=False))
            else:
                self.move(replica, ReplicaState.BENCHED, Reason.OVERTIME)
        return actions

    _handlers = {Probed: _probed, Died: _died, Unavailable: _unavailable,
                 ClusterLost: _cluster_lost, Drained: _drained, Tick: _tick}

    # -- questions ------------------------------------------------------------------------------

    def feasibility_due(self, now: float) -> bool:
        """Whether to ask now if the cluster can ever host a replica: while one is starting,
        at most once every `FEASIBILITY_RECHECK_SECONDS`."""
        if now - self._feasible_checked_at <= FEASIBILITY_RECHECK_SECONDS or not any(
                replica.state is ReplicaState.STARTING for replica in self.replicas):
            return False
        self._feasible_checked_at = now
        return True

    def idle_error(self, unschedulable: UnschedulableError | None = None,
                   now: float | None = None) -> RhmapperError | None:
        """Why no replica can take work, now or later, or None while one is ready or may yet
        start (see `rhmapper.pool_idle.idle_error`).

        Examples:
            >>> print(PoolState("idle", fingerprint={}).idle_error())
            the mapper has no replicas: create it with replicas=N (or a list of your actors), or add some with m.add_replicas(N)
        """
        return idle_error(self, unschedulable, time.monotonic() if now is None else now)


def _caused(error: RhmapperError, cause: BaseException | None) -> RhmapperError:
    error.__cause__ = cause
    return error
