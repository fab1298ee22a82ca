"""A pool's counts as Ray application metrics (``ray.util.metrics``): they reach Ray's metrics
agent and its Prometheus endpoint like any Ray application's, named ``ray_rhmapper_...`` there.

Counters and histograms move once per answered call (`rhmapper.pool_stats.PoolBoard` calls
`RayMetrics` as its `MetricsSink`), never per item; gauges are sampled every `GAUGE_SECONDS` by a
thread of their own. Every metric carries the tag ``mapper`` (the pool's name); per-replica ones
also ``replica``. docs/observability.md lists them; docs/grafana_dashboard.json charts them.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

from rhmapper.ticker import Ticker

GAUGE_SECONDS = 2.0
"""How often the gauges (calls in flight, backlog, replicas by state) are sampled."""
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                      30, 60, 120, 300, 600]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384]
REPLICA_TAGS = ("mapper", "replica")


class _Metrics:
    """The metrics themselves: one set per process, shared by its pools (Ray keeps one
    definition per name)."""

    def __init__(self) -> None:
        self.items_done = Counter("rhmapper_items_done", "Items that ran and succeeded.",
                                  REPLICA_TAGS)
        self.items_failed = Counter(
            "rhmapper_items_failed", "Item attempts that failed (retried or not).", REPLICA_TAGS)
        self.items_retried = Counter("rhmapper_items_retried",
                                     "Failed item attempts that are run again.", REPLICA_TAGS)
        self.items_timed_out = Counter("rhmapper_items_timed_out",
                                       "Items whose call outlived timeout=.", REPLICA_TAGS)
        self.replica_deaths = Counter("rhmapper_replica_deaths",
                                      "Replicas that died (or whose cluster was lost).",
                                      REPLICA_TAGS)
        self.item_seconds = Histogram(
            "rhmapper_item_seconds", "Run time per item on the replica, one observation per call.",
            SECONDS_BOUNDARIES, REPLICA_TAGS)
        self.call_seconds = Histogram("rhmapper_call_seconds",
                                      "Time of a call from sending to its answer.",
                                      SECONDS_BOUNDARIES, REPLICA_TAGS)
        self.batch_size = Histogram("rhmapper_batch_size", "Items per call.", BATCH_BOUNDARIES,
                                    ("mapper",))
        self.calls_in_flight = Gauge("rhmapper_calls_in_flight", "Calls in flight.",
                                     REPLICA_TAGS)
        self.backlog = Gauge("rhmapper_backlog_items",
                             "Items of running maps not yet sent (maps of known length).",
                             ("mapper",))
        self.replicas = Gauge("rhmapper_replicas", "Replicas by state.", ("mapper", "state"))


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def _shared() -> _Metrics:
    """The process's metrics, made by the first mapper (mappers may be made in several
    threads at once)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


class RayMetrics:
    """The metrics sink of one pool (``pool.slots.board.sink``), and the thread sampling its
    gauges; `stop` ends the thread.

    Examples:
        >>> from rhmapper.env import Env
        >>> from rhmapper.replicas import ReplicaPool
        >>> pool = ReplicaPool(Env(name="metrics_doc"), target=abs, concurrency=1)
        >>> metrics = RayMetrics(pool, "metrics_doc")
        >>> pool.slots.board.sink is metrics
        True
        >>> metrics.stop(); pool.shutdown()
    """

    def __init__(self, pool: Any, mapper: str) -> None:
        self._pool = pool
        self._metrics = _shared()
        self._mapper = mapper
        self._tags: dict[str, dict[str, str]] = {}
        """The tags of each replica (made once: a dict per call is what costs)."""
        self._mapper_tags = {"mapper": self._mapper}
        self._states_seen: set[str] = set()
        self._gauges_lock = threading.Lock()
        """Held while the gauges are set: a sample running as `stop` zeroes them sets none."""
        self._stopped = False
        pool.slots.board.sink = self
        self._sampler = Ticker(GAUGE_SECONDS, self.sample_gauges, "sampling rhmapper's gauges")

    def stop(self) -> None:
        """Stop sampling the gauges, and set them to zero (the pool is gone)."""
        self._sampler.stop()
        self._pool.slots.board.sink = None
        with self._gauges_lock:
            self._set_gauges({}, {}, 0)
            self._stopped = True

    def _replica_tags(self, replica: str) -> dict[str, str]:
        tags = self._tags.get(replica)
        if tags is None:
            tags = self._tags[replica] = {"mapper": self._mapper, "replica": replica}
        return tags

    def call_answered(self, replica: str, items: int, failed: int, retried: int,
                      run_seconds: float | None, latency_seconds: float) -> None:
        """Count one answered call (see `rhmapper.pool_stats.MetricsSink`)."""
        metrics, tags = self._metrics, self._replica_tags(replica)
        if items > failed:
            metrics.items_done.inc(items - failed, tags)
        if failed:
            metrics.items_failed.inc(failed, tags)
        if retried:
            metrics.items_retried.inc(retried, tags)
        if run_seconds is not None and items:
            metrics.item_seconds.observe(run_seconds / items, tags)
        metrics.call_seconds.observe(latency_seconds, tags)
        if items:  # a call none of whose items started carried no batch
            metrics.batch_size.observe(items, self._mapper_tags)

    def timed_out(self, replica: str, items: int) -> None:
        """Count a call's items that outlived ``timeout=``."""
        self._metrics.items_timed_out.inc(items, self._replica_tags(replica))

    def replica_died(self, replica: str) -> None:
        """Count a replica's death."""
        self._metrics.replica_deaths.inc(1, self._replica_tags(replica))

    def sample_gauges(self) -> None:
        """Set the gauges from the pool as it is now: O(replicas + maps), every few seconds."""
        with self._pool.slots.lock:
            replicas = list(self._pool.replicas)
        in_flight = {replica.name: replica.in_flight for replica in replicas}
        states = collections.Counter(replica.state.value for replica in replicas)
        backlog = sum(running.waiting_items() or 0
                      for running in self._pool.slots.board.running().values())
        with self._gauges_lock:
            if not self._stopped:
                self._set_gauges(in_flight, states, backlog)

    def _set_gauges(self, in_flight: dict[str, int], states: dict[str, int], backlog: int
                    ) -> None:
        metrics = self._metrics
        for replica in set(self._tags) - set(in_flight):  # gone from the pool
            metrics.calls_in_flight.set(0, self._tags.pop(replica))
        for replica, count in in_flight.items():
            metrics.calls_in_flight.set(count, self._replica_tags(replica))
        self._states_seen.update(states)
        for state in self._states_seen:
            metrics.replicas.set(states.get(state, 0), {"mapper": self._mapper, "state": state})
        metrics.backlog.set(backlog, self._mapper_tags)
