"""One mapper over replicas on several Ray clusters: ``rm.mapper(fn, replicas={"ray://a:10001": 2,
"ray://b:10001": 3})``.

The driver holds one Ray Client connection per cluster (``ray.init(address,
allow_multiple=True)``) and one `ReplicaPool` per cluster, whose Ray calls go over that
connection. The pools share one `SlotIndex` and one wake-up condition, so the scheduler sees a
single pool: the same least-loaded dispatch, ordering and batching over every cluster. A cluster
that stops answering loses its replicas (with a warning naming it); their calls are re-queued on
the others, as for any dead replica.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable, ContextManager

import ray

from rhmapper import _ray_compat
from rhmapper.broadcasts import Broadcast
from rhmapper.env import Env
from rhmapper.errors import NoReplicasError, PoolMismatchError, RhmapperError
from rhmapper.names import NAMESPACE
from rhmapper.pool_setup import ClusterKwargs
from rhmapper.ray_replica import RayReplica
from rhmapper.call_sender import deliver_input_news, wait_for_answers
from rhmapper.replicas import ReplicaPool
from rhmapper.signals import EndSignal
from rhmapper.slots import Inbox, SlotIndex
from rhmapper.wire import BatchReply, CallSpec


def connect(address: str) -> Any:
    """A Ray Client connection to ``address`` (``ray://host:port``), beside any other.

    Examples:
        >>> connect("10.0.0.5:6379")
        Traceback (most recent call last):
        ...
        ValueError: replicas={...} takes Ray Client addresses ('ray://host:10001'), got '10.0.0.5:6379'
    """
    if not isinstance(address, str) or not address.startswith("ray://"):
        raise ValueError(f"replicas={{...}} takes Ray Client addresses ('ray://host:10001'), "
                         f"got {address!r}")
    with _ray_compat.client_mode_undone_on_failure():
        context = ray.init(address, allow_multiple=True, namespace=NAMESPACE,
                           log_to_driver=False)
    return _ray_compat.client_connection(context)


class MultiClusterPool:
    """The replicas of one mapper on several clusters (see the module docstring).

    Implements what `rhmapper.backend.LocalBackend` and the scheduler need of a pool; each call
    goes to the pool of the replica's cluster.
    """

    def __init__(self, env: Env, target: Any, concurrency: int | None,
                 ready_timeout: float | None, replace_mismatched: bool,
                 addresses: list[str]) -> None:
        self.slots = SlotIndex()
        self._wakeup = threading.Condition()
        self.pools: dict[str, ReplicaPool] = {}
        self._connections: list[Any] = []
        """Every connection this pool opened, closed by `shutdown` (the user passes none in)."""
        self._closed = False
        try:
            for address in addresses:
                connection = connect(address)
                self._connections.append(connection)
                with _ray_compat.using_client_connection(connection):  # the pool puts its target
                    self.pools[address] = ReplicaPool(
                        env, target, concurrency, ready_timeout, replace_mismatched,
                        cluster=address, connection=connection, slots=self.slots,
                        wakeup=self._wakeup)
        except BaseException:
            self._close_connections()  # a mapper that is never made keeps no connection open
            raise

    def _pool_of(self, replica: RayReplica) -> ReplicaPool:
        return self.pools[replica.cluster]

    @property
    def replicas(self) -> list[RayReplica]:
        return [replica for pool in self.pools.values() for replica in pool.replicas]

    def start_broadcast(self, method: str, args: tuple, kwargs: dict) -> Broadcast:
        """`ReplicaPool.start_broadcast` on each cluster in turn (a cluster lost meanwhile:
        none)."""
        sent = [pool.start_broadcast(method, args, kwargs) for pool in self._open_pools()]
        return Broadcast.joined([part for part in sent if part is not None])

    def stacks(self, processes: set[tuple[str | None, int]]) -> dict[tuple[str | None, int], str]:
        """`ReplicaPool.stacks` of each process, taken on the cluster of its node."""
        stacks: dict[tuple[str | None, int], str] = {}
        for pool in self._open_pools():
            nodes = {replica.node_id for replica in pool.replicas}
            here = {process for process in processes if process[0] in nodes}
            if here:
                stacks.update(pool.stacks(here) or {})
        return stacks

    def put_kwargs(self, kwargs: dict) -> ClusterKwargs:
        """The map's constant keyword arguments, put on every reachable cluster."""
        return ClusterKwargs({address: pool.put_kwargs(kwargs)
                              for address, pool in self.pools.items() if not pool.unreachable})

    def ready_replicas(self) -> str:
        """Replicas per cluster, for the progress bar: ``"ray://a:10001=2 ray://b:10001=3"``."""
        return " ".join(f"{address}={len(pool.replicas)}" for address, pool in self.pools.items())

    # -- membership -------------------------------------------------------------------------

    def add_auto(self, count: int | dict[str, int]) -> None:
        """``count`` replicas on each cluster, or ``{address: count}``."""
        counts = count if isinstance(count, dict) else dict.fromkeys(self.pools, count)
        for address, number in counts.items():
            if address not in self.pools:
                raise ValueError(f"{address!r} is not one of this mapper's clusters "
                                 f"({', '.join(self.pools)})")
            self.pools[address].add_auto(number)

    def add_user(self, handles: list, concurrency: int | None) -> None:
        """Your actors, each joined to the pool of the cluster its handle came from (created
        under `connection`: a Ray Client handle is called over the connection that made it)."""
        by_worker = {id(_ray_compat.client_worker(pool._connection)): pool
                     for pool in self.pools.values()}
        for handle in handles:
            pool = by_worker.get(id(_ray_compat.connection_of(handle)))
            if pool is None:
                raise ValueError(
                    f"actor {handle!r} was not created over one of this mapper's cluster "
                    f"connections ({', '.join(self.pools)}); a Ray Client actor can only be "
                    "called over the connection that created it, and the mapper calls it over "
                    "its own. Create it under `with m.connection(address):` (not over a "
                    "connection of your own from ray.init), then m.add_replicas([actor]).")
            pool.add_user([handle], concurrency)

    def connection(self, address: str) -> ContextManager[None]:
        """A context manager under which this thread's Ray calls go over this mapper's
        connection to the cluster at ``address`` (see `rhmapper.Mapper.connection`)."""
        pool = self.pools.get(address)
        if pool is None:
            raise ValueError(f"{address!r} is not one of this mapper's clusters "
                             f"({', '.join(self.pools)})")
        if self._closed:  # the connection is closed: a Ray call there would fail or go elsewhere
            raise RhmapperError("this mapper was shut down, and its connection to "
                                f"{address} closed; create a new mapper to use that cluster")
        if pool.unreachable:  # a Ray call over a lost connection would start a local Ray
            raise ConnectionError(f"cluster {address} is unreachable (its replicas left the "
                                  "pool); create a new mapper once it answers again")
        return _ray_compat.using_client_connection(pool._connection)

    def drop(self, count: int) -> None:
        """Drop ``count`` replicas, from the cluster with the most first."""
        if count > len(self.replicas):
            raise ValueError(f"cannot drop {count} replicas: the pool has {len(self.replicas)}")
        for _ in range(count):
            pool = max(self.pools.values(), key=lambda pool: len(pool.replicas))
            pool.drop(1)

    def wait_ready(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for pool in self._open_pools():
            pool.wait_ready(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _open_pools(self) -> list[ReplicaPool]:
        """The pools whose connection answers and is open (none once shut down): a call on a
        closed connection would take it for a lost cluster."""
        return [] if self._closed else [pool for pool in self.pools.values()
                                        if not pool.unreachable]

    def shutdown(self, kill: bool = True) -> None:
        """Shut every reachable cluster's pool down, then close every connection this pool
        opened, so that the process has its own Ray again (or none) as before the mapper; once
        more, nothing. The connections are closed even if a pool's shutdown raised."""
        if self._closed:
            return
        try:
            for pool in self.pools.values():
                if not pool.unreachable:
                    pool.shutdown(kill)
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        """Close this pool's connections (a lost one too: it would keep Ray in client mode)."""
        self._closed = True
        errors = []
        for connection in self._connections:
            try:
                _ray_compat.close_client_connection(connection)
            except Exception as error:  # noqa: BLE001 - the others are closed, then it is raised
                errors.append(error)
        if errors:
            raise errors[0]

    # -- the scheduler's view ---------------------------------------------------------------

    def open_end_signal(self) -> tuple[EndSignal, Callable[[], None]]:
        """One key on every cluster's end board; each pool sends its own board's name."""
        key = uuid.uuid4().hex
        opened = [pool.open_end_signal(key) for pool in self.pools.values()
                  if not pool.unreachable]
        signals = [signal for signal in opened if signal is not None]  # None: lost meanwhile
        if not signals:
            raise self._none_left({})

        def end_everywhere() -> None:
            for _, end in signals:
                end()

        return signals[0][0], end_everywhere

    def _check_alive(self) -> None:
        """Raise `NoReplicasError` when no cluster can take work, naming each cluster's state.

        One cluster's trouble is not the map's: while any cluster has a replica that is ready or
        may yet start, a cluster whose replicas cannot start (past ``ready_timeout``, or no node
        can host one) or are all benched does not fail it. Every cluster's membership is read
        under the lock the pools share, so a replica being replaced is never seen missing; the
        feasibility checks (Ray calls) are made before, without it.
        """
        unschedulable = {address: pool.unschedulable() for address, pool in self.pools.items()
                         if not pool.unreachable}
        with self.slots.lock:
            if self.slots:
                return  # a replica became ready meanwhile
            errors: dict[str, RhmapperError] = {}
            for address, pool in self.pools.items():
                if pool.unreachable:
                    continue
                error = pool.idle_error(unschedulable.get(address))
                if error is None:
                    return  # this cluster may yet take work
                errors[address] = error
            none_left = self._none_left(errors)
        causes = [error.__cause__ for error in errors.values() if error.__cause__ is not None]
        raise none_left from (causes[0] if causes else None)

    def _none_left(self, errors: dict[str, RhmapperError]) -> NoReplicasError:
        """The error of a map no cluster can take work for: ``errors`` says why of each
        reachable cluster that has replicas."""
        states = {}
        for address, pool in self.pools.items():
            error = errors.get(address)
            if pool.unreachable:
                states[address] = "unreachable"
            elif error is None or (not pool.replicas and not isinstance(error, PoolMismatchError)):
                states[address] = "no replicas"
            else:
                states[address] = str(error)
        if all(state in ("unreachable", "no replicas") for state in states.values()):
            return NoReplicasError(
                "no replica is left on any cluster: "
                + "; ".join(f"{address} ({state})" for address, state in states.items())
                + ". Add replicas with m.add_replicas({address: n}) on a cluster that answers, "
                "or create a new mapper once the clusters are back.")
        return NoReplicasError(
            "no replica can take work on any cluster: "
            + "; ".join(f"{address} ({state})" for address, state in states.items()),
            benched=any(getattr(error, "benched", False) for error in errors.values()))

    def wait(self, inbox: Inbox, timeout: float) -> list:
        if not inbox.owed and not self.slots:
            for pool in self.pools.values():
                pool.handle_events()  # a replica may have come back (a benched one's call answered)
            if not self.slots:
                self._check_alive()
        done = wait_for_answers(self._wakeup, inbox, timeout, list(self.pools.values()))
        for pool in self.pools.values():
            pool.handle_events()
        return done

    def notify(self, inbox: Inbox) -> None:
        deliver_input_news(self._wakeup, inbox)

    def submit(self, replica: RayReplica, call: CallSpec, start: int, items: list,
               budget: float | None, inbox: Inbox) -> Any:
        return self._pool_of(replica).submit(replica, call, start, items, budget, inbox)

    def fetch(self, token: Any, replica: RayReplica) -> BatchReply:
        return self._pool_of(replica).fetch(token, replica)

    def abandon(self, token: Any, replica: RayReplica, deadline: float | None) -> None:
        self._pool_of(replica).abandon(token, replica, deadline)

    def sent_at(self, token: Any, replica: RayReplica) -> float | None:
        return self._pool_of(replica).sent_at(token, replica)

    def lost(self, replica: RayReplica, reason: BaseException) -> None:
        self._pool_of(replica).lost(replica, reason)

    def unavailable(self, replica: RayReplica) -> None:
        self._pool_of(replica).unavailable(replica)
