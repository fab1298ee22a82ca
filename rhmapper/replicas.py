"""Replicas: creating, naming, health-checking and killing the Ray actors a mapper runs on.

Auto replicas are created by the pool from an `Env` and owned by it (killed on
shutdown, replaced when they die). User replicas are Ray actor handles the user passes in: they
join the pool, and are dropped from it when they die, but are never killed by it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import heapq
import itertools
import json
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable

import cloudpickle
import ray
from ray.exceptions import (
    ActorAlreadyExistsError,
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayChannelError,
    RayTaskError,
    RuntimeEnvSetupError,
    WorkerCrashedError,
)

from rhmapper import _ray_compat
from rhmapper.compiled import CompiledCalls, GraphClosed
from rhmapper.env import Env
from rhmapper.errors import NoReplicasError, PoolMismatchError, RhmapperError, UnschedulableError
from rhmapper.feasibility import check_feasible
from rhmapper.names import NAMESPACE, replica_name
from rhmapper.module import (
    Module,
    fingerprinted,
    function_replica_class,
    replica_class,
    replica_info,
    run_call,
)
from rhmapper.sizing import approx_bytes
from rhmapper.signals import ASK_AFTER_RUNNING_SECONDS, EndSignal, open_end_signal
from rhmapper.scheduler import add_note, remote_error
from rhmapper.slots import Inbox, SlotIndex
from rhmapper.wire import BatchReply, CallSpec, RemoteFailure, ReplicaDied

_FEASIBILITY_RECHECK_SECONDS = 1.0
STUCK_GRACE_SECONDS = 2.0
"""An abandoned call still running after this long gets its auto replica restarted."""
_REPLICA_DEATHS = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError,
                   RayChannelError)
"""What a call to a replica that died raises (a channel error: over its compiled graph)."""


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


class RayReplica:
    """One replica of a pool: a Ray actor handle with its slot count and state.

    ``requested`` is how many calls the pool may keep in flight on it; ``None`` (your actors,
    by default) means as many as the actor runs at once, its ``max_concurrency``. The pool never
    keeps more than that in flight: `capacity` is known once the replica answered its probe.

    Examples:
        >>> import ray
        >>> handle = ray.remote(dict).remote()
        >>> replica = RayReplica("dict(1)", handle, owned=False, requested=None)
        >>> replica.state
        <ReplicaState.STARTING: 'starting'>
        >>> ray.kill(handle)
    """

    def __init__(self, name: str, handle: Any, owned: bool, requested: int | None,
                 index: int | None = None, cluster: str | None = None) -> None:
        self.name = name
        self.index = index
        """An auto replica's index in its pool's names (``None`` for your actors)."""
        self.cluster = cluster
        """The address of the replica's cluster, when the mapper spans several."""
        self.handle = handle
        self.owned = owned
        self.requested = requested
        self.capacity = requested or 1
        self.in_flight = 0
        self.state = ReplicaState.STARTING
        self.node_id: str | None = None
        self.started_at = time.monotonic()
        self.ready_ref = handle.__ray_call__.remote(replica_info)
        self.compiled: CompiledCalls | None = None
        """Its compiled graph, when the pool sends calls over one (``compiled_graphs=True``)."""
        self.broadcasts: set = set()
        """Its `broadcast` calls not answered yet: a mapped call may wait behind them."""
        self.unsure = False
        """Whether calls that failed as unavailable may still run there (Ray cannot say)."""

    def __repr__(self) -> str:
        return (f"RayReplica({self.name!r}, {self.state.value}, "
                f"{'auto' if self.owned else 'user'})")

    def probe(self) -> None:
        """Ask the replica again whether it is up (after it failed calls but may come back);
        the pool takes it out of rotation first."""
        self.started_at = time.monotonic()
        self.ready_ref = self.handle.__ray_call__.remote(replica_info)

    @property
    def queues_ahead(self) -> bool:
        """Only an auto replica gets a call queued beyond its slots (see `scheduler.Replica`)."""
        return self.owned

    def calls_directly(self, call: CallSpec) -> bool:
        """Whether ``call`` goes to the user's method itself (an async method of your actor)."""
        return call.is_async and not self.owned

    def max_items(self, call: CallSpec) -> int | None:
        """One item per call for an async method of your actor (called directly), else any."""
        return 1 if self.calls_directly(call) else None

    def start(self, call: CallSpec, start: int, items: list, budget: float | None = None,
              board: str | None = None, idle: bool = False) -> ray.ObjectRef | Future:
        """Start one call on ``items``; return its ref, or the future of a call over the
        replica's compiled graph (the pool counts the slot it takes). The
        replica starts no item once the map has ended or ``budget`` seconds have passed (see
        `rhmapper.module.CallGuard`; ``board`` names the end board of the replica's cluster when
        it is not the driver's). ``idle`` says that nothing can be ahead of the call in the
        actor's queue (the pool knows, see `ReplicaPool.submit`): the replica then does not ask
        whether the map ended before it starts, however long the call took to get there.

        Auto replicas run the batch in their own entry point; your actors run `run_call`
        through ``__ray_call__``, except an ``async def`` method, which is called directly (one
        item per call) so that it runs on the actor's event loop as a direct call would.
        """
        try:
            if self.calls_directly(call):
                args = items[0] if call.star else (items[0],)
                return getattr(self.handle, call.method).remote(*args, **(call.kwargs or {}))
            now = time.time()
            deadline = None if budget is None else now + budget
            signal_board, key = call.end_signal or (None, None)
            board = board or signal_board  # the end board of this replica's own cluster
            # When the call was sent (``None``: it waits behind nothing); a compiled graph's
            # thread stamps its calls itself (`rhmapper.module.sent_now`).
            sent_at = None if idle and self.compiled is None else now
            payload = [call.method, _large_items_by_ref(items, call.star), call.star,
                       call.kwargs, [board, key, deadline, sent_at]]
            if not self.owned:
                return self.handle.__ray_call__.remote(run_call, payload)
            if self.compiled is not None:
                return self.compiled.submit(payload, functools.partial(_unpicklable_item, start, items))
            if call.is_async:
                return self.handle._rhmapper_run_async.remote(payload)
            return self.handle._rhmapper_run.remote(payload)
        except TypeError as error:
            raise _unpicklable_item(start, items, error) from error

    def broadcast(self, method: str, args: tuple, kwargs: dict) -> ray.ObjectRef | Future:
        """Start ``method(*args, **kwargs)`` on the replica: an actor call, or a call over its
        compiled graph (so that it runs on the thread, and in the turn, of the mapped calls)."""
        if self.compiled is None:
            ref = getattr(self.handle, method).remote(*args, **kwargs)
            self.broadcasts.add(ref)
            ref.future().add_done_callback(lambda _: self.broadcasts.discard(ref))
            return ref
        return self.compiled.submit([method, [args], True, put_kwargs(kwargs) or None, None],
                                    functools.partial(_unpicklable_item, 0, [args]))

    def answer_of_broadcast(self, answer: ray.ObjectRef | Future) -> Any:
        """The value `broadcast` returned (or its error, raised)."""
        if not isinstance(answer, Future):
            return ray.get(answer)
        reply = BatchReply.from_wire(answer.result()).unpacked()
        if reply.failures:
            raise remote_error(reply.failures[0])
        return reply.values[0]

    def set_capacity(self, max_concurrency: int | None) -> None:
        """Fit the slots to what the actor runs at once (an unreadable limit counts as 1)."""
        limit = max_concurrency or 1
        if self.requested is not None and self.requested > limit:
            warnings.warn(
                f"replica {self.name} runs at most {limit} call(s) at once (its max_concurrency); "
                f"the pool keeps {limit} in flight on it, not the {self.requested} asked for. "
                "Create the actor with .options(max_concurrency=...) to run more.",
                RuntimeWarning, stacklevel=2)
        self.capacity = limit if self.requested is None else min(self.requested, limit)


