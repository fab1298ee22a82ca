"""The replica pool on Ray: Ray's answers turned into events, the pool's actions carried out.

The policy (states, replacing and benching, calls in flight, slots) is `rhmapper.pool_state`;
sending calls and routing their answers is `rhmapper.call_sender`, starting and stopping actors
`rhmapper.replica_launcher`; this module joins them::

    Ray callback threads               any map's wait / fetch              the pool's lock
    ────────────────────   _wakeup    ────────────────────────            ──────────────────
    a call answered   ─▶ its inbox ─▶ MapRun fetches it
                      ─▶ answered  ─▶ handle_events: PoolState.answered   (its slot frees)
    an abandoned call ─▶ Drained   ─▶ handle_events: PoolState.handle ─▶ actions: Create, Stop,
    a probe answered  ─▶ probe     ─▶ ray.get: Probed ─▶ PoolState.handle   Probe, Warn, Fail
                                      + Tick (overtime)                  ─▶ _carry_out (Ray)

Auto replicas are created by the pool from an `Env` and owned by it (killed on shutdown,
replaced when they die). User replicas are Ray actor handles the user passes in: they join the
pool, and are dropped from it when they die, but are never killed by it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time
import warnings
from typing import Any

import ray

from rhmapper.autoscaling import Autoscale, ScalingPolicy
from rhmapper.broadcasts import Broadcast
from rhmapper.call_sender import CallSender, on_its_cluster, wait_for_answers
from rhmapper.compiled import CompiledCalls
from rhmapper.env import Env
from rhmapper.errors import RhmapperError, UnschedulableError
from rhmapper.feasibility import check_feasible
from rhmapper.module import Module
from rhmapper.pool_events import Action, Create, Died, Drained, Probe, Stop, Tick, Unavailable, Warn
from rhmapper.pool_records import ReplicaState
from rhmapper.pool_setup import actor_name, pool_fingerprint
from rhmapper.pool_state import PoolState
from rhmapper.ray_replica import RayReplica
from rhmapper.replica_launcher import ReplicaLauncher
from rhmapper.slots import Inbox, SlotIndex
from rhmapper.stacks import stacks_of
from rhmapper.ticker import Ticker

SCALE_TICK_SECONDS = 0.5
"""How often an autoscaling pool decides; a map whose work starts to wait gets a decision at
once."""


@dataclasses.dataclass(frozen=True)
class _ProbeAnswered:
    """Ray's callback: the probe ``ref`` of ``replica`` answered (read with ``ray.get``)."""

    replica: RayReplica
    ref: ray.ObjectRef


