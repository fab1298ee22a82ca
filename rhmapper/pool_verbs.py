"""`PoolVerbs`, the base of `rhmapper.Mapper` that holds its pool: which replicas it has (add,
drop, list, wait for them), its own actors' connection on a mapper over several clusters, and
its end (`PoolVerbs.shutdown`). The map verbs are `rhmapper.Mapper`'s own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ContextManager

from rhmapper.autoscaling import Autoscale, ReplicaCount, ScalingDecision
from rhmapper.backend import Backend, MapperSpec
from rhmapper.checks import check_concurrency, check_count
from rhmapper.diagnosis import Diagnosis
from rhmapper.pool_stats import MapperStats

if TYPE_CHECKING:  # annotations only: not a run-time dependency
    from typing_extensions import Self


class PoolVerbs:
    """The pool of a `rhmapper.Mapper` (its base class), and all the pool's state: the mapper's
    `MapperSpec` (``spec``), the `Backend` its pool lives in, and whether it was shut down.

    Examples:
        >>> with rm.mapper(abs, replicas=1) as m:
        ...     isinstance(m, PoolVerbs), m.num_replicas
        (True, 1)
    """

    def __init__(self, spec: MapperSpec, backend: Backend) -> None:
        self.spec = spec
        """What this mapper was made of, checked (a host on the cluster builds its pool from it)."""
        self._backend = backend
        self._shut_down = False

    def add_replicas(self, replicas: int | list | Autoscale,
                     concurrency: int | None = None) -> None:
        """Add ``replicas`` auto replicas (an int), or the given Ray actor handles (a list); or
        from now on scale the auto replicas with the work waiting (`rhmapper.Autoscale`).

        Auto replicas are created in parallel and take work as soon as each is ready. For your
        actors, ``concurrency`` caps the calls in flight on each (default: the mapper's
        ``concurrency``, else each actor's own ``max_concurrency``); the pool never keeps more
        in flight on an actor than its ``max_concurrency``.

        Examples:
            >>> with rm.mapper(abs, replicas=1) as m:
            ...     m.add_replicas(2)
            ...     m.num_replicas
            3
        """
        concurrency = check_concurrency(concurrency)
        self._check_open()
        self.spec.add_replicas(self._backend, replicas, concurrency)

    def wait_ready(self, timeout: float | None = None) -> Self:
        """Block until every replica has started (maps do not need this: each replica takes work
        as soon as it is ready). Raises ``TimeoutError`` after ``timeout`` seconds.

        Examples:
            >>> with rm.mapper(abs, replicas=2) as m:
            ...     m.wait_ready(timeout=60).num_replicas
            2
        """
        self._backend.wait_ready(timeout)
        return self

    def drop_replicas(self, count: int) -> None:
        """Remove ``count`` replicas: auto replicas first (they are killed), then your actors
        (removed from the pool, never killed).

        Examples:
            >>> with rm.mapper(abs, replicas=2, env=rm.Env(name="drop")) as m:
            ...     m.drop_replicas(1)
            ...     m.replica_names
            ['drop_replica_0']
        """
        self._backend.drop(check_count("count", count, minimum=0))

    @property
    def replicas(self) -> list:
        """The Ray actor handles of the pool, in pool order.

        Examples:
            >>> with rm.mapper(abs, replicas=2) as m:
            ...     [type(handle).__name__ for handle in m.replicas]
            ['ActorHandle', 'ActorHandle']
        """
        return self._backend.handles()

    @property
    def replica_names(self) -> list[str]:
        """The names of the pool's replicas (``<env>_replica_<i>`` for auto replicas).

        Examples:
            >>> with rm.mapper(abs, replicas=2, env=rm.Env(name="double")) as m:
            ...     m.replica_names
            ['double_replica_0', 'double_replica_1']
        """
        return self._backend.names()

    def stats(self) -> MapperStats:
        """A snapshot of the pool and its running maps: per replica its calls, items, failures,
        retries, busy share, items per second, p50 / p99 time per item and deaths; per map
        running its counts, calls in flight, items waiting and rate (see `rhmapper.MapperStats`).
        ``print(m.stats())`` shows it as a table.

        Examples:
            >>> with rm.mapper(abs, replicas=2) as m:
            ...     _ = m.map(range(-50, 50))
            ...     stats = m.stats()
            >>> sum(replica.items for replica in stats.replicas), stats.maps
            (100, [])
        """
        self._check_open()
        return self._backend.stats()

    def diagnose(self, limit: int = 5, stacks: bool = True) -> Diagnosis:
        """Why is it stuck? The ``limit`` calls in flight running longest, each with its items,
        map, replica, node and process, how long it has run against its map's p99 call time,
        and (``stacks=True``) the Python stack of the replica threads running rhmapper's calls,
        taken with ``py-spy dump`` on the replica's node (see `rhmapper.Diagnosis`).
        ``print(m.diagnose())`` shows it. Nothing is stopped.

        Examples:
            >>> import time
            >>> with rm.mapper(time.sleep, replicas=2).wait_ready(timeout=60) as m:
            ...     running = m.imap_unordered([30.0, 0.01], batch_size=1)  # one per replica
            ...     _ = next(running)  # item 1's result: item 0 still sleeps
            ...     diagnosis = m.diagnose(limit=1)
            ...     running.close()
            >>> diagnosis.calls[0].items_text, "batch_runner.py" in str(diagnosis)
            ('item 0', True)
        """
        self._check_open()
        check_count("limit", limit)
        return self._backend.diagnose(limit, stacks)

    @property
    def num_replicas(self) -> ReplicaCount:
        """How many replicas the pool has (ready or starting): an int that also says how many
        are ``ready`` and ``starting``, and the autoscaler's ``target`` (see `rhmapper.Autoscale`;
        for a fixed pool the count itself).

        Examples:
            >>> with rm.mapper(abs, replicas=2) as m:
            ...     count = m.wait_ready(timeout=60).num_replicas
            ...     count, count.ready, count.starting, count.target
            (2, 2, 0, 2)
        """
        return self._backend.replica_count()

    def scaling_history(self) -> list[ScalingDecision]:
        """The autoscaler's recent decisions, oldest first, each with its reason (a pool of
        ``replicas=rm.Autoscale(...)``; empty for a fixed pool).

        Examples:
            >>> with rm.mapper(abs, replicas=rm.Autoscale(min=1, max=2)) as m:
            ...     print(m.scaling_history()[0])
            up by 1 (0 -> 1): below min=1
        """
        return self._backend.scaling_history()

    @property
    def concurrency(self) -> int:
        """The calls in flight on each auto replica: the mapper's ``concurrency``, or 1 when it
        was created with ``concurrency=None`` (the default).

        Your own actors may run a different number: ``min(concurrency, max_concurrency)``, or
        with ``concurrency=None`` their own ``max_concurrency`` (see `add_replicas`).

        Examples:
            >>> with rm.mapper(abs, replicas=1) as m:
            ...     m.concurrency
            1
        """
        return self.spec.concurrency or 1

    def connection(self, address: str) -> ContextManager[None]:
        """A context manager under which this thread's Ray calls go over the mapper's own
        connection to the cluster at ``address``, on a mapper over several clusters
        (``replicas={address: n, ...}``): create your actors there, then `add_replicas` them.

        A Ray Client actor can only be called over the connection that created it, and the
        mapper calls each of your actors over its own connection to the actor's cluster: an
        actor created over a connection of your own (``ray.init(address,
        allow_multiple=True)``) is refused with ``ValueError``. To call the actor yourself,
        do it inside such a block too.

        Examples:
            >>> with rm.mapper(abs, replicas=0) as m:
            ...     m.connection("ray://10.0.0.5:10001")
            Traceback (most recent call last):
            ...
            ValueError: m.connection(address) is for a mapper over several clusters ...
            >>> m = rm.mapper(Model, method="predict", replicas={  # doctest: +SKIP
            ...     "ray://10.0.0.5:10001": 2, "ray://10.1.0.7:10001": 1})
            >>> with m.connection("ray://10.0.0.5:10001"):  # doctest: +SKIP
            ...     actor = ray.remote(Model).remote()
            >>> m.add_replicas([actor])  # doctest: +SKIP
        """
        if not self.spec.clusters:
            raise ValueError(
                "m.connection(address) is for a mapper over several clusters "
                "(rm.mapper(..., replicas={'ray://host:10001': n, ...})); this mapper's Ray "
                "calls go over the driver's own Ray connection: create your actors as usual")
        return self._backend.pool.connection(address)  # a LocalBackend over a MultiClusterPool

    def shutdown(self, kill: bool | None = None) -> None:
        """Empty the pool and kill its auto replicas; your own actors stay alive.

        A detached env's replicas (``Env(detached=True)``) are left running for a later driver
        to attach to, unless ``kill=True``. A mapper over several clusters also closes the Ray
        Client connections it opened, so the process's own Ray (or none) is its Ray again.

        Examples:
            >>> m = rm.mapper(abs, replicas=2)
            >>> m.shutdown(); m.num_replicas
            0
        """
        self._backend.shutdown(kill=not self.spec.env.detached if kill is None else kill)
        self._shut_down = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        """Raise `RhmapperError` if the mapper was shut down."""
        self.spec.check_open(self._shut_down)