LARGE_ITEM_BYTES = 2**20
"""An input (or a starmap argument) at least this large travels through the object store on
its own (``ray.put``), not pickled inside the call's payload: one copy fewer each way."""
_LARGE_ITEM_CALL = 16
"""Only calls of at most this many items are searched for large ones (a call is bounded by
``max_call_bytes``, so one of many items holds small items)."""


def _large_items_by_ref(items: list, star: bool) -> list:
    """``items`` with each large item (or large starmap argument) put in the object store; the
    replica fetches it back as it does any ``ObjectRef`` argument."""
    if len(items) > _LARGE_ITEM_CALL:
        return items
    if star:
        return [tuple(_by_ref_if_large(argument) for argument in item) for item in items]
    return [_by_ref_if_large(item) for item in items]


def _by_ref_if_large(value: Any) -> Any:
    return ray.put(value) if approx_bytes(value) >= LARGE_ITEM_BYTES else value


def _unpicklable_item(start: int, items: list, error: TypeError) -> TypeError:
    for position, item in enumerate(items):
        try:
            cloudpickle.dumps(item)
        except Exception as cause:  # the first item that cannot be pickled is the one to name
            return TypeError(
                f"input item {start + position} ({item!r:.80}) cannot be pickled to send it to a "
                f"replica: {cause}. Pass picklable values (or build the object inside the replica)."
            )
    return error


def put_kwargs(kwargs: dict) -> dict:
    """A map's constant keyword arguments, each put in the object store once for the whole map
    (an ``ObjectRef`` value is passed on as it is, and reaches the function as its value).

    Examples:
        >>> import ray
        >>> refs = put_kwargs({"scale": 3}); ray.get(refs["scale"])
        3
    """
    refs = {}
    for key, value in kwargs.items():
        if isinstance(value, ray.ObjectRef):
            refs[key] = value
            continue
        try:
            refs[key] = ray.put(value)
        except TypeError:
            check_picklable(value, f"kwargs[{key!r}]")
            raise
    return refs


class ClusterKwargs(dict):
    """A map's constant keyword arguments put on each of several clusters: cluster address ->
    that cluster's refs (see `put_kwargs`)."""


def check_picklable(obj: Any, what: str) -> None:
    """Raise a ``TypeError`` naming ``what`` when ``obj`` cannot be pickled for the replicas.

    Examples:
        >>> import threading
        >>> check_picklable(threading.Lock(), "kwargs['lock']")
        Traceback (most recent call last):
        ...
        TypeError: kwargs['lock'] cannot be pickled to send it to the replicas: cannot pickle '_thread.lock' object
    """
    try:
        cloudpickle.dumps(obj)
    except Exception as error:  # any pickling failure is the user's to fix; name the object
        raise TypeError(f"{what} cannot be pickled to send it to the replicas: {error}") from error


