"""A pool's calls on Ray: sending them to replicas, routing each answer to its map's inbox, and
what a lost cluster does to them. `rhmapper.replicas.ReplicaPool` builds on it with the replicas
themselves.

    scheduler ── submit ──▶ RayReplica.start ──▶ the actor
    Ray callback thread: answered ──▶ the map's inbox (and `answered`: its slot frees at the
                                      pool's next `handle_events`), or `Drained` if abandoned
    scheduler ── fetch ──▶ the reply, or `ReplicaDied` saying why the replica failed
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable

import ray
from ray.exceptions import (
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayChannelError,
    RayTaskError,
    WorkerCrashedError,
)

from rhmapper import _ray_compat
from rhmapper.compiled import GraphClosed
from rhmapper.pool_events import ClusterLost, Drained, Warn
from rhmapper.pool_records import CallRecord
from rhmapper.pool_setup import ClusterKwargs, put_kwargs
from rhmapper.pool_state import PoolState
from rhmapper.ray_replica import RayReplica, task_failure
from rhmapper.signals import EndSignal, open_end_signal
from rhmapper.slots import INPUT_NEWS, Inbox
from rhmapper.wire import BatchReply, CallSpec, ReplicaDied

_REPLICA_DEATHS = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError,
                   RayChannelError)
"""What a call to a replica that died raises (a channel error: over its compiled graph)."""


def on_its_cluster(method: Callable) -> Callable:
    """Run a pool method's Ray calls on the pool's own cluster (a driver joined to several
    clusters holds one Ray Client connection per cluster); a lost cluster fails no call.

    Examples:
        >>> class Pool(CallSender):
        ...     @on_its_cluster
        ...     def ping(self):
        ...         return "pong"
        >>> Pool(PoolState("p", fingerprint={})).ping()  # on the driver's own cluster
        'pong'
    """

    @functools.wraps(method)
    def on_cluster(self: "CallSender", *args: Any, **kwargs: Any) -> Any:
        if self._connection is None or getattr(self._entered, "depth", 0):
            return method(self, *args, **kwargs)
        self._entered.depth = 1
        try:
            with _ray_compat.using_client_connection(self._connection):
                # No Ray call may reach a lost connection: Ray would start a local cluster.
                if not self.unreachable and not ray.util.client.ray.is_connected():
                    self._cluster_lost(ConnectionError(f"the connection to {self.cluster} is lost"))
                if self.unreachable and method.__name__ != "submit":
                    return None
                try:
                    return method(self, *args, **kwargs)
                except Exception as error:  # a lost cluster fails any call
                    if not self._is_cluster_loss(error):
                        raise
                    self._cluster_lost(error)
                    return None
        finally:
            self._entered.depth = 0

    return on_cluster


class CallSender:
    """The calls of one pool (whose records are ``state``) on its cluster: ``cluster`` is the
    cluster's address and ``connection`` its Ray Client connection when the driver joins
    several; ``shared`` says that other drivers call the pool's auto replicas too (a detached
    pool); ``wakeup`` is shared by the pools of one mapper.

    Examples:
        >>> sender = CallSender(PoolState("p", fingerprint={}))
        >>> sender.has_events(), sender.unreachable
        (False, False)
    """

    def __init__(self, state: PoolState, cluster: str | None = None, connection: Any = None,
                 shared: bool = False, wakeup: threading.Condition | None = None) -> None:
        self.state = state
        """The pool's policy and records (see `rhmapper.pool_state`)."""
        self.slots = state.slots
        """The ready replicas by load (see `rhmapper.slots.SlotIndex`); shared by the pools of
        one mapper on several clusters."""
        self._lock = self.slots.lock
        """The slot index's lock, guarding `state`: the scheduler holds it while it dispatches
        (see `SlotIndex`), and the pools of a mapper over several clusters share it."""
        self.cluster = cluster
        """The address of the cluster the replicas run on, when the driver joins several."""
        self._connection = connection
        self._entered = threading.local()
        self._unreachable_cause = ""
        self._shared = shared
        self.board: str | None = None
        """The end board of this pool's cluster, when it is not the driver's own."""
        self._inboxes: dict[Any, Inbox] = {}
        """Where each unanswered call's answer goes (abandoned calls are not here)."""
        self._answered: list = []
        """Calls that answered since the last `handle_events` (their slots free there)."""
        self._events: list = []
        """Answers the pool itself waits for: probes, and calls of ended maps (`Drained`)."""
        self._wakeup = wakeup if wakeup is not None else threading.Condition()
        """Guards the three above; Ray's callback threads take only this lock, never `_lock`."""

    @property
    def replicas(self) -> list[RayReplica]:
        """The pool's replicas, in order."""
        return self.state.replicas

    @property
    def unreachable(self) -> bool:
        """Whether the cluster stopped answering (its replicas then left the pool)."""
        return self.state.unreachable

    def _call_answered(self, ref: Any, _future: Any) -> None:
        """Ray's callback thread: a call answered; its map's inbox gets it (and its slot frees
        at the next `handle_events` of any map), unless abandoned (`Drained`)."""
        with self._wakeup:
            inbox = self._inboxes.pop(ref, None)
            if inbox is None:
                self._events.append(Drained(ref))
            else:
                inbox.put(ref)
                self._answered.append(ref)  # its slot frees before its map fetches it
            self._wakeup.notify_all()
            self.slots.pool_news()

    def notify(self, inbox: Inbox) -> None:
        """The map of ``inbox`` has news from its input (see `rhmapper.scheduler.Pool.notify`)."""
        deliver_input_news(self._wakeup, inbox)

    def has_events(self) -> bool:
        return bool(self._events or self._answered) and not self.unreachable

    @on_its_cluster
    def put_kwargs(self, kwargs: dict) -> dict:
        """`put_kwargs` on this pool's cluster."""
        return put_kwargs(kwargs)

    @on_its_cluster
    def open_end_signal(self, key: str | None = None) -> tuple[EndSignal, Callable[[], None]]:
        """A map's end signal on this pool's cluster (see `rhmapper.signals.open_end_signal`)."""
        signal, end = open_end_signal(key)
        if self._connection is not None:
            self.board = signal.board

        def end_if_heard() -> None:
            """Send the end only to a map some replica may have asked about, or whose calls
            may still start (its abandoned ones): the end of any other map tells no one."""
            with self._lock:
                if not self.state.calls.end_heard(signal.key):
                    return
            if self._connection is None:
                end()
                return
            with _ray_compat.using_client_connection(self._connection):
                if not self.unreachable and ray.util.client.ray.is_connected():
                    end()

        return signal, end_if_heard

    # -- calls --------------------------------------------------------------------------------

    @on_its_cluster
    def submit(self, replica: RayReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> Any:
        """Start one call on ``replica``, taking one of its slots; ``inbox`` gets its ref when
        it answers.

        A call that takes a free slot of an auto replica that only this pool calls (not a
        detached pool's, which other drivers share), that runs no broadcast and that never
        failed calls as unavailable (they may still run there) waits behind nothing there: it
        goes as ``idle`` (see `RayReplica.start`), so that a map nobody ends early costs no
        question to the end board, and (when every call of it answered within
        `rhmapper.pool_calls.ASK_AFTER_RUNNING_SECONDS`) no end sent to it either. (The
        scheduler holds the lock here.)"""
        idle = (replica.owned and not self._shared and not replica.unsure
                and not replica.broadcasts and replica.in_flight < replica.capacity)
        sent_at = time.monotonic()
        try:
            if self.unreachable:
                raise ConnectionError(self._unreachable_cause)
            if isinstance(call.kwargs, ClusterKwargs):
                call = dataclasses.replace(call, kwargs=call.kwargs[self.cluster])
            ref = replica.start(call, start, items, budget, self.board, idle)
            future = ref if isinstance(ref, Future) else ref.future()
        except Exception as error:  # on a lost cluster, the call fails like its replica
            if not self.unreachable and not self._is_cluster_loss(error):
                raise
            self._cluster_lost(error)
            ref = future = _Unreachable(self._unreachable_cause)
        key = call.end_signal.key if call.end_signal is not None else None
        record = CallRecord(future, replica, sent_at, replica.calls_directly(call), key)
        with self._lock:  # a quiet call asks the board only once it ran 20 ms
            self.state.calls.submitted(ref, record, asks_at_once=not idle or replica.compiled is not None)
        with self._wakeup:
            self._inboxes[ref] = inbox
        future.add_done_callback(functools.partial(self._call_answered, ref))
        return ref

    def fetch(self, token: Any, replica: RayReplica) -> BatchReply:
        """The reply of an answered call, giving its slot back; `ReplicaDied` if its replica
        died (``permanent=False`` when Ray says the actor may come back)."""
        with self._lock:
            record = self.state.calls.fetched(token, time.monotonic())
        direct = record.direct
        try:
            value = record.future.result()
        except RayTaskError as error:  # first: Ray's error for your exception also has its type
            if not direct:
                raise
            return BatchReply([None], {0: task_failure(error)}, None)
        except ConnectionError as error:
            if self._connection is None:
                raise ReplicaDied(f"the cluster of the driver is unreachable: {error}") from error
            self._cluster_lost(error)
            raise ReplicaDied(f"cluster {self.cluster} is unreachable: {error}",
                              blames_items=False) from error
        except ActorUnavailableError as error:
            raise ReplicaDied(str(error), permanent=False) from error
        except GraphClosed as error:  # its items were never sent
            raise ReplicaDied(str(error), blames_items=False) from error
        except _REPLICA_DEATHS as error:
            raise ReplicaDied(str(error)) from error
        return BatchReply([value], None, None) if direct else BatchReply.from_wire(value).unpacked()

    def sent_at(self, token: Any, replica: RayReplica) -> float | None:
        """When the call ``token`` was sent (``time.monotonic()``); over a compiled graph, when
        the graph thread executed it (``None`` while it waits for its graph to compile)."""
        record = self.state.calls.get(token)
        if record is None:
            return 0.0  # answered meanwhile: its time is up as it was
        if isinstance(token, Future):  # a call over a compiled graph
            return getattr(token, "sent_at", record.submitted_at)
        return record.submitted_at

    @on_its_cluster
    def abandon(self, token: Any, replica: RayReplica, deadline: float | None = None) -> None:
        """Cancel a call nobody waits for; its slot is given back when the replica answers (a
        call still running a grace past its ``deadline`` takes its replica out of rotation, see
        `rhmapper.pool_events.Tick`)."""
        if isinstance(token, ray.ObjectRef):  # a compiled call cannot be cancelled: its guard stops it
            try:
                ray.cancel(token)
            except ConnectionError as error:
                if not self._is_cluster_loss(error):
                    raise
                self._cluster_lost(error)
        with self._lock:  # with the lock, its `Drained` event cannot be handled before this
            with self._wakeup:
                answered = self._inboxes.pop(token, None) is None  # its map's inbox drops it
            self.state.calls.abandoned(token, replica, deadline, answered)

    def _is_cluster_loss(self, error: BaseException) -> bool:
        """Whether ``error``, raised by a Ray call over this pool's connection, means its cluster
        is lost (never for the driver's own cluster)."""
        return self._connection is not None and (
            _ray_compat.is_connection_failure(error) or not ray.util.client.ray.is_connected())

    def _cluster_lost(self, reason: BaseException) -> None:
        """The cluster stopped answering: every replica on it leaves the pool (none can be
        replaced there), with one warning naming the cluster. Only the first call acts."""
        with self._lock:
            if self.unreachable:
                return
            self._unreachable_cause = (str(reason) or type(reason).__name__).splitlines()[0]
            actions = self.state.handle(ClusterLost(self.cluster, self._unreachable_cause))
            with self._wakeup:  # calls in flight there will not answer: they fail now
                for ref, inbox in list(self._inboxes.items()):
                    self.state.calls.records[ref].future = _Unreachable(self._unreachable_cause)
                    inbox.put(ref)
                self._inboxes.clear()
                self._events.clear()  # probes and abandoned calls there will not answer either
                self._wakeup.notify_all()
                self.slots.pool_news()
        for action in actions:
            if isinstance(action, Warn):
                warnings.warn(action.message, RuntimeWarning, stacklevel=3)


def wait_for_answers(wakeup: threading.Condition, inbox: Inbox, timeout: float,
                     pools: list[CallSender]) -> list:
    """Wait on ``wakeup`` (shared by ``pools``) until ``inbox`` has answers or a pool has events,
    at most ``timeout`` seconds; return the answers."""
    with wakeup:
        if not inbox and not any(pool.has_events() for pool in pools):
            wakeup.wait(timeout)
        return inbox.take()


def deliver_input_news(wakeup: threading.Condition, inbox: Inbox) -> None:
    """Put `INPUT_NEWS` in ``inbox`` and wake the maps waiting on ``wakeup`` (see
    `wait_for_answers`)."""
    with wakeup:
        inbox.put(INPUT_NEWS)
        wakeup.notify_all()


class _Unreachable:
    """The token (and already failed future) of a call that could not be sent, or will not be
    answered: its cluster is unreachable."""

    def __init__(self, cause: str) -> None:
        self.cause = cause

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)

    def result(self) -> Any:
        raise ConnectionError(self.cause)
