"""The driver's side of a mapper on the cluster (``rm.mapper(..., on_cluster=True)``):
`ClusterBackend` creates the mapper's host (`rhmapper.host.MapperHost`, the cluster's side) from
the mapper's `MapperSpec` and runs each map through it: inputs go in chunks of about
`FEED_CHUNK_BYTES`, results come back by long polls.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import uuid
import time
from typing import Any, Callable, Iterator

import ray

from rhmapper import _ray_compat
from rhmapper.autoscaling import ReplicaCount
from rhmapper.broadcasts import Broadcast
from rhmapper.backend import MapperSpec, OnProgress
from rhmapper.errors import MapCancelledError
from rhmapper.host import MAX_CONCURRENCY, TAKE_WAIT_SECONDS, MapperHost
from rhmapper.input_feed import SEQUENCES, InputFeed
from rhmapper.names import NAMESPACE, new_host_name
from rhmapper.pacing import Pacer
from rhmapper.pool_setup import put_kwargs, upload_local_dirs
from rhmapper.plan import DEFAULT_MAX_WAIT_SECONDS, DEFAULT_WINDOW, MapPlan
from rhmapper.remote_errors import add_note
from rhmapper.sizing import mean_item_bytes
from rhmapper import spawned
from rhmapper.diagnosis import Diagnosis
from rhmapper.pool_stats import MapperStats

_log = logging.getLogger(__name__)

FEED_CHUNK_BYTES = 2**20
"""Inputs travel to the host in chunks of about this many bytes (estimated from the items)."""
FIRST_INPUT_CHUNK = 1024
"""An iterator's first chunk carries up to this many items: those its input gives within the
map's max wait (and `FEED_CHUNK_BYTES`), so that the host's first calls are full."""
CHECKPOINT_CLOSE_SECONDS = 60.0
"""How long an early-ended checkpointed map's verb waits for the host to close its checkpoint."""
START_ALL_BYTES = 64 * 2**20
"""A list of inputs up to this size (estimated) goes to the host whole, with the map's start."""


