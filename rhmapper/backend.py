"""Where a mapper's maps run: `LocalBackend` runs the dispatch loop in this process over a
`ReplicaPool`; `rhmapper.host_driver.ClusterBackend` runs the same loop in an actor on the
cluster (`rhmapper.host.MapperHost`).

`rhmapper.Mapper` checks the user's arguments and shows progress; everything it does with
replicas and maps goes through one of these, so that every verb behaves the same on both.
`MapperSpec` is what a mapper was made of, checked and frozen: a `LocalBackend` is built from
it, here or in the host.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from rhmapper.autoscaling import (
    Autoscale,
    ReplicaCount,
    ScalingDecision,
    ScalingPolicy,
    replica_count,
)
from rhmapper.batching import Batched
from rhmapper.broadcasts import Broadcast
from rhmapper.checks import check_count
from rhmapper.env import Env
from rhmapper.durable import DurableMap
from rhmapper.errors import RhmapperError
from rhmapper.module import FunctionReplica, Module
from rhmapper.pacing import Pacer
from rhmapper.replicas import ReplicaPool
from rhmapper.plan import DEFAULT_MAX_CALL_BYTES, MapPlan, MapStats
from rhmapper.results import OnValues
from rhmapper.scheduler import MapRun
from rhmapper.diagnosis import Diagnosis
from rhmapper.metrics import RayMetrics
from rhmapper.pool_stats import MapperStats, MapSnapshot

if TYPE_CHECKING:
    from rhmapper.clusters import MultiClusterPool

OnProgress = Callable[[int, MapStats, "int | str"], None]
"""Called with the items just done, the map's counters and the ready replicas (a count, or a
count per cluster)."""


class Backend(Protocol):
    """What a `rhmapper.Mapper` needs of the place its maps run."""

    def add_auto(self, count: int) -> None: ...

    def add_user(self, handles: list, concurrency: int | None) -> None: ...

    def drop(self, count: int) -> None: ...

    def autoscale(self, autoscale: Autoscale) -> None: ...

    def scaling_history(self) -> list[ScalingDecision]: ...

    def replica_count(self) -> ReplicaCount: ...

    def wait_ready(self, timeout: float | None) -> None: ...

    def handles(self) -> list: ...

    def names(self) -> list[str]: ...

    def start_broadcast(self, method: str, args: tuple, kwargs: dict) -> Broadcast:
        """Call ``method`` on every replica at once (see `rhmapper.broadcasts`)."""

    def put_kwargs(self, kwargs: dict) -> dict:
        """A map's constant keyword arguments, put where its replicas fetch them."""

    def stats(self) -> MapperStats: ...

    def diagnose(self, limit: int, stacks: bool) -> Diagnosis: ...

    def shutdown(self, kill: bool) -> None: ...

    def run(self, plan: MapPlan, source: Iterator | list, on_progress: OnProgress,
            cancelled: threading.Event, pacer: Pacer | None = None) -> Iterator[list]:
        """Run one map: yield chunks of results as the plan's ordering allows, then (for a
        ``collect`` plan) the whole list of results. With a ``pacer`` the map never blocks: it
        yields `rhmapper.pacing.PAUSE` where it would wait (see `rhmapper.pacing`)."""


def method_of(cls: type | None, method: str) -> Callable:
    """The method ``method`` of the mapped class ``cls`` (for a function mapper, ``cls`` is
    ``None``: of its replica class); ``AttributeError`` saying so if there is none.

    Examples:
        >>> method_of(dict, "keys") is dict.keys
        True
        >>> method_of(dict, "predict")
        Traceback (most recent call last):
        ...
        AttributeError: class dict has no method 'predict'; check the method name
    """
    owner = cls or FunctionReplica
    attribute = getattr(owner, method, None)
    if attribute is None or not callable(attribute):
        what = f"class {owner.__name__}" if cls else "a function mapper (it has no methods)"
        raise AttributeError(f"{what} has no method {method!r}; check the method name")
    return attribute


AUTO_ONLY = ("it applies to auto replicas (replicas=N); make a mapper without it for your own "
             "actors")
"""Why ``compiled_graphs=True`` refuses the user's own actors."""