class ReplicaPool(CallSender):
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
        self.concurrency = concurrency
        """Calls in flight per replica: auto replicas ``concurrency or 1``; your actors
        ``min(concurrency, max_concurrency)``, or their own ``max_concurrency`` if ``None``."""
        self.auto_concurrency = concurrency or 1
        fingerprint = pool_fingerprint(target, env, self.auto_concurrency)
        super().__init__(PoolState(env.name, fingerprint, replace_mismatched, ready_timeout,
                                   env.resource_request(), slots),
                         cluster, connection, env.detached, wakeup)
        self._launcher = ReplicaLauncher(env, target, self.auto_concurrency, fingerprint, cluster)
        self._scaler: Ticker | None = None

    # -- membership -------------------------------------------------------------------------

    @on_its_cluster
    def add_auto(self, count: int) -> list[RayReplica]:
        """Create ``count`` auto replicas at once; each joins the pool as soon as it is ready."""
        check_feasible(self.env)
        with self._lock:
            return [self._create(action)
                    for action in self.state.add_auto(count, self._launcher.name_of)]

    @on_its_cluster
    def add_user(self, handles: list, concurrency: int | None = None) -> list[RayReplica]:
        """Add the user's Ray actor handles; they are never killed by the pool.

        ``concurrency`` caps the calls in flight on each (default: the pool's ``concurrency``,
        else each actor's own ``max_concurrency``)."""
        requested = concurrency if concurrency is not None else self.concurrency
        added = []
        with self._lock:
            for handle in handles:
                name = actor_name(handle, self._launcher.class_name)
                if any(replica.handle == handle for replica in self.replicas):
                    raise ValueError(f"actor {name} is already in the pool")
                replica = self.state.join(RayReplica(name, handle, owned=False,
                                                     requested=requested, cluster=self.cluster))
                self._watch_probe(replica)
                added.append(replica)
        return added

    @on_its_cluster
    def autoscale(self, autoscale: Autoscale) -> None:
        """Scale the pool's auto replicas with the work waiting in its maps from now on (see
        `rhmapper.autoscaling`): ``autoscale.min`` replicas now, then a decision every
        `SCALE_TICK_SECONDS`, in a thread of the pool's own."""
        check_feasible(self.env)
        with self._lock:
            self.state.scaling = ScalingPolicy(autoscale)
        self._scale()
        if self._scaler is None:
            self._scaler = Ticker(SCALE_TICK_SECONDS, self._scale,
                                  f"the autoscaler of pool {self.env.name!r}")
            self.slots.backlog.on_new_work = self._scaler.poke
            self.slots.backlog.watched = True

    @on_its_cluster
    def _scale(self) -> None:
        with self._lock:
            if self.state.scaling is not None:
                self._carry_out(self.state.scale(time.monotonic(), time.time(),
                                                 self.auto_concurrency, self._launcher.name_of))

    @on_its_cluster
    def drop(self, count: int) -> list[RayReplica]:
        """Remove ``count`` replicas, the newest auto replicas first (killed), then user actors."""
        with self._lock:
            actions = self.state.drop(count)
            self._carry_out(actions)
        return [action.replica for action in actions]

    @on_its_cluster
    def shutdown(self, kill: bool = True) -> None:
        """Forget every replica; kill the auto replicas if ``kill`` (the user's actors stay alive)."""
        if self._scaler is not None:
            self._scaler.stop()
        with self._lock:
            self.state.scaling = None
            actions = self.state.shutdown(kill)
            self._carry_out(actions)
        for action in actions:  # not under the lock: maps on other threads go on meanwhile
            if action.replica.compiled is not None:
                action.replica.compiled.wait_closed()

    # -- carrying out the policy's actions ------------------------------------------------------

    def _carry_out(self, actions: list[Action]) -> None:
        """Carry out ``actions`` in order (under the pool's lock); then raise the first `Fail`."""
        failures = []
        for action in actions:
            if isinstance(action, Create):
                self._create(action)
            elif isinstance(action, Stop):
                self._launcher.stop(action)
            elif isinstance(action, Probe):
                action.replica.probe()
                self._watch_probe(action.replica)
            elif isinstance(action, Warn):
                warnings.warn(action.message, RuntimeWarning, stacklevel=4)
            else:
                failures.append(action.error)
        if failures:
            raise failures[0]

    def _create(self, action: Create) -> RayReplica:
        replica = self._launcher.create(action, self.state)
        self._watch_probe(replica)
        return replica

    # -- the scheduler's view ---------------------------------------------------------------

    def _watch_probe(self, replica: RayReplica) -> None:
        ref = replica.ready_ref
        ref.future().add_done_callback(
            functools.partial(self._pool_event, _ProbeAnswered(replica, ref)))

    def _pool_event(self, event: Drained | _ProbeAnswered, _future: Any) -> None:
        """Ray's callback thread: a probe answered, or an abandoned call."""
        with self._wakeup:
            self._events.append(event)
            self._wakeup.notify_all()
            self.slots.pool_news()

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

    @on_its_cluster
    def stacks(self, processes: set[tuple[str | None, int]]) -> dict[tuple[str | None, int], str]:
        """`rhmapper.stacks.stacks_of` these ``(node_id, pid)``, on this pool's cluster."""
        return stacks_of(processes)

    @on_its_cluster
    def start_broadcast(self, method: str, args: tuple, kwargs: dict) -> Broadcast:
        """Call ``method`` on every replica at once (see `rhmapper.broadcasts.Broadcast`)."""
        if self.compiled_graphs:  # a starting replica has no graph yet to take it
            self.wait_ready()
        with self._lock:  # a mapped call sent meanwhile sees the broadcast ahead of it
            sent = [(replica, replica.broadcast(method, args, kwargs))
                    for replica in self.replicas]
        return Broadcast(
            [answer if isinstance(answer, concurrent.futures.Future) else answer.future()
             for _, answer in sent],
            functools.partial(self._broadcast_answers, method, sent))

    @on_its_cluster
    def _broadcast_answers(self, method: str, sent: list[tuple[RayReplica, Any]]) -> list:
        return [replica.answer_of_broadcast(method, answer) for replica, answer in sent]

    def ready_replicas(self) -> int | str:
        """How many replicas take calls now, for the progress bar; of an autoscaled pool, also
        how many are starting and the autoscaler's target (from its last decision: O(1))."""
        ready = len(self.slots)
        scaling = self.state.scaling
        last = scaling.last if scaling is not None else None
        if last is None:
            return ready
        size = last.size + last.change
        return f"{ready} ready, {max(0, size - ready)} starting, target {last.target}"

    @on_its_cluster
    def handle_events(self) -> None:
        """Act on what answered: free the slots of answered calls, take in probed replicas and
        abandoned calls; check calls that outlived their timeout."""
        with self._wakeup:
            answered, self._answered = self._answered, []
            events, self._events = self._events, []
        with self._lock:
            for token in answered:
                self.state.calls.answered(token)
            drained = [event for event in events if isinstance(event, Drained)]
            self._carry_out(self.state.handle(*drained, Tick(time.monotonic())))
            self._start_all([event.replica for event in events
                             if isinstance(event, _ProbeAnswered)
                             and event.replica.state is ReplicaState.STARTING
                             and event.replica.ready_ref == event.ref])

    @on_its_cluster
    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every starting replica is ready (or has failed and been handled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            starting = {r.ready_ref: r for r in self.replicas if r.state is ReplicaState.STARTING}
            if not starting:
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                asks = ", ".join(f"{name}={amount:g}"
                                 for name, amount in self.env.resource_request().items())
                raise TimeoutError(
                    f"{len(starting)} replica(s) of env {self.env.name!r} not ready after "
                    f"{timeout}s" + (f" (each asks for {asks}: not enough free on the cluster?)"
                                     if asks else ""))
            done, _ = ray.wait(list(starting), num_returns=len(starting), timeout=left)
            answered = set(done)
            with self._lock:  # in pool order: equally loaded replicas then take turns in it
                self._start_all([replica for replica in self.replicas
                                 if replica.ready_ref in answered
                                 and replica.state is ReplicaState.STARTING])

    def _start_all(self, replicas: list[RayReplica]) -> None:
        """Hand the policy what the probes of ``replicas`` said; a replica that can never start
        is dropped, and the first such failure is raised once every replica has been handled."""
        failures = []
        for replica in replicas:
            try:
                self._carry_out(self.state.handle(self._launcher.probe_answer(replica)))
            except RhmapperError as error:
                failures.append(error)
            if (replica.state is ReplicaState.READY and replica.owned and self.compiled_graphs
                    and replica.compiled is None):  # its slot, and one queued ahead
                replica.compiled = CompiledCalls(replica.handle, replica.capacity + 1, replica.name)
        if failures:
            raise failures[0]

    @on_its_cluster
    def check_alive(self) -> None:
        """With nothing ready, fail rather than wait for replicas that can never start."""
        error = self.idle_error(self.unschedulable())
        if error is not None:
            raise error

    @on_its_cluster
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
            due = self.state.feasibility_due(time.monotonic())
        if not due:
            return None
        try:
            check_feasible(self.env)
        except UnschedulableError as error:
            return error
        return None

    def idle_error(self, unschedulable: UnschedulableError | None = None) -> RhmapperError | None:
        """Why no replica of the pool can take work, now or later (the error `check_alive`
        raises), or None while one is ready or may yet start (see `PoolState.idle_error`).
        ``unschedulable`` is what `unschedulable` found. Reads the membership under the pool's
        lock, so that a replica being replaced is never seen missing; makes no Ray call.

        Examples:
            >>> print(ReplicaPool(Env(name="idle"), target=abs, concurrency=1).idle_error())
            the mapper has no replicas: create it with replicas=N (or a list of your actors), or add some with m.add_replicas(N)
        """
        with self._lock:
            return self.state.idle_error(unschedulable)

    @on_its_cluster
    def unavailable(self, replica: RayReplica) -> None:
        """Take no calls to ``replica`` until it answers a new probe (it may be restarting)."""
        with self._lock:
            self._carry_out(self.state.handle(Unavailable(replica)))

    @on_its_cluster
    def lost(self, replica: RayReplica, reason: BaseException) -> None:
        """A replica died: drop it, and start a replacement if the pool owns it."""
        with self._lock:
            self._carry_out(self.state.handle(Died(replica, str(reason))))

