"""Mapper and mapper(): the user-facing verbs, wiring env, replicas, scheduler and progress.

`rhmapper.arguments` checks ``rm.mapper``'s arguments into a `MapperSpec`; the pool's verbs
(adding, dropping and listing replicas, shutdown) are `rhmapper.pool_verbs.PoolVerbs`, the base
of `Mapper`; the map verbs are here.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from rhmapper.arguments import spec_of
from rhmapper.async_verbs import AsyncVerbs
from rhmapper.checks import check_count, check_seconds
from rhmapper.connect import ensure_ray
from rhmapper.durable import Checkpointing, absolute_if_local
from rhmapper.env import Env
from rhmapper.errors import RhmapperError
from rhmapper.map_inputs import check_inputs, items_of, stream_source
from rhmapper.module import Module, is_async_callable, target_fingerprint
from rhmapper.pacing import Pacer
from rhmapper.options import MapOptions, MapSettings, StreamOptions
from rhmapper.pool_verbs import PoolVerbs
from rhmapper.progress import Progress
from rhmapper.backend import Backend, MapperSpec
from rhmapper.autoscaling import Autoscale
from rhmapper.batching import Batched
from rhmapper.lanes import Lane, SharedRuns
from rhmapper.retries import Retries
from rhmapper.plan import DEFAULT_MAX_CALL_BYTES, DEFAULT_WINDOW, MapPlan, MapStats
from rhmapper import spawned
from rhmapper.signals import start_board
from rhmapper.wire import CallSpec

if TYPE_CHECKING:  # annotations only: not a run-time dependency
    from typing_extensions import Unpack


class Mapper(AsyncVerbs, PoolVerbs):
    """Maps a function, or a method of a stateful class, over inputs on a pool of Ray actors.

    Build one with `mapper`. A ``Mapper`` holds its replicas until `shutdown` (or the
    end of a ``with`` block); every map verb shares them.

    Examples:
        >>> import rhmapper as rm
        >>> def double(x):
        ...     return 2 * x
        >>> with rm.mapper(double, replicas=2) as m:
        ...     m.map([1, 2, 3])
        [2, 4, 6]
    """

    def __init__(
        self,
        obj: Callable | type | Module,
        method: str | None = None,
        replicas: int | list | dict[str, int] | Autoscale = 1,
        env: Env | None = None,
        concurrency: int | None = None,
        ready_timeout: float | None = None,
        replace_mismatched: bool = False,
        max_call_bytes: int = DEFAULT_MAX_CALL_BYTES,
        on_cluster: bool = False,
        compiled_graphs: bool = False,
        batched: bool | Batched = False,
        metrics: bool = True,
    ) -> None:
        spec = spec_of(obj, method, replicas, env, concurrency, ready_timeout, replace_mismatched,
                       max_call_bytes, on_cluster, compiled_graphs, batched, metrics)
        super().__init__(spec, _backend_of(spec, on_cluster))
        self.method, self.env, self.max_call_bytes = spec.method, spec.env, spec.max_call_bytes
        self.on_cluster = on_cluster
        self.clusters = list(spec.clusters)
        """The Ray Client addresses of a mapper over several clusters (``replicas={...}``)."""
        self.compiled_graphs = compiled_graphs
        """Whether calls to auto replicas go over a compiled graph each."""
        self._cancel_events: set[threading.Event] = set()
        batched = spec.batched
        self._shared = None if batched is None else SharedRuns(
            self._start_shared, self.max_call_bytes, batched.max_wait_ms / 1000,
            batched.max_size)
        try:
            self.add_replicas(replicas)
        except BaseException:
            self.shutdown()  # its user never gets it to shut down: its replicas, connections
            raise

    # -- the verbs --------------------------------------------------------------------------

    def map(self, *iterables: Iterable, **options: Unpack[MapOptions]) -> list:
        """Like builtin ``map(fn, *iterables)`` on the replicas: a list of results in input order.

        Args:
            iterables: one iterable per positional argument; their lengths must be equal.
            options: keyword-only `MapOptions`: ``method``, ``kwargs``, ``retries``,
                ``return_exceptions``, ``timeout``, ``batch_size``, ``progress``,
                ``max_replica_crashes``.

        Examples:
            >>> with rm.mapper(pow, replicas=2) as m:
            ...     m.map([2, 3], [2, 2], retries=1)
            [4, 9]
        """
        items, star = items_of("map", iterables)
        return self._collect(items, star, MapSettings.of(options, stream=False))

    def starmap(self, iterable: Iterable[Iterable], **options: Unpack[MapOptions]) -> list:
        """Like ``itertools.starmap``: each input is a tuple of arguments. Options as in `map`.

        Examples:
            >>> with rm.mapper(pow, replicas=2) as m:
            ...     m.starmap([(2, 2), (3, 2)])
            [4, 9]
        """
        check_inputs("starmap", (iterable,))
        return self._collect(list(iterable), True, MapSettings.of(options, stream=False))

    def imap(self, *iterables: Iterable, **options: Unpack[StreamOptions]) -> Iterator:
        """Lazy, ordered `map`: pulls inputs only as slots free, yields results in input order.

        At most ``window`` items (a `StreamOptions`, default 16,384) are pulled from the input
        and not yet yielded, so memory stays bounded for endless inputs. Other options as in
        `map`.

        Examples:
            >>> with rm.mapper(abs, replicas=2) as m:
            ...     list(m.imap(range(-2, 2), window=8))
            [2, 1, 0, 1]
        """
        return self._stream(iterables, True, MapSettings.of(options))

    def imap_unordered(self, *iterables: Iterable, **options: Unpack[StreamOptions]) -> Iterator:
        """Lazy `map` that yields each result as soon as it is ready. Options as in `imap`.

        Examples:
            >>> with rm.mapper(abs, replicas=2) as m:
            ...     sorted(m.imap_unordered(range(-2, 2)))
            [0, 1, 1, 2]
        """
        return self._stream(iterables, False, MapSettings.of(options))

    def call(self, /, *args: Any, **kwargs: Any) -> Any:
        """Run one call on the least-loaded replica (ties taken in turn) and return its result.
        On a batched mapper, the calls and maps of all threads share batches (see
        `rm.Batched`).

        Examples:
            >>> with rm.mapper(pow, replicas=2) as m:
            ...     m.call(2, 10)
            1024
        """
        return self._collect([args], True, self._call_settings(kwargs))[0]

    def broadcast(self, method: str, /, *args: Any, **kwargs: Any) -> list:
        """Call ``method`` once on every replica; a list of results in replica order.

        Examples:
            >>> import collections
            >>> with rm.mapper(rm.module(collections.Counter, "aab"), method="most_common",
            ...                replicas=2) as m:
            ...     m.broadcast("update", "b")
            ...     m.map([1, 2])
            [None, None]
            [[('a', 2)], [('a', 2), ('b', 2)]]
        """
        self.spec.method_of(method)
        return self._backend.start_broadcast(method, args, kwargs).answers()

    def spawn_map(self, *iterables: Iterable, name: str,
                  keep_seconds: float = spawned.DEFAULT_KEEP_SECONDS,
                  max_result_bytes: int = spawned.DEFAULT_MAX_RESULT_BYTES,
                  **options: Unpack[MapOptions]) -> spawned.SpawnedMap:
        """Start a `map` that keeps running on the cluster when this driver goes away; return
        its handle (`rhmapper.spawned.SpawnedMap`: ``status()``, ``results()``,
        ``iter_results()``, ``cancel()``, ``delete()``). Any driver finds it again with
        `rhmapper.get_map` ``(name)``. Needs ``rm.mapper(..., on_cluster=True)``.

        The inputs are shipped to the mapper's host first. The results are kept in the host's
        memory until collected (``results()`` reads and deletes them), deleted, or for
        ``keep_seconds`` after the map ends (default a day); a map whose results outgrow
        ``max_result_bytes`` (default 1 GiB) fails. With ``checkpoint=URI`` the results are
        saved there as they finish instead, with no size limit, and ``iter_results()`` reads
        them from it once the map ended; spawned again with the same name and checkpoint (after
        a crash of the host or the cluster), it runs only the inputs without a result. Options
        as in `map` (no progress bar). ``ObjectRef`` inputs must outlive this driver
        (``kwargs=`` values are copied to the host).

        Examples:
            >>> with rm.mapper(abs, replicas=1, on_cluster=True) as m:
            ...     spawned = m.spawn_map([-1, 2, -3], name="doc_spawn")
            ...     spawned.results()
            [1, 2, 3]
        """
        keep_seconds = check_seconds("keep_seconds", keep_seconds)
        max_result_bytes = check_count("max_result_bytes", max_result_bytes)
        if not self.on_cluster:
            raise RhmapperError(
                "spawn_map runs the map on the cluster, without this driver: create the mapper "
                "with rm.mapper(..., on_cluster=True)")
        if not isinstance(name, str) or not name:
            raise ValueError(f"spawn_map needs a name (a non-empty str) to find the map again, "
                             f"got {name!r}")
        self._check_open()
        items, star = items_of("spawn_map", iterables)
        plan = self._plan(star, MapSettings.of(options, stream=False), collect=True,
                          total=len(items), window=None)
        return self._backend.spawn(name, plan, items, keep_seconds, max_result_bytes)

    def cancel(self) -> None:
        """Cancel every map running on this mapper (from another thread): in-flight calls are
        cancelled and the map raises `MapCancelledError`.

        Examples:
            >>> import threading, time
            >>> with rm.mapper(time.sleep, replicas=1) as m:
            ...     threading.Timer(0.5, m.cancel).start()
            ...     m.map([5, 5], batch_size=1)
            Traceback (most recent call last):
            ...
            rhmapper.errors.MapCancelledError: the map was cancelled with Mapper.cancel()
        """
        for event in list(self._cancel_events):
            event.set()

    def __repr__(self) -> str:
        return (f"Mapper(env={self.env.name!r}, method={self.method!r}, "
                f"replicas={self.num_replicas}, concurrency={self.concurrency})")

    # -- plumbing ---------------------------------------------------------------------------

    def _plan(self, star: bool, settings: MapSettings, **shape: Any) -> MapPlan:
        method = settings.method or self.method
        target = self.spec.method_of(method) if method else self.spec.target
        kwargs = self._backend.put_kwargs(settings.kwargs) if settings.kwargs else None
        batched = self.spec.batched
        call = CallSpec(method=method or "fn", star=star, kwargs=kwargs,
                        is_async=is_async_callable(target), batched=batched is not None)
        checkpoint = None if settings.checkpoint is None else Checkpointing(
            absolute_if_local(settings.checkpoint),
            target_fingerprint(self.spec.target, method, settings.kwargs, star),
            settings.overwrite)
        return MapPlan(call=call, retries=Retries.of(settings.retries), checkpoint=checkpoint,
                       return_exceptions=settings.return_exceptions, timeout=settings.timeout,
                       batch_size=settings.batch_size if batched is None
                       else batched.size_of(settings.batch_size),
                       max_replica_crashes=settings.max_replica_crashes,
                       max_call_bytes=self.max_call_bytes, **shape,
                       **({} if batched is None else
                          {"max_wait_seconds": batched.max_wait_ms / 1000}))

    def _run(self, plan: MapPlan, source: Iterator | list, progress: bool | None,
             total: int | None, pacer: Pacer | None = None) -> Iterator[list]:
        self._check_open()
        bar = Progress(progress, total, self.env.name)
        cancelled = threading.Event()
        self._cancel_events.add(cancelled)

        def on_progress(done: int, stats: MapStats, ready: int) -> None:
            bar.update(done, stats, ready)

        try:
            yield from self._backend.run(plan, source, on_progress, cancelled, pacer)
        finally:
            self._cancel_events.discard(cancelled)
            bar.close()

    def _collect(self, items: list, star: bool, settings: MapSettings) -> list:
        if not items:
            return []
        if self._shares(settings):
            return self._lane(star, settings, items, ordered=True).collect()
        plan = self._plan(star, settings, collect=True, total=len(items), window=None)
        *_, results = self._run(plan, items, settings.progress, len(items))
        return results

    def _stream(self, iterables: tuple, ordered: bool, settings: MapSettings) -> Iterator:
        check_inputs("imap", iterables)
        source, star = stream_source(iterables)
        if self._shares(settings):
            return self._lane_values(star, settings, source, ordered)
        return self._values(self._stream_run(iterables, source, star, ordered, settings))

    def _stream_run(self, iterables: tuple, source: Iterator | list, star: bool, ordered: bool,
                    settings: MapSettings, pacer: Pacer | None = None) -> Iterator[list]:
        """The chunks of a streaming map (``imap``) of ``source``."""
        total = min(operator.length_hint(iterable, -1) for iterable in iterables)
        plan = self._plan(star, settings, ordered=ordered, total=total if total >= 0 else None,
                          window=settings.window)
        return self._run(plan, source, settings.progress, plan.total, pacer)

    def _call_settings(self, kwargs: dict) -> MapSettings:
        """The settings of `call`: one item, shared batches on a batched mapper."""
        return MapSettings(kwargs=kwargs or None, batch_size="auto" if self._shared else 1,
                           progress=False)

    # -- shared runs of a batched mapper ----------------------------------------------------

    def _shares(self, settings: MapSettings) -> bool:
        """Whether a map with ``settings`` shares batches with other callers (`rhmapper.lanes`):
        on a batched mapper, with the default ``batch_size`` and no ``progress=True``."""
        return (self._shared is not None and settings.batch_size == "auto"
                and settings.progress is not True and settings.checkpoint is None)

    def _lane(self, star: bool, settings: MapSettings, source: Iterator | list, ordered: bool,
              window: int | None = None) -> Lane:
        self._check_open()
        assert self._shared is not None
        options = dataclasses.replace(settings, kwargs=None, return_exceptions=False,
                                      progress=None, window=DEFAULT_WINDOW)
        return self._shared.lane((star, options), settings.kwargs, source, ordered=ordered,
                                 window=window, return_exceptions=settings.return_exceptions)

    def _lane_values(self, star: bool, settings: MapSettings, source: Iterator | list,
                     ordered: bool) -> Iterator:
        """An ``imap`` of a batched mapper: its lane joins when iterated."""
        yield from self._lane(star, settings, source, ordered, settings.window).values()

    def _start_shared(self, options: tuple[bool, MapSettings], kwargs: dict | None,
                      source: Iterator) -> Iterator[list]:
        """The map of a shared run (see `rhmapper.lanes.SharedRuns`)."""
        star, settings = options
        plan = self._plan(star, dataclasses.replace(settings, kwargs=kwargs,
                                                    return_exceptions=True),
                          ordered=False, indexed=True, total=None, window=None)
        return self._run(plan, source, False, None)

    @staticmethod
    def _values(chunks: Iterator[list]) -> Iterator:
        """The results one by one, keeping no reference to those already yielded."""
        for chunk in chunks:
            chunk.reverse()
            while chunk:
                yield chunk.pop()


def _backend_of(spec: MapperSpec, on_cluster: bool) -> Backend:
    """Where the maps of a mapper of ``spec`` run: here, or on its host on the cluster."""
    if spec.clusters:
        return spec.local_backend()
    ensure_ray()
    board, _ = start_board()
    if on_cluster:
        from rhmapper.host_driver import ClusterBackend  # the host's code: loaded if used

        return ClusterBackend(spec, spec.env.actor_options(), board)
    return spec.local_backend()


def mapper(
    obj: Callable | type | Module,
    method: str | None = None,
    replicas: int | list | dict[str, int] | Autoscale = 1,
    env: Env | None = None,
    concurrency: int | None = None,
    ready_timeout: float | None = None,
    replace_mismatched: bool = False,
    max_call_bytes: int = DEFAULT_MAX_CALL_BYTES,
    on_cluster: bool = False,
    compiled_graphs: bool = False,
    batched: bool | Batched = False,
    metrics: bool = True,
) -> Mapper:
    """Create a `Mapper` of ``obj`` over a pool of replicas (Ray actors).

    Args:
        obj: a function; a class (each replica builds it with no arguments) or its
            ``@ray.remote`` class; or `rhmapper.module` ``(cls, *args, **kwargs)``.
        method: for a class, the method to map.
        replicas: how many auto replicas to create, or a list of existing Ray actor handles,
            or ``{"ray://host:10001": n, ...}``: ``n`` auto replicas on each of several clusters,
            joined over Ray Client (see `rhmapper.clusters`), or `rhmapper.Autoscale`
            ``(min=0, max=32, idle_seconds=60)``: as many auto replicas as the work waiting
            needs, stopped when idle (see `rhmapper.autoscaling`).
        env: the `Env` auto replicas run in (if unnamed: named after ``obj``, plus a unique
            suffix, so that no two mappers share a pool by accident).
        concurrency: calls in flight per replica. Auto replicas run ``concurrency`` calls at
            once (Ray's ``max_concurrency``; ``None`` means 1). Your actors get
            ``min(concurrency, their max_concurrency)``, or their own ``max_concurrency`` when
            ``None``: the pool never queues calls an actor cannot start.
        ready_timeout: with no replica ready, fail after this many seconds of waiting for
            replicas to start (``None``: wait as long as it takes).
        replace_mismatched: when named replicas of the env already exist but were built from
            something else (another function or class, constructor arguments, runtime_env,
            compute or concurrency), kill and rebuild them instead of raising
            `PoolMismatchError`.
        max_call_bytes: auto batches carry at most about this many bytes of input per call
            (default 16 MiB, estimated from the items); a larger item goes alone in its call.
        on_cluster: run the dispatch loop and the pool in an actor on the cluster's head node
            (see `rhmapper.host`): the driver sends inputs and receives results in bulk, which
            is much faster from a laptop over Ray Client, and `Mapper.spawn_map` becomes
            possible (maps that outlive the driver).
        compiled_graphs: send each call to an auto replica over a Ray Compiled Graph of its own
            (see `rhmapper.compiled`) instead of an actor call: several times cheaper per call,
            so maps of one item per call run faster. Your method then runs on Ray's
            compiled-graph thread of the actor, not on its main thread (where its constructor
            ran): leave it off for objects bound to the thread that made them (a default
            ``sqlite3`` connection, for one). Auto replicas with ``concurrency=1`` only, of a
            synchronous target, on a driver on the cluster (not over Ray Client).
        batched: ``True`` or `Batched` ``(max_size=...)``: the function (or every method mapped)
            takes a list of up to ``max_size`` items (one list per argument for ``starmap`` and
            maps over several iterables) and returns one value per item; a batch that raises is
            split in halves until the items that raise fail alone (see `rhmapper.batching`).
            A map's ``batch_size`` then defaults to ``max_size`` and may not exceed it.
        metrics: export the pool's counts as Ray application metrics (``ray.util.metrics``,
            see docs/observability.md): on by default; they cost a few microseconds per call.

    Ray is initialised with ``ray.init()`` if it is not yet (``RAY_ADDRESS`` is honoured).

    Examples:
        >>> import rhmapper as rm
        >>> with rm.mapper(abs, replicas=2, env=rm.Env(name="abs", compute={"CPU": 0.5})) as m:
        ...     m.map([-1, -2, 3])
        [1, 2, 3]
    """
    return Mapper(obj, method=method, replicas=replicas, env=env, concurrency=concurrency,
                  ready_timeout=ready_timeout, replace_mismatched=replace_mismatched,
                  max_call_bytes=max_call_bytes, on_cluster=on_cluster,
                  compiled_graphs=compiled_graphs, batched=batched, metrics=metrics)