class ClusterBackend:
    """The driver's side of a mapper whose host runs on the cluster (see the module docstring).

    The host is created with the env's ``runtime_env`` (it imports the user's code), no
    resources, on the head node (`rhmapper._ray_compat.HEAD_NODE_RESOURCE`).

    Examples:
        >>> from rhmapper.env import Env
        >>> from rhmapper.signals import start_board
        >>> spec = MapperSpec(target=abs, method=None, env=Env(name="cluster_doc"))
        >>> backend = ClusterBackend(spec, spec.env.actor_options(), start_board()[0])
        >>> backend.add_auto(1); backend.names()
        ['cluster_doc_replica_0']
        >>> backend.shutdown(kill=True)
    """

    def __init__(self, spec: MapperSpec, env_options: dict, driver_board: str) -> None:
        options = upload_local_dirs(env_options)
        host_class = ray.remote(MapperHost)
        self.name = new_host_name()
        self.host = host_class.options(
            name=self.name, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            max_concurrency=MAX_CONCURRENCY, max_restarts=0,
            runtime_env=options.get("runtime_env"),
            resources={_ray_compat.HEAD_NODE_RESOURCE: 0.001},
        ).remote(_ray_compat.RAY_CLOUDPICKLE.dumps(spec), driver_board)

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.host, method).remote(*args))

    def add_auto(self, count: int) -> None:
        self._call("add_replicas", count, None)

    def add_user(self, handles: list, concurrency: int | None) -> None:
        self._call("add_replicas", handles, concurrency)

    def drop(self, count: int) -> None:
        self._call("drop_replicas", count)

    def autoscale(self, autoscale: Any) -> None:
        self._call("add_replicas", autoscale, None)

    def scaling_history(self) -> list:
        return self._call("scaling_history")

    def replica_count(self) -> ReplicaCount:
        return self._call("replica_count")

    def wait_ready(self, timeout: float | None) -> None:
        self._call("wait_ready", timeout)

    def handles(self) -> list:
        return self._call("handles")

    def names(self) -> list[str]:
        return self._call("names")

    def stats(self) -> MapperStats:
        return self._call("stats")

    def diagnose(self, limit: int, stacks: bool) -> Diagnosis:
        return self._call("diagnose", limit, stacks)

    def start_broadcast(self, method: str, args: tuple, kwargs: dict) -> Broadcast:
        answer = self.host.broadcast.remote(method, args, kwargs)
        return Broadcast([answer.future()], lambda: ray.get(answer))

    def put_kwargs(self, kwargs: dict) -> dict:
        return put_kwargs(kwargs)  # the driver's refs; a spawned map's host copies them

    def shutdown(self, kill: bool) -> None:
        try:
            self._call("shutdown", kill)
        except ray.exceptions.RayActorError:
            pass  # the host exits in shutdown: its call ends with the actor

    def run(self, plan: MapPlan, source: Iterator | list, on_progress: OnProgress,
            cancelled: threading.Event, pacer: Pacer | None = None) -> Iterator[list]:
        map_id = uuid.uuid4().hex
        news = threading.Event()
        """Set when the host answers a take, or the input has news (see `_Feeder`)."""

        def tell() -> None:
            news.set()
            if pacer is not None:
                pacer.wake()

        feeder = _Feeder(source, plan.window, plan.total if plan.collect else None,
                         plan.max_wait_seconds, on_news=tell)
        while pacer is not None and feeder.is_empty(wait=False) is None:
            yield from pacer.pauses(TAKE_WAIT_SECONDS)  # the input's first item (or end) wakes it
        # The host streams a list's results in order as they come (not all at the end), so
        # that sending them overlaps with the map.
        hosted_plan = dataclasses.replace(plan, collect=False, ordered=True) if plan.collect else plan
        started = self.host.start.remote(map_id, hosted_plan, *feeder.first_chunk())
        results: list = []
        finished = False
        done = 0
        answer = None
        try:
            while True:
                feeder.top_up(self.host.feed, map_id)
                if cancelled.is_set():
                    raise MapCancelledError("the map was cancelled with Mapper.cancel()")
                if answer is None:
                    answer = self.host.take.remote(map_id, not plan.collect).future()
                    answer.add_done_callback(lambda _: tell())
                if pacer is None:
                    news.wait(feeder.wait_seconds())
                elif not news.is_set():
                    yield from pacer.pauses(feeder.wait_seconds())
                news.clear()  # then what set it is read: the answer, or the input
                if not answer.done():
                    continue
                try:
                    reply = answer.result()
                except ray.exceptions.RayTaskError:
                    ray.get(started)  # the map could not start: raise why
                    raise
                answer = None
                if reply["done"] > done:
                    on_progress(reply["done"] - done, reply["stats"], reply["ready"])
                    done = reply["done"]
                for chunk in reply["chunks"]:
                    feeder.received += len(chunk)
                    if plan.collect:
                        results.extend(chunk)
                    else:
                        yield chunk
                if reply["error"] is not None:
                    finished = True
                    raise _ray_compat.RAY_CLOUDPICKLE.loads(reply["error"])
                if reply["finished"]:
                    finished = True
                    if plan.collect:
                        yield results
                    return
        finally:
            feeder.close()
            if not finished:
                self._cancel_on_host(map_id, plan)

    def _cancel_on_host(self, map_id: str, plan: MapPlan) -> None:
        """End the map on the host; a checkpointed map's verb waits until its checkpoint holds
        what was saved (a run of it right after resumes from all of that)."""
        wait = CHECKPOINT_CLOSE_SECONDS if plan.checkpoint is not None else 0.0
        cancelled = self.host.cancel.remote(map_id, wait)
        if wait:
            try:
                ray.get(cancelled, timeout=wait + 30)
            except (ray.exceptions.RayError, TimeoutError) as error:
                _log.warning("the host did not confirm that the map with checkpoint %s ended "
                             "(%s); its last results may still be being written",
                             plan.checkpoint.uri, error)

    def spawn(self, name: str, plan: MapPlan, items: list, keep_seconds: float,
              max_result_bytes: float) -> "spawned.SpawnedMap":
        """Ship ``items`` to the host and start the spawned map ``name`` there."""
        feeder = _Feeder(items, None, len(items))
        hosted_plan = dataclasses.replace(plan, collect=False, ordered=True, window=None)
        if plan.checkpoint is not None:  # saved, not kept: as they come, the failures by index
            hosted_plan = dataclasses.replace(
                hosted_plan, ordered=False, indexed=True, window=DEFAULT_WINDOW,
                checkpoint=dataclasses.replace(plan.checkpoint, read_back=False))
        ray.get(self.host.spawn.remote(name, hosted_plan, *feeder.first_chunk(), len(items),
                                       keep_seconds, max_result_bytes))
        try:
            ray.get(feeder.top_up(self.host.feed, f"spawn:{name}"))  # all inputs are there
        except BaseException as error:  # a map without all of its inputs must not run on
            try:
                ray.get(self.host.spawned_delete.remote(name), timeout=60)
            except Exception as failed:  # the original error is the one to raise
                add_note(error, f"rhmapper: spawned map {name!r} could not be deleted: {failed}")
            raise
        return spawned.SpawnedMap(name, self.host)


