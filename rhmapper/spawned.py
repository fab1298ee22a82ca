"""Maps that outlive the driver: `rhmapper.Mapper.spawn_map` ships a map's inputs to the
mapper's host on the cluster and returns a `SpawnedMap`; `get_map` finds it again by name, from
any driver, also after the first one is gone.

A spawned map's results are kept in its host's memory (on the head node) until they are
collected (`SpawnedMap.results` reads them all, then deletes the map), the map is deleted
(`SpawnedMap.delete`), or ``keep_seconds`` have passed since it ended, whichever comes first.
A map whose kept results grow past ``max_result_bytes`` fails with `RhmapperError`. Names are
found through a small detached actor, the directory (``rhmapper_spawned_maps``, no resources).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray

from rhmapper import _ray_compat
from rhmapper.connect import ensure_ray
from rhmapper.errors import RhmapperError
from rhmapper.names import NAMESPACE, SPAWNED_DIRECTORY
from rhmapper.pool_stats import MapSnapshot

DEFAULT_KEEP_SECONDS = 24 * 3600.0
DEFAULT_MAX_RESULT_BYTES = 2**30
READ_WAIT_SECONDS = 1.0


class _Directory:
    """Spawned map name -> the host that runs it."""

    def __init__(self) -> None:
        self._hosts: dict[str, Any] = {}

    def register(self, name: str, host: Any) -> Any:
        """Register ``name``; return the host that already holds it, if any."""
        holder = self._hosts.setdefault(name, host)
        return None if holder is host or holder == host else holder

    def replace(self, name: str, host: Any) -> None:
        self._hosts[name] = host

    def lookup(self, name: str) -> Any:
        return self._hosts.get(name)

    def remove(self, name: str, host: Any) -> None:
        if self._hosts.get(name) == host:  # not a newer map's entry under the same name
            del self._hosts[name]

    def names(self) -> list[str]:
        return sorted(self._hosts)


def directory() -> Any:
    """The cluster's directory of spawned maps (created on first use, detached, no resources)."""
    return ray.remote(_Directory).options(
        name=SPAWNED_DIRECTORY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0).remote()


@dataclass(frozen=True)
class MapStatus:
    """Where a spawned map is: items ``done`` of ``total`` (``failed`` of them failed, their
    exceptions returned as values or raised at the end), and its ``state``: ``"running"``,
    ``"done"``, ``"failed"`` or ``"cancelled"``.

    Examples:
        >>> MapStatus(done=3, total=10, failed=0, state="running").state
        'running'
    """

    done: int
    total: int
    failed: int
    state: str
    stats: MapSnapshot | None = field(default=None, repr=False, compare=False)
    """Its counters as `Mapper.stats` shows a running map's: retries, timeouts, calls in
    flight, items waiting, items per second, p50 / p99 call time."""