def upload_local_dirs(options: dict[str, Any]) -> dict[str, Any]:
    """Actor options with a local ``working_dir`` / ``py_modules`` uploaded to the cluster.

    Ray uploads local folders only for a whole job; an actor's ``runtime_env`` needs URIs. Uploads
    are content-hashed, so each folder is sent once.

    Examples:
        >>> upload_local_dirs({"num_cpus": 1})
        {'num_cpus': 1}
    """
    runtime_env = options.get("runtime_env")
    if not runtime_env or not {"working_dir", "py_modules"} & runtime_env.keys():
        return options
    runtime_env = _ray_compat.upload_local_dirs(runtime_env, tempfile.gettempdir())
    runtime_env.pop("excludes", None)
    return {**options, "runtime_env": runtime_env}


def _on_its_cluster(method: Callable) -> Callable:
    """Run a `ReplicaPool` method's Ray calls on the pool's own cluster (a driver joined to
    several clusters holds one Ray Client connection per cluster)."""

    @functools.wraps(method)
    def on_cluster(self: "ReplicaPool", *args: Any, **kwargs: Any) -> Any:
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


class ReplicaPool:
    """The replicas of one mapper: auto replicas built from an Env, plus the user's actors.

    Examples:
        >>> pool = ReplicaPool(Env(name="double"), target=lambda x: 2 * x, concurrency=2)
        >>> [replica.name for replica in pool.add_auto(2)]
        ['double_replica_0', 'double_replica_1']
        >>> pool.shutdown()
    """

    def __init__(
        self,
        env: Env,
        target: Module | Any,
        concurrency: int | None,
        ready_timeout: float | None = None,
        replace_mismatched: bool = False,
        cluster: str | None = None,
        connection: Any = None,
        slots: SlotIndex | None = None,
        wakeup: threading.Condition | None = None,
        compiled_graphs: bool = False,
    ) -> None:
        self.env = env
        self.compiled_graphs = compiled_graphs
        """Whether calls to auto replicas go over a compiled graph each (see `rhmapper.compiled`)."""
        self.cluster = cluster
        """The address of the cluster the replicas run on, when the driver joins several."""
        self._connection = connection
        self._entered = threading.local()
        self.unreachable = False
        """Whether the cluster stopped answering (its replicas then leave the pool)."""
        self._unreachable_cause = ""
        self.board: str | None = None
        """The end board of this pool's cluster, when it is not the driver's own."""
        self.replace_mismatched = replace_mismatched
        self.concurrency = concurrency
        """Calls in flight per replica: auto replicas ``concurrency or 1``; your actors
        ``min(concurrency, max_concurrency)``, or their own ``max_concurrency`` if ``None``."""
        self.auto_concurrency = concurrency or 1
        self.ready_timeout = ready_timeout
        self.replicas: list[RayReplica] = []
        self.slots = slots if slots is not None else SlotIndex()
        """The ready replicas by load (see `rhmapper.slots.SlotIndex`); shared by the pools of
        one mapper on several clusters."""
        self._feasible_checked_at = 0.0
        self._actor_options = upload_local_dirs(env.actor_options())
        self._calls: dict[ray.ObjectRef, _CallRecord] = {}
        """Each call in flight (until fetched, or its abandoned answer came)."""
        self._inboxes: dict[ray.ObjectRef, Inbox] = {}
        """Where each unanswered call's answer goes (abandoned calls are not here)."""
        self._events: list[tuple[str, Any, Any]] = []
        """Answers the pool itself waits for: probes, and calls of ended maps."""
        self._wakeup = wakeup if wakeup is not None else threading.Condition()
        """Guards the three above; Ray's callback threads take only this lock, never `_lock`."""
        self._draining: dict[ray.ObjectRef, RayReplica] = {}
        """Abandoned calls not answered yet, with their replica."""
        self._heard: set[str] = set()
        """Keys of maps whose replicas may have asked the end board about them (or may still
        start one of their calls): only these maps' ends are sent (see `open_end_signal`)."""
        self._overtime: list[tuple[float, int, ray.ObjectRef]] = []
        """A heap of abandoned calls with a deadline: (deadline + grace, sequence, ref)."""
        self._overtime_sequence = itertools.count()
        self._refused: str | None = None
        """Why a named replica was refused (`PoolMismatchError`), said again by later maps."""
        self._any_removed = False
        """Whether a replica ever left the pool (an empty pool then says so)."""
        self._lock = self.slots.lock
        """The slot index's lock: the scheduler holds it while it dispatches (see `SlotIndex`),
        and the pools of a mapper over several clusters share it."""
        self.fingerprint = pool_fingerprint(target, env, self.auto_concurrency)
        self._class_name = target.cls.__name__ if isinstance(target, Module) else "actor"
        if isinstance(target, Module):
            actor_class = replica_class(target.cls)
            self._init_args, self._init_kwargs = target.args, target.kwargs
        else:
            actor_class = function_replica_class(target)
            self._init_args, self._init_kwargs = (ray.put(target),), {}
        self._actor_class = ray.remote(fingerprinted(actor_class, self.fingerprint))

    # -- membership -------------------------------------------------------------------------

    @_on_its_cluster
    def add_auto(self, count: int) -> list[RayReplica]:
        """Create ``count`` auto replicas at once; each joins the pool as soon as it is ready."""
        check_feasible(self.env)
        added = [self._create(self._free_index()) for _ in range(count)]
        return added

    @_on_its_cluster
    def add_user(self, handles: list, concurrency: int | None = None) -> list[RayReplica]:
        """Add the user's Ray actor handles; they are never killed by the pool.

        ``concurrency`` caps the calls in flight on each (default: the pool's ``concurrency``,
        else each actor's own ``max_concurrency``)."""
        requested = concurrency if concurrency is not None else self.concurrency
        added = []
        with self._lock:
            for handle in handles:
                name = _actor_name(handle, self._class_name)
                if any(replica.handle == handle for replica in self.replicas):
                    raise ValueError(f"actor {name} is already in the pool")
                replica = RayReplica(name, handle, owned=False, requested=requested,
                                     cluster=self.cluster)
                self.replicas.append(replica)
                self._watch_probe(replica)
                added.append(replica)
        return added

    @_on_its_cluster
    def drop(self, count: int) -> list[RayReplica]:
        """Remove ``count`` replicas, the newest auto replicas first (killed), then user actors."""
        with self._lock:
            if count > len(self.replicas):
                raise ValueError(f"cannot drop {count} replicas: the pool has {len(self.replicas)}")
            order = [r for r in reversed(self.replicas) if r.owned] + [
                r for r in reversed(self.replicas) if not r.owned]
            dropped = order[:count]
            for replica in dropped:
                self._remove(replica)
        return dropped

    @_on_its_cluster
    def shutdown(self, kill: bool = True) -> None:
        """Forget every replica; kill the auto replicas if ``kill`` (the user's actors stay alive)."""
        with self._lock:
            removed = list(self.replicas)
            for replica in removed:
                self._remove(replica, kill)
        for replica in removed:  # not under the lock: maps on other threads go on meanwhile
            if replica.compiled is not None:
                replica.compiled.wait_closed()

    def _remove(self, replica: RayReplica, kill: bool = True) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        self._set_state(replica, ReplicaState.DEAD)
        self._any_removed = True
        if replica.compiled is not None:
            replica.compiled.close(kill=replica.owned and kill)
        elif replica.owned and kill:
            ray.kill(replica.handle, no_restart=True)

    def _free_index(self, start: int = 0) -> int:
        taken = {replica.name for replica in self.replicas}
        return next(index for index in itertools.count(start)
                    if replica_name(self.env.name, index) not in taken)

    def _create(self, index: int) -> RayReplica:
        """Start the auto replica ``<env>_replica_<index>``, or the next free name if Ray still
        holds that one (a killed actor's name is released asynchronously)."""
        options = {
            **self._actor_options,
            "namespace": NAMESPACE,
            "max_concurrency": self.auto_concurrency,
            "max_restarts": 0,
            # A detached pool outlives its driver: a later driver attaches to it by name.
            "get_if_exists": self.env.detached,
        }
        with self._lock:
            while True:
                name = replica_name(self.env.name, index)
                try:
                    handle = self._actor_class.options(name=name, **options).remote(
                        *self._init_args, **self._init_kwargs)
                    break
                except ValueError as error:  # a dead actor's name may not be released yet
                    if not isinstance(error, ActorAlreadyExistsError) and not name_taken(name):
                        raise
                    index = self._free_index(index + 1)
            replica = RayReplica(name, handle, owned=True, requested=self.auto_concurrency,
                                 index=index, cluster=self.cluster)
            self.replicas.append(replica)
            self._watch_probe(replica)
        return replica

    # -- the scheduler's view ---------------------------------------------------------------

    def _set_state(self, replica: RayReplica, state: ReplicaState) -> None:
        """Move ``replica`` to ``state``; only a READY replica is in `slots`."""
        replica.state = state
        if state is ReplicaState.READY:
            self.slots.join(replica)
        else:
            self.slots.leave(replica)

    def _watch_probe(self, replica: RayReplica) -> None:
        ref = replica.ready_ref
        ref.future().add_done_callback(
            functools.partial(self._pool_event, "probed", replica, ref))

    def _pool_event(self, kind: str, subject: Any, ref: ray.ObjectRef, _future: Any) -> None:
        """Ray's callback thread: a probe answered, or an abandoned call ("drained")."""
        with self._wakeup:
            self._events.append((kind, subject, ref))
            self._wakeup.notify_all()

    def _answered(self, ref: ray.ObjectRef, _future: Any) -> None:
        """Ray's callback thread: a call answered; its map's inbox gets it (and its slot frees
        at the next `handle_events` of any map), unless abandoned ("drained")."""
        with self._wakeup:
            inbox = self._inboxes.pop(ref, None)
            if inbox is None:
                self._events.append(("drained", None, ref))
            else:
                inbox.put(ref)
                self._events.append(("answered", None, ref))  # its slot frees before its fetch
            self._wakeup.notify_all()

    def wait(self, inbox: Inbox, timeout: float) -> list:
        """Wait until calls of ``inbox`` answer or the pool changes (a replica became ready, an
        abandoned call gave its slot back), at most ``timeout`` seconds; return the answered
        calls. Raises `NoReplicasError` when nothing is in flight and no replica can take work."""
        if not inbox.owed and not self.slots:
            self.handle_events()  # a replica may have come back (a benched one's call answered)
            if not self.slots:
                self.check_alive()
        done = wait_for_answers(self._wakeup, inbox, timeout, [self])
        self.handle_events()
        return done

    @_on_its_cluster
    def broadcast(self, method: str, args: tuple, kwargs: dict) -> list:
        """Call ``method`` on every replica at once; their answers, in pool order."""
        if self.compiled_graphs:  # a starting replica has no graph yet to take it
            self.wait_ready()
        with self._lock:  # a mapped call sent meanwhile sees the broadcast ahead of it
            replicas = list(self.replicas)
            answers = [replica.broadcast(method, args, kwargs) for replica in replicas]
        results = []
        for replica, answer in zip(replicas, answers):
            try:
                results.append(replica.answer_of_broadcast(answer))
            except Exception as error:  # noted with the replica, then raised as it is
                add_note(error, f"rhmapper: broadcast of {method!r} failed on replica {replica.name}")
                raise
        return results

    @_on_its_cluster
    def put_kwargs(self, kwargs: dict) -> dict:
        """`put_kwargs` on this pool's cluster."""
        return put_kwargs(kwargs)

    def ready_replicas(self) -> int:
        """How many replicas take calls now (for the progress bar)."""
        return len(self.slots)

    def has_events(self) -> bool:
        return bool(self._events) and not self.unreachable

    @_on_its_cluster
    def handle_events(self) -> None:
        """Act on what answered: free the slots of answered calls, take in probed replicas and
        abandoned calls; check calls that outlived their timeout."""
        with self._wakeup:
            events, self._events = self._events, []
        with self._lock:
            probed = []
            for kind, replica, ref in events:
                if kind == "answered":
                    record = self._calls.get(ref)
                    if record is not None:
                        self._give_back(record)
                elif kind == "drained":
                    self._drained(ref)
                elif replica.state is ReplicaState.STARTING and replica.ready_ref == ref:
                    probed.append(replica)
            self._check_overtime()
            self._start_all(probed)

    @_on_its_cluster
    def open_end_signal(self, key: str | None = None) -> tuple[EndSignal, Callable[[], None]]:
        """A map's end signal on this pool's cluster (see `rhmapper.signals.open_end_signal`)."""
        signal, end = open_end_signal(key)
        if self._connection is not None:
            self.board = signal.board

        def end_if_heard() -> None:
            """Send the end only to a map some replica may have asked about, or whose calls
            may still start (its abandoned ones): the end of any other map tells no one."""
            if signal.key not in self._heard:
                return
            self._heard.discard(signal.key)
            if self._connection is None:
                end()
                return
            with _ray_compat.using_client_connection(self._connection):
                if not self.unreachable and ray.util.client.ray.is_connected():
                    end()

        return signal, end_if_heard

    @_on_its_cluster
    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every starting replica is ready (or has failed and been handled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            starting = {r.ready_ref: r for r in self.replicas if r.state is ReplicaState.STARTING}
            if not starting:
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise TimeoutError(
                    f"{len(starting)} replica(s) of env {self.env.name!r} not ready after {timeout}s")
            done, _ = ray.wait(list(starting), num_returns=len(starting), timeout=left)
            answered = set(done)
            with self._lock:  # in pool order: equally loaded replicas then take turns in it
                self._start_all([replica for replica in self.replicas
                                 if replica.ready_ref in answered
                                 and replica.state is ReplicaState.STARTING])

    def _start_all(self, replicas: list[RayReplica]) -> None:
        """Put the replicas whose probe answered into rotation; one that can never start is
        dropped, and the first such failure is raised once every replica has been handled."""
        failures = []
        for replica in replicas:
            try:
                self._started(replica)
            except RhmapperError as error:
                failures.append(error)
        if failures:
            raise failures[0]

    def _started(self, replica: RayReplica) -> None:
        try:
            info = ray.get(replica.ready_ref)
        except RuntimeEnvSetupError as error:
            self._remove(replica)
            raise RhmapperError(
                f"replica {replica.name} could not set up its runtime_env "
                f"{self.env.runtime_env()}: {error}. Check Env.reqs / working_dir / py_modules. "
                "It was dropped from the pool."
            ) from error
        except ActorUnavailableError:
            self._probe(replica)  # restarting, or unreachable for now: Ray queues the probe
            return
        except RayActorError as error:
            if error.actor_init_failed:
                self._remove(replica)
                raise RhmapperError(f"replica {replica.name} failed in its constructor: {error}. "
                                    "It was dropped from the pool.") from error
            self.lost(replica, error)
            return
        if replica.owned and info["fingerprint"] != self.fingerprint:
            self._mismatched(replica, info["fingerprint"])
            return
        replica.node_id = info["node_id"]
        if not replica.owned:
            replica.set_capacity(info["max_concurrency"])
        elif self.compiled_graphs and replica.compiled is None:  # its slot, and one queued ahead
            replica.compiled = CompiledCalls(replica.handle, replica.capacity + 1, replica.name)
        if replica.state is ReplicaState.STARTING:
            self._set_state(replica, ReplicaState.READY)

    def _probe(self, replica: RayReplica) -> None:
        self._set_state(replica, ReplicaState.STARTING)
        replica.probe()
        self._watch_probe(replica)

    @_on_its_cluster
    def check_alive(self) -> None:
        """With nothing ready, fail rather than wait for replicas that can never start."""
        error = self.idle_error(self.unschedulable())
        if error is not None:
            raise error

    @_on_its_cluster
    def unschedulable(self) -> UnschedulableError | None:
        """While a replica is starting, at most once a second: the `UnschedulableError` saying
        that no node of the cluster can ever host one, else None. A Ray call, made without the
        pool's lock; `idle_error` takes its answer.

        Examples:
            >>> pool = ReplicaPool(Env(name="calm"), target=abs, concurrency=1)
            >>> pool.unschedulable() is None  # no replica is starting: nothing to ask
            True
        """
        with self._lock:
            starting = any(r.state is ReplicaState.STARTING for r in self.replicas)
        now = time.monotonic()
        if not starting or now - self._feasible_checked_at <= _FEASIBILITY_RECHECK_SECONDS:
            return None
        self._feasible_checked_at = now
        try:
            check_feasible(self.env)
        except UnschedulableError as error:
            return error
        return None

    def idle_error(self, unschedulable: UnschedulableError | None = None) -> RhmapperError | None:
        """Why no replica of the pool can take work, now or later (the error `check_alive`
        raises), or None while one is ready or may yet start. ``unschedulable`` is what
        `unschedulable` found. Reads the membership under the pool's lock, so that a replica
        being replaced is never seen missing; makes no Ray call.

        Examples:
            >>> print(ReplicaPool(Env(name="idle"), target=abs, concurrency=1).idle_error())
            the mapper has no replicas: create it with replicas=N (or a list of your actors), or add some with m.add_replicas(N)
        """
        with self._lock:
            return self._idle_error_locked(unschedulable)

    def _idle_error_locked(self, unschedulable: UnschedulableError | None) -> RhmapperError | None:
        replicas = self.replicas
        if any(r.state is ReplicaState.READY for r in replicas):
            return None
        starting = [r for r in replicas if r.state is ReplicaState.STARTING]
        if not replicas and self._refused is not None:
            return PoolMismatchError(self._refused)
        if not replicas and not self._any_removed:
            return NoReplicasError(
                "the mapper has no replicas: create it with replicas=N (or a list of your "
                "actors), or add some with m.add_replicas(N)")
        if not replicas:
            return NoReplicasError(
                "the pool has no replicas left: every replica died or was dropped. "
                "Add replicas with Mapper.add_replicas().")
        if not starting and all(r.state is ReplicaState.BENCHED for r in replicas):
            return NoReplicasError(
                f"no replica can take work: all {len(replicas)} are your actors still "
                "running calls that outlived timeout= (a running call cannot be interrupted). "
                "Make the function return in time, or add replicas.", benched=True)
        if starting and unschedulable is not None:
            error = NoReplicasError(f"no replica is ready and none can start again: {unschedulable}")
            error.__cause__, error.__suppress_context__ = unschedulable, True
            return error
        now = time.monotonic()
        if starting and self.ready_timeout is not None and all(
                now - r.started_at > self.ready_timeout for r in starting):
            return NoReplicasError(
                f"no replica is ready: {len(starting)} replica(s) of env {self.env.name!r} have not "
                f"started within ready_timeout={self.ready_timeout}s (not enough free "
                f"{', '.join(self.env.resource_request()) or 'resources'} on the cluster?)")
        return None

    @_on_its_cluster
    def submit(self, replica: RayReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> ray.ObjectRef:
        """Start one call on ``replica``, taking one of its slots; ``inbox`` gets its ref when
        it answers.

        A call that takes a free slot of an auto replica that only this pool calls (not a
        detached pool's, which other drivers share), that runs no broadcast and that never
        failed calls as unavailable (they may still run there) waits behind nothing there: it
        goes as ``idle`` (see `RayReplica.start`), so that a map nobody ends early costs no
        question to the end board, and (when every call of it answered within
        `ASK_AFTER_RUNNING_SECONDS`) no end sent to it either. (The scheduler holds the lock
        here.)"""
        idle = (replica.owned and not self.env.detached and not replica.unsure
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
        quiet = idle and replica.compiled is None  # asks the board only after running 20 ms
        with self._lock:
            self.slots.took(replica)
            self._calls[ref] = _CallRecord(future, replica, sent_at,
                                           replica.calls_directly(call), key)
            if key is not None and not quiet:
                self._heard.add(key)
        with self._wakeup:
            self._inboxes[ref] = inbox
        future.add_done_callback(functools.partial(self._answered, ref))
        return ref

    def fetch(self, token: ray.ObjectRef, replica: RayReplica) -> BatchReply:
        """The reply of an answered call, giving its slot back; `ReplicaDied` if its replica
        died (``permanent=False`` when Ray says the actor may come back)."""
        with self._lock:
            record = self._calls.pop(token)
            self._give_back(record)
            if (record.key is not None
                    and time.monotonic() - record.submitted_at >= ASK_AFTER_RUNNING_SECONDS):
                self._heard.add(record.key)  # it may have run long enough to ask
        direct = record.direct
        try:
            value = record.future.result()
        except RayTaskError as error:  # first: Ray's error for your exception also has its type
            if not direct:
                raise
            return BatchReply([None], {0: _task_failure(error)}, None)
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
        record = self._calls.get(token)
        if record is None:
            return 0.0  # answered meanwhile: its time is up as it was
        if isinstance(token, Future):  # a call over a compiled graph
            return getattr(token, "sent_at", record.submitted_at)
        return record.submitted_at

    def _give_back(self, record: "_CallRecord") -> None:
        """The call of ``record`` answered (or was given up): its slot is free, once."""
        if record.holds_slot:
            record.holds_slot = False
            self.slots.gave_back(record.replica)

    @_on_its_cluster
    def abandon(self, token: ray.ObjectRef, replica: RayReplica,
                deadline: float | None = None) -> None:
        """Cancel a call nobody waits for; its slot is given back when the replica answers (see
        `_check_overtime` for a call still running `STUCK_GRACE_SECONDS` past its ``deadline``)."""
        if isinstance(token, ray.ObjectRef):  # a compiled call cannot be cancelled: its guard stops it
            try:
                ray.cancel(token)
            except ConnectionError as error:
                if not self._is_cluster_loss(error):
                    raise
                self._cluster_lost(error)
        with self._lock:  # with the lock, its "drained" event cannot be handled before this
            record = self._calls.get(token)
            if record is not None and record.key is not None:
                self._heard.add(record.key)  # it may still start: its replica must hear the end
            with self._wakeup:
                answered = self._inboxes.pop(token, None) is None
            if answered:  # its answer is in the map's inbox, which drops it
                record = self._calls.pop(token, None)
                if record is not None:
                    self._give_back(record)
                return
            self._draining[token] = replica
            if deadline is not None:
                heapq.heappush(self._overtime, (deadline + STUCK_GRACE_SECONDS,
                                                next(self._overtime_sequence), token))

    def _drained(self, token: ray.ObjectRef) -> None:
        """An abandoned call answered: its slot is free again (and its replica, if benched for
        it and for no other call)."""
        record = self._calls.pop(token, None)
        replica = self._draining.pop(token, None)
        if replica is None or record is None:
            return  # its replica was restarted for it (`_check_overtime`)
        self._give_back(record)
        if replica.state is ReplicaState.BENCHED and not self._stuck_on(replica):
            self._set_state(replica, ReplicaState.READY)

    def _check_overtime(self) -> None:
        """An abandoned call still running `STUCK_GRACE_SECONDS` past its deadline (it timed
        out, or its map ended early and its ``timeout=`` has passed since) takes its replica out
        of rotation, as a running call cannot be interrupted: an auto replica is restarted, your
        actor benched until the call answers. Abandoned calls of maps without ``timeout=`` keep
        their slot until they answer."""
        now = time.monotonic()
        while self._overtime and self._overtime[0][0] <= now:
            _, _, token = heapq.heappop(self._overtime)
            replica = self._draining.get(token)
            if replica is None:
                continue
            if replica.state is not ReplicaState.READY:  # look again once it is back in rotation
                heapq.heappush(self._overtime, (now + STUCK_GRACE_SECONDS,
                                                next(self._overtime_sequence), token))
                continue
            if replica.owned:
                del self._draining[token]
                record = self._calls.pop(token, None)
                if record is not None:
                    self._give_back(record)
                self.lost(replica, RhmapperError(
                    "restarted: a call that outlived timeout= kept running"))
            else:
                self._set_state(replica, ReplicaState.BENCHED)

    def _stuck_on(self, replica: RayReplica) -> bool:
        return any(owner is replica for owner in self._draining.values())

    @_on_its_cluster
    def unavailable(self, replica: RayReplica) -> None:
        """Take no calls to ``replica`` until it answers a new probe (it may be restarting)."""
        with self._lock:
            replica.unsure = True  # its failed calls may yet run: later calls may queue behind
            if replica.state is ReplicaState.READY:
                self._probe(replica)

    def _mismatched(self, replica: RayReplica, found: dict | None) -> None:
        """An existing named replica was built from something else: refuse it, or (when asked)
        kill it and build a new one under its name."""
        differs = sorted(key for key in self.fingerprint
                         if (found or {}).get(key) != self.fingerprint[key]) or ["all of it"]
        if not self.replace_mismatched:
            self._refused = (
                f"pool {self.env.name!r} already has replica {replica.name}, built from another "
                f"{', '.join(differs)} than this mapper's; it would run the old code, so the "
                f"mapper will not use it. Kill the old pool (`rhmapper kill {self.env.name}`), "
                "use another Env name, or pass rm.mapper(..., replace_mismatched=True) to kill "
                "and rebuild its replicas.")
            with self._lock:  # it leaves this pool, alive: it is another mapper's replica
                self._remove(replica, kill=False)
            raise PoolMismatchError(self._refused)
        with self._lock:
            self._replace(replica, wait_for_name=True)

    @_on_its_cluster
    def lost(self, replica: RayReplica, reason: BaseException) -> None:
        """A replica died: drop it, and start a replacement if the pool owns it."""
        with self._lock:
            if replica.state is ReplicaState.DEAD or replica not in self.replicas:
                return
            if not replica.owned:
                self._remove(replica)
                warnings.warn(
                    f"replica {replica.name} (your actor) died and was dropped from the pool; its "
                    f"work goes to the other replicas. Cause: {str(reason).splitlines()[0]}",
                    RuntimeWarning, stacklevel=2)
                return
            self._replace(replica, wait_for_name=False)

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
            self.unreachable = True
            self._unreachable_cause = (str(reason) or type(reason).__name__).splitlines()[0]
            with self._wakeup:  # calls in flight there will not answer: they fail now
                for ref, inbox in list(self._inboxes.items()):
                    self._calls[ref].future = _Unreachable(self._unreachable_cause)
                    inbox.put(ref)
                self._inboxes.clear()
                self._events.clear()  # probes and abandoned calls there will not answer either
                self._wakeup.notify_all()
            lost = list(self.replicas)
            for replica in lost:
                self.replicas.remove(replica)
                self._set_state(replica, ReplicaState.DEAD)
            self._any_removed = self._any_removed or bool(lost)
        if not lost:
            return
        warnings.warn(
            f"cluster {self.cluster} is unreachable: its {len(lost)} replica(s) left the pool, and "
            f"their work goes to the other clusters' replicas. Cause: {self._unreachable_cause}",
            RuntimeWarning, stacklevel=3)

    def _replace(self, replica: RayReplica, wait_for_name: bool) -> None:
        """Kill the auto replica ``replica`` and start a new one at its place in the pool, under
        its name (once Ray has released it, if ``wait_for_name``; else the next free one)."""
        index = self.replicas.index(replica)
        self._remove(replica)
        if wait_for_name:
            wait_name_released(replica.name)
        replacement = self._create(replica.index)
        self.replicas.remove(replacement)
        self.replicas.insert(index, replacement)


def wait_for_answers(wakeup: threading.Condition, inbox: Inbox, timeout: float,
                     pools: list["ReplicaPool"]) -> list:
    """Wait on ``wakeup`` (shared by ``pools``) until ``inbox`` has answers or a pool has events,
    at most ``timeout`` seconds; return the answers."""
    with wakeup:
        if not inbox and not any(pool.has_events() for pool in pools):
            wakeup.wait(timeout)
        return inbox.take()


@dataclasses.dataclass
class _CallRecord:
    """A call in flight, as its pool keeps it."""

    future: Any
    """Its ``ObjectRef.future()`` (or compiled graph's future): its answer, once it came."""
    replica: RayReplica
    submitted_at: float
    direct: bool
    """Whether it calls your async method directly (its reply is the bare value)."""
    key: str | None = None
    """Its map's end-signal key."""
    holds_slot: bool = True
    """Whether its slot is still taken: given back when it answers, before its map fetches it,
    so that a map that reads its results late (a suspended ``imap``) holds no slot another map
    needs."""


class _Unreachable:
    """The token (and already failed future) of a call that could not be sent, or will not be
    answered: its cluster is unreachable."""

    def __init__(self, cause: str) -> None:
        self.cause = cause

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)

    def result(self) -> Any:
        raise ConnectionError(self.cause)


def pool_fingerprint(target: Module | Any, env: Env, concurrency: int) -> dict[str, str]:
    """What a pool's auto replicas are built from, as short digests by part: the function or
    class, the constructor arguments, the ``runtime_env``, the ``compute`` request and the
    concurrency.

    Examples:
        >>> sorted(pool_fingerprint(abs, Env(name="abs"), 1))
        ['compute', 'concurrency', 'constructor', 'runtime_env', 'target']
    """
    if isinstance(target, Module):
        built_from, arguments = target.cls, (target.args, target.kwargs)
    else:
        built_from, arguments = target, ()
    return {
        "target": _digest(cloudpickle.dumps(built_from)),
        "constructor": _digest(cloudpickle.dumps(arguments)),
        "runtime_env": _digest(json.dumps(env.runtime_env(), sort_keys=True, default=str).encode()),
        "compute": _digest(json.dumps(env.resource_request(), sort_keys=True).encode()),
        "concurrency": str(concurrency),
    }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def wait_name_released(name: str, timeout: float = 30.0) -> None:
    """Wait until Ray has released the actor name ``name`` (a killed actor's name is released
    asynchronously); raise `RhmapperError` after ``timeout`` seconds.

    Examples:
        >>> wait_name_released("no_such_replica_0")  # returns at once: nobody holds it
    """
    deadline = time.monotonic() + timeout
    while name_taken(name):
        if time.monotonic() >= deadline:
            raise RhmapperError(f"replica {name} still exists {timeout}s after ray.kill")
        time.sleep(0.1)


def _task_failure(error: RayTaskError) -> RemoteFailure:
    """The user's exception of a direct actor call, as `run_batch` reports one."""
    if isinstance(error.cause, BaseException):
        return RemoteFailure.of(error.cause, str(error))
    return RemoteFailure(error.function_name, str(error), str(error))


def name_taken(name: str) -> bool:
    """Whether an actor of rhmapper's namespace holds ``name`` (Ray releases a killed actor's
    name asynchronously).

    Examples:
        >>> name_taken("no_such_replica_0")
        False
    """
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def _actor_name(handle: Any, class_name: str) -> str:
    if not hasattr(handle, "__ray_call__"):
        raise TypeError(f"replicas=[...] must hold Ray actor handles, got {handle!r}")
    return f"{class_name}({_ray_compat.actor_id_hex(handle)[:8]})"
