"""The mapper on the cluster (``rm.mapper(..., on_cluster=True)``): the dispatch loop and the
replica pool run in a Ray actor, the *host*, by default on the head node; the driver sends inputs
and receives results in bulk. This module is the cluster's side; the driver's side,
`rhmapper.host_driver.ClusterBackend`, creates the host and talks to it.

The host builds a `LocalBackend` from the mapper's frozen `MapperSpec` (the scheduler and the
pool are the same code as on a driver) and checks the pool's verbs as `rhmapper.Mapper` does.
Each map is a `HostedMap`: the driver feeds its inputs in chunks (`MapperHost.feed`) and
collects its results and progress with long polls (`MapperHost.take`), so a map costs a few
round trips per chunk, not one per call. Maps started with `Mapper.spawn_map` keep running when
the driver goes away (see `rhmapper.spawned`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from typing import Iterator

import ray

from rhmapper import _ray_compat
from rhmapper.autoscaling import ReplicaCount
from rhmapper.backend import MapperSpec
from rhmapper.checks import check_concurrency, check_count
from rhmapper.errors import MapCancelledError, RhmapperError
from rhmapper.pool_setup import name_taken
from rhmapper.plan import MapPlan, MapStats
from rhmapper.saved_results import SavedResults
from rhmapper.signals import start_board
from rhmapper.sizing import mean_item_bytes
from rhmapper import spawned
from rhmapper.diagnosis import Diagnosis
from rhmapper.pool_stats import MapperStats

logger = logging.getLogger(__name__)

TAKE_WAIT_SECONDS = 0.2
"""A driver's poll for results waits at most this long on the host (then reports progress)."""
DRIVER_CHECK_SECONDS = 5.0
"""How often a host looks whether the driver that created it is still there."""
MAX_CONCURRENCY = 64
"""Threads of a host: one per running map, plus the driver's polls and pool verbs."""


class HostedMap:
    """One map running in the host: its inputs as the driver fed them, its results until the
    driver takes them, its counters, and how it ended.

    Examples:
        >>> hosted = HostedMap(window=None)
        >>> hosted.feed(1, [3], last=True); hosted.feed(0, [1, 2], last=False)
        >>> list(hosted.source())
        [1, 2, 3]
    """

    def __init__(self, window: int | None, keep: bool = False,
                 saved: SavedResults | None = None) -> None:
        self._changed = threading.Condition()
        self.keep = keep
        """Keep every result (a spawned map, read from any position) instead of handing each
        chunk to the driver once."""
        self.saved = saved
        """A checkpointed spawned map's results: read from its checkpoint, not kept here."""
        self.values: list = []
        self.finished_at: float | None = None
        self._inputs: collections.deque = collections.deque()
        self._early: dict[int, tuple[list, bool]] = {}
        """Chunks that arrived before an earlier one (a host runs its calls on many threads)."""
        self._next_chunk = 0
        self._fed_all = False
        self._outbox: list[list] = []
        self.window = window
        self.done = 0
        self.stats = MapStats()
        self.ready = 0
        self.finished = False
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self._cancel_reason: BaseException | None = None
        self.result_bytes = 0.0

    def feed(self, number: int, items: list, last: bool) -> None:
        """The driver's chunk ``number`` (from 0) of inputs; ``last`` if no more follow."""
        with self._changed:
            self._early[number] = (items, last)
            while self._next_chunk in self._early:
                items, last = self._early.pop(self._next_chunk)
                self._next_chunk += 1
                self._inputs.extend(items)
                self._fed_all = self._fed_all or last
            self._changed.notify_all()

    def source(self) -> Iterator:
        """The inputs, blocking until the driver feeds more (or says there are no more)."""
        while True:
            with self._changed:
                while not self._inputs and not self._fed_all and not self.cancelled.is_set():
                    self._changed.wait(TAKE_WAIT_SECONDS)
                if not self._inputs:
                    return
                batch = list(self._inputs)
                self._inputs.clear()
            yield from batch

    def on_progress(self, done: int, stats: MapStats, ready: int) -> None:
        with self._changed:  # read by the next take, at most TAKE_WAIT_SECONDS from now
            self.done += done
            self.stats, self.ready = stats, ready

    def put(self, chunk: list) -> None:
        with self._changed:
            if self.saved is not None:
                self.saved.note(chunk)
            elif self.keep:
                self.values.extend(chunk)
            else:
                self._outbox.append(chunk)
            self._changed.notify_all()

    def finish(self, error: BaseException | None) -> None:
        with self._changed:
            if isinstance(error, MapCancelledError) and self._cancel_reason is not None:
                error = self._cancel_reason
            self.error, self.finished = error, True
            self.finished_at = time.monotonic()
            self._changed.notify_all()

    def read(self, start: int, wait: float) -> dict:
        """The kept results from position ``start`` on, waiting up to ``wait`` seconds for one;
        of a checkpointed map, once it finished, a batch read from its checkpoint."""
        with self._changed:
            self._changed.wait_for(lambda: self.finished or len(self.values) > start, wait)
            reply = {"values": self.values[start:], "emitted": len(self.values),
                     "finished": self.finished,
                     "error": None if self.error is None else _portable(self.error)}
        if self.saved is not None and reply["finished"] and reply["error"] is None:
            reply.update(values=self.saved.read(start), emitted=self.saved.total)
        return reply

    @property
    def fed_all(self) -> bool:
        """Whether every input has arrived."""
        return self._fed_all

    def cancel(self, reason: BaseException | None = None, wait: float = 0.0) -> None:
        """End the map; it fails with ``reason`` if given (else `MapCancelledError`). Waits up
        to ``wait`` seconds for it to end (its checkpoint, if any, written and closed)."""
        with self._changed:
            self._cancel_reason = self._cancel_reason or reason
            self.cancelled.set()
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.finished, wait)

    def take(self, wait: float, eager: bool) -> dict:
        """What happened since the last `take`, waiting up to ``wait`` seconds: for the first
        results if ``eager``, else for the end of the map (fewer, larger replies)."""
        with self._changed:
            self._changed.wait_for(lambda: self.finished or (eager and self._outbox), wait)
            chunks, self._outbox = self._outbox, []
            return {"chunks": chunks, "done": self.done, "stats": self.stats, "ready": self.ready,
                    "finished": self.finished,
                    "error": None if self.error is None else _portable(self.error)}