@dataclasses.dataclass(frozen=True)
class MapperSpec:
    """What a mapper maps and how its pool is built, as `rhmapper.Mapper` checked it from the
    user's arguments: frozen, so that the mapper's host on the cluster (`rhmapper.host`) builds
    the same pool from it (`local_backend`) and checks the pool's verbs the same way, without a
    `Mapper`.

    ``target`` is what replicas run: the function, or the `rhmapper.module.Module` each builds.
    ``env`` is named. ``clusters`` are the Ray Client addresses of a mapper over several
    clusters (see `rhmapper.clusters`). ``batched``: its target takes whole batches (see
    `rhmapper.batching`).

    Examples:
        >>> import collections
        >>> from rhmapper.module import module
        >>> counter = MapperSpec(module(collections.Counter), "most_common", Env(name="count"))
        >>> counter.cls.__name__, counter.method_of("update").__name__
        ('Counter', 'update')
        >>> spec = MapperSpec(target=abs, method=None, env=Env(name="spec_abs"))
        >>> spec.method_of("predict")
        Traceback (most recent call last):
        ...
        AttributeError: a function mapper (it has no methods) has no method 'predict'; check the method name
        >>> backend = spec.local_backend()
        >>> spec.add_replicas(backend, 1, None); backend.names()
        ['spec_abs_replica_0']
        >>> backend.shutdown(kill=True)
        >>> spec.check_open(shut_down=True)
        Traceback (most recent call last):
        ...
        rhmapper.errors.RhmapperError: this mapper (env 'spec_abs') was shut down; ...
    """

    target: Callable | Module
    method: str | None
    env: Env
    concurrency: int | None = None
    ready_timeout: float | None = None
    replace_mismatched: bool = False
    max_call_bytes: int = DEFAULT_MAX_CALL_BYTES
    compiled_graphs: bool = False
    clusters: tuple[str, ...] = ()
    batched: Batched | None = None
    metrics: bool = True
    """Export the pool's counts as Ray metrics (see `rhmapper.metrics`)."""

    @property
    def cls(self) -> type | None:
        """The user's class (of a `Module` target), or ``None`` for a function."""
        return self.target.cls if isinstance(self.target, Module) else None

    def method_of(self, method: str) -> Callable:
        """The class's method ``method`` (see `method_of`)."""
        return method_of(self.cls, method)

    def check_open(self, shut_down: bool) -> None:
        """Raise `RhmapperError` if the mapper was shut down."""
        if shut_down:
            raise RhmapperError(
                f"this mapper (env {self.env.name!r}) was shut down; create a new one with "
                "rm.mapper(...) to map again")

    def add_replicas(self, backend: "Backend", replicas: Any, concurrency: int | None) -> None:
        """Add ``replicas`` to ``backend``, checked as `rhmapper.Mapper.add_replicas` says: a
        count of auto replicas, a list of the user's actor handles, or (over several clusters)
        a count per cluster. ``concurrency`` is checked already."""
        if isinstance(replicas, Autoscale):
            if concurrency is not None:
                raise ValueError("add_replicas(rm.Autoscale(...), concurrency=...): concurrency "
                                 "applies to your own actors; set it in rm.mapper(..., "
                                 "concurrency=k)")
            backend.autoscale(replicas)
        elif isinstance(replicas, dict):
            if not self.clusters:
                raise TypeError("replicas={address: count} is for a mapper over several clusters: "
                                "create it with rm.mapper(fn, replicas={'ray://host:10001': n, ...})")
            backend.add_auto({address: check_count(f"replicas[{address!r}]", n, minimum=0)
                              for address, n in replicas.items()})
        elif isinstance(replicas, (list, tuple)):
            if self.compiled_graphs and replicas:
                raise ValueError(f"compiled_graphs=True cannot be used here: {AUTO_ONLY}.")
            if self.cls is None and replicas:
                raise TypeError(
                    "your own actors join a mapper of a class: rm.mapper(Model, method='predict', "
                    "replicas=[actor, ...]); a function mapper runs only on auto replicas")
            for handle in replicas:
                if hasattr(handle, "__ray_call__") and not hasattr(handle, self.method):
                    raise AttributeError(f"actor {handle!r} has no method {self.method!r} to map")
            backend.add_user(list(replicas), concurrency)
        else:
            count = check_count("replicas", replicas, minimum=0,
                                or_else="a list of Ray actor handles")
            if concurrency is not None:
                raise ValueError(
                    "add_replicas(n, concurrency=...) applies to your own actors; auto replicas "
                    "all run the mapper's concurrency (set it in rm.mapper(..., concurrency=k))")
            backend.add_auto(count)

    def local_backend(self) -> "LocalBackend":
        """The dispatch loop in this process over a new, empty pool of this spec: a
        `ReplicaPool`, or a `rhmapper.clusters.MultiClusterPool` over ``clusters``."""
        if self.clusters:
            from rhmapper.clusters import MultiClusterPool  # joins clusters over Ray Client

            pool: ReplicaPool | MultiClusterPool = MultiClusterPool(
                self.env, self.target, self.concurrency, self.ready_timeout,
                self.replace_mismatched, list(self.clusters))
        else:
            pool = ReplicaPool(self.env, self.target, self.concurrency, self.ready_timeout,
                               self.replace_mismatched, compiled_graphs=self.compiled_graphs)
        return LocalBackend(pool, RayMetrics(pool, self.env.name) if self.metrics else None)


