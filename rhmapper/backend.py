"""Where a mapper's maps run: `LocalBackend` runs the dispatch loop in this process over a
`ReplicaPool`; `rhmapper.host.ClusterBackend` runs the same loop in an actor on the cluster.

`rhmapper.Mapper` checks the user's arguments and shows progress; everything it does with
replicas and maps goes through one of these, so that every verb behaves the same on both.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from rhmapper.replicas import ReplicaPool
from rhmapper.scheduler import MapPlan, MapRun, MapStats

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

    def wait_ready(self, timeout: float | None) -> None: ...

    def handles(self) -> list: ...

    def names(self) -> list[str]: ...

    def broadcast(self, method: str, args: tuple, kwargs: dict) -> list: ...

    def put_kwargs(self, kwargs: dict) -> dict:
        """A map's constant keyword arguments, put where its replicas fetch them."""

    def shutdown(self, kill: bool) -> None: ...

    def run(self, plan: MapPlan, source: Iterator, on_progress: OnProgress,
            cancelled: threading.Event) -> Iterator[list]:
        """Run one map: yield chunks of results as the plan's ordering allows, then (for a
        ``collect`` plan) the whole list of results."""


class LocalBackend:
    """The dispatch loop in this process, over ``pool``.

    Examples:
        >>> from rhmapper.env import Env
        >>> backend = LocalBackend(ReplicaPool(Env(name="neg"), target=abs, concurrency=1))
        >>> backend.add_auto(1); backend.names()
        ['neg_replica_0']
        >>> backend.shutdown(kill=True)
    """

    def __init__(self, pool: "ReplicaPool | MultiClusterPool") -> None:
        self.pool = pool

    def add_auto(self, count: int) -> None:
        self.pool.add_auto(count)

    def add_user(self, handles: list, concurrency: int | None) -> None:
        self.pool.add_user(handles, concurrency)

    def drop(self, count: int) -> None:
        self.pool.drop(count)

    def wait_ready(self, timeout: float | None) -> None:
        self.pool.wait_ready(timeout)

    def handles(self) -> list:
        return [replica.handle for replica in self.pool.replicas]

    def names(self) -> list[str]:
        return [replica.name for replica in self.pool.replicas]

    def broadcast(self, method: str, args: tuple, kwargs: dict) -> list:
        return self.pool.broadcast(method, args, kwargs)

    def put_kwargs(self, kwargs: dict) -> dict:
        return self.pool.put_kwargs(kwargs)

    def shutdown(self, kill: bool) -> None:
        self.pool.shutdown(kill=kill)

    def run(self, plan: MapPlan, source: Iterator, on_progress: OnProgress,
            cancelled: threading.Event) -> Iterator[list]:
        end_signal, end_map = self.pool.open_end_signal()
        plan = dataclasses.replace(plan, call=dataclasses.replace(plan.call, end_signal=end_signal))
        pool = self.pool
        run = MapRun(pool, plan, source,
                     lambda done, stats: on_progress(done, stats, pool.ready_replicas()), cancelled)
        try:
            yield from run.chunks()
            if plan.collect:
                yield run.results
        finally:
            end_map()