def _portable(error: BaseException) -> bytes:
    """``error`` pickled for the driver (its own type and notes; pickled by Ray's cloudpickle,
    so that a class of the driver's ``__main__`` arrives as the driver's own class; an error
    that cannot be pickled becomes an `RhmapperError` naming it)."""
    try:
        return _ray_compat.RAY_CLOUDPICKLE.dumps(error)
    except Exception as cause:  # an exception that cannot travel: say what it was
        return _ray_compat.RAY_CLOUDPICKLE.dumps(RhmapperError(
            f"{type(error).__name__}: {error} (the exception could not be sent from the host: "
            f"{cause})"))


class MapperHost:
    """The actor that runs a mapper on the cluster, from the mapper's `MapperSpec` (pickled by
    Ray's cloudpickle). Created by `rhmapper.host_driver.ClusterBackend`.

    Examples:
        >>> import ray
        >>> from rhmapper.env import Env
        >>> spec = MapperSpec(target=abs, method=None, env=Env(name="host_doc"))
        >>> board, _ = start_board()
        >>> host = ray.remote(MapperHost).options(max_concurrency=MAX_CONCURRENCY).remote(
        ...     _ray_compat.RAY_CLOUDPICKLE.dumps(spec), board)
        >>> ray.get(host.add_replicas.remote(1, None)); ray.get(host.names.remote())
        ['host_doc_replica_0']
        >>> try:  # checked as Mapper.broadcast checks it
        ...     ray.get(host.broadcast.remote("predict", (), {}))
        ... except AttributeError as error:
        ...     print(type(error).__name__)
        RayTaskError(AttributeError)
        >>> try:
        ...     ray.get(host.shutdown.remote(True))
        ... except ray.exceptions.RayActorError:
        ...     print("the host exited with its pool")
        the host exited with its pool
    """

    def __init__(self, spec: bytes, driver_board: str | None) -> None:
        self._spec: MapperSpec = _ray_compat.RAY_CLOUDPICKLE.loads(spec)
        start_board()  # as a mapper does when it is created, so that no map waits for it
        self._backend = self._spec.local_backend()
        self._shut_down = False
        self._backend.add_auto(0)  # as a mapper of replicas=0: does the env fit the cluster?
        self._maps: dict[str, HostedMap] = {}
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._driver_board = driver_board
        self._spawned: dict[str, tuple[HostedMap, int, float]] = {}
        """Spawned maps by name: the map, its number of inputs, and how long to keep it."""
        threading.Thread(target=self._watch, daemon=True, name="rhmapper-host-watch").start()

    # -- the pool's verbs -------------------------------------------------------------------

    def add_replicas(self, replicas: int | list, concurrency: int | None) -> None:
        concurrency = check_concurrency(concurrency)
        self._spec.check_open(self._shut_down)
        self._spec.add_replicas(self._backend, replicas, concurrency)

    def scaling_history(self) -> list:
        return self._backend.scaling_history()

    def replica_count(self) -> ReplicaCount:
        return self._backend.replica_count()

    def drop_replicas(self, count: int) -> None:
        self._backend.drop(check_count("count", count, minimum=0))

    def wait_ready(self, timeout: float | None) -> None:
        self._backend.wait_ready(timeout)

    def handles(self) -> list:
        return self._backend.handles()

    def names(self) -> list[str]:
        return self._backend.names()

    def stats(self) -> MapperStats:
        return self._backend.stats()

    def diagnose(self, limit: int, stacks: bool) -> Diagnosis:
        return self._backend.diagnose(limit, stacks)

    def broadcast(self, method: str, args: tuple, kwargs: dict) -> list:
        self._spec.method_of(method)
        return self._backend.start_broadcast(method, args, kwargs).answers()

    def _shutdown_pool(self, kill: bool) -> None:
        """Empty the pool (killing its auto replicas if ``kill``); no replica joins it after."""
        self._backend.shutdown(kill=kill)
        self._shut_down = True

    def shutdown(self, kill: bool) -> None:
        """End the driver's maps; exit (with the pool) unless spawned maps are still kept, in
        which case the host stays until they are collected, deleted or expired."""
        with self._lock:
            running = [hosted for hosted in self._maps.values() if not hosted.keep]
            self._driver_board = "" if self._spawned else self._driver_board
            spawned_left = bool(self._spawned)
        for hosted in running:
            hosted.cancel()
        if not spawned_left:
            self._shutdown_pool(kill)
            ray.actor.exit_actor()

    # -- maps -------------------------------------------------------------------------------

    def start(self, map_id: str, plan: MapPlan, items: list, last: bool) -> None:
        """Start a map with its first chunk of ``items``; the next come with `feed`, the results
        go with `take`."""
        self._launch(map_id, HostedMap(plan.window), plan, items, last)

    def _launch(self, map_id: str, hosted: HostedMap, plan: MapPlan, items: list, last: bool,
                max_result_bytes: float = math.inf) -> None:
        """Register ``hosted`` under ``map_id`` with its first chunk, and run it on a thread."""
        hosted.feed(0, [] if last else items, last)
        with self._registered:
            self._maps[map_id] = hosted
            self._registered.notify_all()
        source = items if last else hosted.source()  # all there: no need to wait for more
        threading.Thread(target=self._run, args=(hosted, plan, source, max_result_bytes),
                         daemon=True, name=f"rhmapper-{map_id}").start()

    def _run(self, hosted: HostedMap, plan: MapPlan, source: Iterator | list,
             max_result_bytes: float = math.inf) -> None:
        error = None
        try:
            for chunk in self._backend.run(plan, source, hosted.on_progress, hosted.cancelled):
                if not chunk:
                    continue
                if hosted.saved is None:  # a checkpointed map's results are not kept here
                    hosted.result_bytes += mean_item_bytes(chunk) * len(chunk)
                    if hosted.result_bytes > max_result_bytes:
                        raise RhmapperError(
                            f"the spawned map's results outgrew max_result_bytes="
                            f"{max_result_bytes:.0f} (they are kept in the host's memory); read "
                            "them as they come with iter_results(), give it a checkpoint=, or "
                            "raise max_result_bytes")
                hosted.put(chunk)
        except BaseException as caught:  # the map's outcome, handed to the driver by take()
            error = caught
        hosted.finish(error)

    def _hosted(self, map_id: str) -> HostedMap:
        """The map ``map_id``, once `start` registered it (the host runs calls on many threads,
        so a driver's next call may arrive first)."""
        with self._registered:
            if not self._registered.wait_for(lambda: map_id in self._maps, timeout=10.0):
                raise RhmapperError(f"no map {map_id} on this host")
            return self._maps[map_id]

    def feed(self, map_id: str, number: int, items: list, last: bool) -> None:
        self._hosted(map_id).feed(number, items, last)

    def take(self, map_id: str, eager: bool, wait: float = TAKE_WAIT_SECONDS) -> dict:
        hosted = self._hosted(map_id)
        reply = hosted.take(wait, eager)
        if reply["finished"]:
            with self._lock:
                self._maps.pop(map_id, None)
        return reply

    def cancel(self, map_id: str, wait: float = 0.0) -> None:
        with self._lock:
            hosted = self._maps.pop(map_id, None)
        if hosted is not None:
            hosted.cancel(wait=wait)

    # -- spawned maps -----------------------------------------------------------------------

    def spawn(self, name: str, plan: MapPlan, items: list, last: bool, total: int,
              keep_seconds: float, max_result_bytes: float) -> None:
        """Start the spawned map ``name`` (the rest of its inputs come with `feed`, under the
        map id ``spawn:<name>``); its results are kept until read, deleted or expired."""
        if name in self._spawned:
            raise spawned.name_taken(name)
        spawned.register(name, ray.get_runtime_context().current_actor)
        if plan.call.kwargs:  # the driver's refs go with the driver: the host owns copies
            kwargs = {key: ray.put(ray.get(ref)) for key, ref in plan.call.kwargs.items()}
            plan = dataclasses.replace(plan, call=dataclasses.replace(plan.call, kwargs=kwargs))
        hosted = HostedMap(None, keep=True, saved=None if plan.checkpoint is None else
                           SavedResults(plan.checkpoint.uri, total))
        with self._lock:
            self._spawned[name] = (hosted, total, keep_seconds)
        self._launch(f"spawn:{name}", hosted, plan, items, last, max_result_bytes)

    def _spawned_map(self, name: str) -> HostedMap:
        with self._lock:
            if name not in self._spawned:
                raise KeyError(f"no spawned map named {name!r} on this host (collected, deleted "
                               "or expired)")
            return self._spawned[name][0]

    def has_spawned(self, name: str) -> bool:
        return name in self._spawned

    def spawned_status(self, name: str) -> dict:
        hosted = self._spawned_map(name)
        if not hosted.finished:
            state = "running"
        elif hosted.error is None:
            state = "done"
        else:
            state = "cancelled" if isinstance(hosted.error, MapCancelledError) else "failed"
        snapshot = self._backend.map_snapshot(hosted.stats, hosted.finished_at)
        return {"done": hosted.done, "total": self._spawned[name][1],
                "failed": hosted.stats.failures, "state": state, "stats": snapshot}

    def spawned_read(self, name: str, start: int, wait: float) -> dict:
        return self._spawned_map(name).read(start, wait)

    def spawned_cancel(self, name: str) -> None:
        self._spawned_map(name).cancel()

    def spawned_delete(self, name: str) -> None:
        self._spawned_map(name)  # KeyError, saying so, if there is none
        self._drop_spawned(name)

    def _drop_spawned(self, name: str) -> None:
        """Cancel and forget the spawned map ``name``, if it is still here."""
        with self._lock:
            entry = self._spawned.pop(name, None)
            self._maps.pop(f"spawn:{name}", None)
        if entry is not None:
            entry[0].cancel()
            spawned.unregister(name, ray.get_runtime_context().current_actor)

    # -- lifetime ---------------------------------------------------------------------------

    def _watch(self) -> None:
        """Every `DRIVER_CHECK_SECONDS`: see `_look_after_maps`. A failed look is logged, and
        the next one comes as usual."""
        while True:
            time.sleep(DRIVER_CHECK_SECONDS)
            try:
                self._look_after_maps()
            except Exception:  # e.g. the directory actor did not answer: look again next time
                logger.exception("rhmapper host %s: looking after its maps failed",
                                 ray.get_runtime_context().get_actor_name())

    def _look_after_maps(self) -> None:
        """Drop spawned maps kept past their time. Once the driver that created this host is
        gone (or shut the mapper down): end its maps, fail the spawned maps whose inputs it had
        not all sent, and exit as soon as no spawned map is left."""
        with self._lock:
            old = [name for name, (hosted, _, keep) in self._spawned.items()
                   if spawned.expired(hosted.finished_at, keep)]
        for name in old:
            self._drop_spawned(name)
        if self._driver_board and name_taken(self._driver_board):
            return
        with self._lock:
            orphans = [hosted for hosted in self._maps.values() if not hosted.keep]
            self._maps = {map_id: hosted for map_id, hosted in self._maps.items() if hosted.keep}
            unfed = [(name, hosted) for name, (hosted, _, _) in self._spawned.items()
                     if not hosted.fed_all]
        for hosted in orphans:
            hosted.cancel()
        for name, hosted in unfed:
            hosted.cancel(RhmapperError(
                f"spawned map {name!r} failed: the driver that spawned it went away before it "
                "had sent all of its inputs; spawn it again"))
        if not self._spawned:
            self._shutdown_pool(kill=not self._spec.env.detached)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