class SpawnedMap:
    """A map running on (or finished on) the cluster, by name; see `rhmapper.Mapper.spawn_map`.

    Examples:
        >>> import rhmapper as rm
        >>> with rm.mapper(abs, replicas=1, on_cluster=True) as m:
        ...     spawned = m.spawn_map([-1, -2, 3], name="doc_abs")
        ...     rm.get_map("doc_abs").results()
        [1, 2, 3]
    """

    def __init__(self, name: str, host: Any) -> None:
        self.name = name
        self._host = host

    def __repr__(self) -> str:
        return f"SpawnedMap({self.name!r})"

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(getattr(self._host, method).remote(self.name, *args))
        except ray.exceptions.RayActorError as error:
            raise RhmapperError(
                f"the host of spawned map {self.name!r} is gone (killed, or its node died); its "
                "results are lost") from error

    def status(self) -> MapStatus:
        """Items done, total and failed, and the map's state.

        Examples:
            >>> import rhmapper as rm
            >>> with rm.mapper(abs, replicas=1, on_cluster=True) as m:
            ...     spawned = m.spawn_map([-1, -2], name="doc_status")
            ...     _ = spawned.results(delete=False)
            ...     print(spawned.status())
            ...     spawned.delete()
            MapStatus(done=2, total=2, failed=0, state='done')
        """
        return MapStatus(**self._call("spawned_status"))

    def iter_results(self, delete: bool = True) -> Iterator:
        """The results in input order, each as soon as it and all before it are ready (of a map
        spawned with ``checkpoint=``: once the map ended, read from the checkpoint a batch at a
        time, whatever their size). Once all are read the map is deleted (unless
        ``delete=False``). Raises the map's error (the
        user's exception with its notes, `MapCancelledError`, ...) after the results before it.

        Examples:
            >>> import rhmapper as rm
            >>> with rm.mapper(abs, replicas=1, on_cluster=True) as m:
            ...     spawned = m.spawn_map(range(-3, 0), name="doc_iter")
            ...     [value for value in rm.get_map("doc_iter").iter_results()]
            [3, 2, 1]
        """
        start = 0
        while True:
            reply = self._call("spawned_read", start, READ_WAIT_SECONDS)
            start += len(reply["values"])
            yield from reply["values"]
            if reply["error"] is not None:
                raise _ray_compat.RAY_CLOUDPICKLE.loads(reply["error"])
            if reply["finished"] and start >= reply["emitted"]:
                break
        if delete:
            self.delete()

    def results(self, delete: bool = True) -> list:
        """All results in input order, once the map has ended; then the map is deleted (unless
        ``delete=False``).

        Examples:
            >>> import rhmapper as rm
            >>> with rm.mapper(abs, replicas=1, on_cluster=True) as m:
            ...     m.spawn_map([-5, 6], name="doc_results").results()
            [5, 6]
        """
        return list(self.iter_results(delete))

    def cancel(self) -> None:
        """Stop the map: no new item starts; `results` then raises `MapCancelledError`.

        Examples:
            >>> import time, rhmapper as rm
            >>> with rm.mapper(time.sleep, replicas=1, on_cluster=True) as m:
            ...     spawned = m.spawn_map([1.0] * 5, name="doc_cancel", batch_size=1)
            ...     spawned.cancel()
            ...     spawned.status().state in ("running", "cancelled")
            ...     spawned.delete()
            True
        """
        self._call("spawned_cancel")

    def delete(self) -> None:
        """Cancel the map if it runs, and drop its results and its name.

        Examples:
            >>> import rhmapper as rm
            >>> with rm.mapper(abs, replicas=1, on_cluster=True) as m:
            ...     m.spawn_map([-1], name="doc_delete").delete()
            ...     rm.get_map("doc_delete")
            Traceback (most recent call last):
            ...
            KeyError: "no spawned map named 'doc_delete'..."
        """
        self._call("spawned_delete")


def get_map(name: str) -> SpawnedMap:
    """The spawned map ``name``, from any driver of the cluster (also after the driver that
    spawned it is gone).

    Examples:
        >>> import rhmapper as rm
        >>> rm.get_map("never_spawned")
        Traceback (most recent call last):
        ...
        KeyError: "no spawned map named 'never_spawned' on this cluster (it was never spawned, or it was collected, deleted or expired)"
    """
    ensure_ray()
    host = ray.get(directory().lookup.remote(name))
    if host is None:
        raise KeyError(f"no spawned map named {name!r} on this cluster (it was never spawned, or "
                       "it was collected, deleted or expired)")
    return SpawnedMap(name, host)


def register(name: str, host: Any) -> None:
    """Claim ``name`` for ``host``'s spawned map; a name still held by a live map is refused."""
    holder = ray.get(directory().register.remote(name, host))
    if holder is None:
        return
    try:
        alive = ray.get(holder.has_spawned.remote(name), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        alive = False
    if alive:
        raise name_taken(name)
    ray.get(directory().replace.remote(name, host))


def name_taken(name: str) -> ValueError:
    return ValueError(f"a spawned map named {name!r} already exists; collect or delete it "
                      f"(rm.get_map({name!r}).delete()), or choose another name")


def unregister(name: str, host: Any) -> None:
    """Release ``name``, if ``host`` still holds it."""
    ray.get(directory().remove.remote(name, host))


def expired(finished_at: float | None, keep_seconds: float) -> bool:
    """Whether a map that ended at ``finished_at`` (monotonic seconds) has been kept long enough.

    Examples:
        >>> expired(None, 10.0), expired(time.monotonic() - 11, 10.0)
        (False, True)
    """
    return finished_at is not None and time.monotonic() - finished_at > keep_seconds