class _Feeder:
    """A map's inputs, taken from ``source`` in chunks of about `FEED_CHUNK_BYTES`, keeping at
    most ``window`` items sent but not yet back (no bound when ``window`` is ``None``: the
    verbs that collect a list already hold every input). An iterator is pulled by an
    `InputFeed`'s thread: a chunk goes when it is full, or once its oldest item waited
    ``max_wait_seconds``; ``on_news`` is called when the input has items or ended."""

    def __init__(self, source: Iterator | list, window: int | None, total: int | None = None,
                 max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
                 on_news: Callable[[], None] | None = None) -> None:
        self._window, self._total = window, total
        self._list = iter(source) if isinstance(source, SEQUENCES) else None
        self._input = None if self._list is not None else InputFeed(
            iter(source), FEED_CHUNK_BYTES, max_wait_seconds, on_news)
        self._per_chunk: int | None = None
        self.sent = 0
        self.received = 0
        self.chunks = 0
        self.exhausted = False

    def is_empty(self, wait: bool) -> bool | None:
        """Whether the input has no item (see `rhmapper.input_feed.InputFeed.is_empty`)."""
        return self._input is not None and self._input.is_empty(wait)

    def first_chunk(self) -> tuple[list, bool]:
        """The chunk that starts the map (waiting for the input's first item, or its end)."""
        if self._input is not None and self._input.is_empty():
            self.exhausted = True
            self.chunks += 1
            return [], True
        chunk = self._next_chunk()
        if chunk is None:  # its items wait for more: an empty chunk 0 starts the map
            self.chunks += 1
            return [], False
        return chunk

    def top_up(self, feed: Any, map_id: str) -> list:
        """Send chunks (``feed.remote(map_id, number, chunk, last)``) while the window allows
        and the input has them; return their refs."""
        sent = []
        while not self.exhausted and (self._window is None
                                      or self.sent - self.received < self._window):
            chunk = self._next_chunk()
            if chunk is None:
                break
            sent.append(feed.remote(map_id, self.chunks - 1, *chunk))
        return sent

    def wait_seconds(self) -> float:
        """How long the driver may wait for the host before held inputs must go."""
        ready_at = None if self._input is None or self.exhausted else self._input.ready_at()
        if ready_at is None:
            return TAKE_WAIT_SECONDS
        return min(TAKE_WAIT_SECONDS, max(0.0, ready_at - time.monotonic()))

    def close(self) -> None:
        """The map ended: pull no more of the input."""
        if self._input is not None:
            self._input.close()

    def _next_chunk(self) -> tuple[list, bool] | None:
        """The next chunk and whether it is the last (``None``: none to send now)."""
        room = self._per_chunk or (16 if self._list is not None else FIRST_INPUT_CHUNK)
        if self._window is not None:
            room = min(room, self._window - (self.sent - self.received))
        if self._input is not None:
            taken = self._input.take(room)
            if taken is None and not self._input.exhausted:
                return None
            chunk, last = ([], True) if taken is None else (taken[1], self._input.exhausted)
        else:
            chunk = list(itertools.islice(self._list, room))
            last = len(chunk) < room
        if self._per_chunk is None and chunk:
            per_item = max(mean_item_bytes(chunk), 1.0)
            self._per_chunk = max(16, int(FEED_CHUNK_BYTES // per_item))
            if self._list is not None and self._window is None and (
                    (self._total or 0) * per_item <= START_ALL_BYTES):
                chunk.extend(self._list)  # a list held by the driver anyway: all in one go
                last = True
        self.exhausted = last
        self.sent += len(chunk)
        self.chunks += 1
        return chunk, last