class LocalBackend:
    """The dispatch loop in this process, over ``pool``.

    Examples:
        >>> from rhmapper.env import Env
        >>> backend = LocalBackend(ReplicaPool(Env(name="neg"), target=abs, concurrency=1))
        >>> backend.add_auto(1); backend.names()
        ['neg_replica_0']
        >>> backend.shutdown(kill=True)
    """

    def __init__(self, pool: "ReplicaPool | MultiClusterPool",
                 metrics: RayMetrics | None = None) -> None:
        self.pool = pool
        self._metrics = metrics
        self._item_seconds: dict[str, float] = {}
        """The run time of one item per method, as the last map that measured it left it: the
        next map of that method sizes its first calls from it instead of one-item calls."""

    def add_auto(self, count: int) -> None:
        self.pool.add_auto(count)

    def add_user(self, handles: list, concurrency: int | None) -> None:
        self.pool.add_user(handles, concurrency)

    def drop(self, count: int) -> None:
        self.pool.drop(count)

    def autoscale(self, autoscale: Autoscale) -> None:
        if not isinstance(self.pool, ReplicaPool):
            raise TypeError(
                "replicas=rm.Autoscale(...) scales the pool of one cluster; a mapper over several "
                "clusters takes a count per cluster: replicas={'ray://host:10001': n, ...}")
        self.pool.autoscale(autoscale)

    def scaling_history(self) -> list[ScalingDecision]:
        with self.pool.slots.lock:  # the pool's scaler appends under it
            scaling = self._scaling()
            return list(scaling.history) if scaling else []

    def replica_count(self) -> ReplicaCount:
        with self.pool.slots.lock:
            return replica_count(list(self.pool.replicas), self._scaling())

    def _scaling(self) -> ScalingPolicy | None:
        return self.pool.state.scaling if isinstance(self.pool, ReplicaPool) else None

    def wait_ready(self, timeout: float | None) -> None:
        self.pool.wait_ready(timeout)

    def handles(self) -> list:
        return [replica.handle for replica in self.pool.replicas]

    def names(self) -> list[str]:
        return [replica.name for replica in self.pool.replicas]

    def stats(self) -> MapperStats:
        with self.pool.slots.lock:
            replicas = list(self.pool.replicas)
        return self.pool.slots.board.snapshot(replicas)

    def map_snapshot(self, stats: MapStats, ended_at: float | None) -> MapSnapshot:
        """The snapshot of the map of this pool counting in ``stats`` (see
        `rhmapper.pool_stats.PoolBoard.map_snapshot`)."""
        return self.pool.slots.board.map_snapshot(stats, ended_at)

    def diagnose(self, limit: int, stacks: bool) -> Diagnosis:
        calls = self.pool.slots.board.longest_calls(limit)
        processes = {(call.node_id, call.pid) for call in calls if call.pid is not None}
        return Diagnosis(calls, self.pool.stacks(processes) if stacks and processes else {})

    def start_broadcast(self, method: str, args: tuple, kwargs: dict) -> Broadcast:
        return self.pool.start_broadcast(method, args, kwargs)

    def put_kwargs(self, kwargs: dict) -> dict:
        return self.pool.put_kwargs(kwargs)

    def shutdown(self, kill: bool) -> None:
        try:
            if self._metrics is not None:
                self._metrics.stop()
        finally:
            self.pool.shutdown(kill=kill)

    def run(self, plan: MapPlan, source: Iterator | list, on_progress: OnProgress,
            cancelled: threading.Event, pacer: Pacer | None = None) -> Iterator[list]:
        if plan.checkpoint is None:
            yield from self._run(plan, source, on_progress, cancelled, pacer)
            return
        with DurableMap(plan.checkpoint, plan.ordered, plan.indexed) as durable:
            if durable.stored_before:
                on_progress(durable.stored_before, MapStats(), self.pool.ready_replicas())
            chunks = self._run(durable.inner_plan(plan), durable.source(source), on_progress,
                               cancelled, pacer, durable.on_values, durable.collected)
            yield from (chunks if plan.collect else durable.results(chunks))

    def _run(self, plan: MapPlan, source: Iterator | list, on_progress: OnProgress,
             cancelled: threading.Event, pacer: Pacer | None, on_values: OnValues | None = None,
             collected: Callable[[list], list] | None = None) -> Iterator[list]:
        """The map's chunks; a ``collect`` plan's last is its results (``collected`` of them:
        a durable map's merge with the saved ones)."""
        end_signal, end_map = self.pool.open_end_signal()
        method = plan.call.method
        plan = dataclasses.replace(plan, call=dataclasses.replace(plan.call, end_signal=end_signal),
                                   item_seconds_hint=self._item_seconds.get(method))
        pool = self.pool
        run = MapRun(pool, plan, source,
                     lambda done, stats: on_progress(done, stats, pool.ready_replicas()), cancelled,
                     on_values, pacer)
        try:
            yield from run.chunks()
            if plan.collect:
                yield run.results if collected is None else collected(run.results)
        finally:
            end_map()
            if run.item_seconds is not None:
                self._item_seconds[method] = run.item_seconds
