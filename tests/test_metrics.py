"""rhmapper's Ray metrics reach Ray's Prometheus endpoint, scraped over HTTP, with the values of
what the test ran (counted inside the replicas), and the stacks `Mapper.diagnose` takes.

The session's Ray reports metrics every second (``RAY_metrics_report_interval_ms`` in
conftest.py); its endpoint's port is read from ``ray.nodes()``.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest
import ray

import rhmapper as rm
from tests.ray_head import RHMAPPER, client_env

pytestmark = pytest.mark.timeout(180)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample of this node's Prometheus endpoint: (name, labels, value)."""
    node_id = ray.get_runtime_context().get_node_id()
    [port] = [node["MetricsExportPort"] for node in ray.nodes() if node["NodeID"] == node_id]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match[1], dict(_LABEL.findall(match[2] or "")), float(match[3])))
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (over Ray's own labels,
    such as the process's WorkerId)."""
    return sum(value for sample_name, sample_labels, value in samples if sample_name == name
               and all(sample_labels.get(key) == wanted for key, wanted in labels.items()))


def eventually(check, seconds: float = 30.0):
    """``check()``'s value once it is truthy (the endpoint lags the map by a report interval)."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def flaky(x: int, folder: str) -> int:
    """Items divisible by 10 fail once (their first attempt), item 13 every time; item 21 kills
    its replica once; item 31 sleeps past the map's timeout on its first attempt. Each attempt
    leaves a file, so the test counts attempts made inside the replicas."""
    attempt = len([name for name in os.listdir(folder) if name.startswith(f"{x}-")])
    open(os.path.join(folder, f"{x}-{attempt}-{uuid.uuid4().hex}"), "w").close()
    if x == 21 and attempt == 0:
        os._exit(1)
    if x == 31 and attempt == 0:
        time.sleep(6)
    if x == 13 or (x % 10 == 0 and attempt == 0):
        raise ValueError(x)
    return x


def test_counts_reach_prometheus_with_the_values_run_in_the_replicas(ray_local, tmp_path):
    name = f"metrics_{uuid.uuid4().hex[:6]}"
    with rm.mapper(flaky, replicas=2, env=rm.Env(name=name)) as m:
        results = m.map(range(40), kwargs={"folder": str(tmp_path)}, batch_size=1,
                        timeout=3, retries=rm.Retries(max_retries=1, retry_on=(ValueError,)),
                        return_exceptions=True)
        stats = m.stats()
    attempts: dict[int, int] = {}
    for file in os.listdir(tmp_path):
        item = int(file.split("-")[0])
        attempts[item] = attempts.get(item, 0) + 1
    assert isinstance(results[13], ValueError) and isinstance(results[31], TimeoutError)
    ok = [x for x in range(40) if results[x] == x]
    assert len(ok) == 40 - 2 and attempts[13] == 2 and attempts[21] == 2
    failed_attempts = 4 + 2  # items 0, 10, 20 and 30 once, 13 twice (retried once)
    timed_out = 1  # item 31 (TimeoutError is not retried here)

    expected = {"ray_rhmapper_items_done_total": len(ok),
                "ray_rhmapper_items_failed_total": failed_attempts,
                "ray_rhmapper_items_retried_total": 4 + 1,
                "ray_rhmapper_items_timed_out_total": timed_out,
                "ray_rhmapper_replica_deaths_total": 1}

    def exported(samples) -> dict[str, float]:
        return {metric: total(samples, metric, mapper=name) for metric in expected}

    # Each process reports every second: wait until the last counts made it.
    samples = eventually(lambda: (lambda s: s if exported(s) == expected else None)(scrape()))
    assert samples, f"Prometheus shows {exported(scrape())}, not {expected}"
    # One call per attempt answered (batch_size=1): the attempt that killed its replica and
    # the one that timed out never answered.
    calls = sum(attempts.values()) - 1 - timed_out
    assert total(samples, "ray_rhmapper_call_seconds_count", mapper=name) == calls
    assert total(samples, "ray_rhmapper_item_seconds_count", mapper=name) == calls
    # Every call carried one item (Ray's histogram sums are not exact: its buckets are).
    assert total(samples, "ray_rhmapper_batch_size_bucket", mapper=name, le="1.0") == calls
    assert total(samples, "ray_rhmapper_batch_size_count", mapper=name) == calls
    for replica in stats.replicas:  # those in the pool at the end, each under its own tag
        assert total(samples, "ray_rhmapper_item_seconds_count", mapper=name,
                     replica=replica.name) >= replica.calls > 0


def sleepy(x: float) -> float:
    time.sleep(x)
    return x


def test_gauges_show_calls_in_flight_backlog_and_replicas_while_a_map_runs(ray_local):
    name = f"gauges_{uuid.uuid4().hex[:6]}"
    with rm.mapper(sleepy, replicas=2, concurrency=2, env=rm.Env(name=name)) as m:
        m.wait_ready(timeout=60)
        # A map of about 7 s (60 items of 0.5 s, 4 at a time), run by a thread of its own.
        mapping = threading.Thread(target=m.map, args=([0.5] * 60,), kwargs={"batch_size": 1})
        mapping.start()

        def busy():
            samples = scrape()
            if (total(samples, "ray_rhmapper_calls_in_flight", mapper=name) >= 4
                    and total(samples, "ray_rhmapper_backlog_items", mapper=name) > 0):
                return samples
            return None

        samples = eventually(busy, 20)
        mapping.join(60)
        assert samples, "the gauges never showed the running map"
        assert total(samples, "ray_rhmapper_replicas", mapper=name, state="ready") == 2
        assert total(samples, "ray_rhmapper_backlog_items", mapper=name) <= 60 - 4
        assert not mapping.is_alive()
    gone = eventually(lambda: total(scrape(), "ray_rhmapper_replicas", mapper=name,
                                    state="ready") == 0, 20)
    assert gone, "the replicas gauge still counts the shut-down pool"


def test_metrics_off_exports_nothing(ray_local):
    quiet, heard = (f"{kind}_{uuid.uuid4().hex[:6]}" for kind in ("quiet", "heard"))
    with rm.mapper(sleepy, replicas=1, env=rm.Env(name=quiet), metrics=False) as off, \
            rm.mapper(sleepy, replicas=1, env=rm.Env(name=heard)) as on:
        assert off.map([0.0] * 5) == [0.0] * 5 and on.map([0.0] * 5) == [0.0] * 5
        assert off.stats().replicas[0].items == 5  # stats are kept all the same
    # Once the mapper with metrics on shows its items, the one without has shown nothing.
    samples = eventually(lambda: (lambda s: s if total(
        s, "ray_rhmapper_items_done_total", mapper=heard) == 5 else None)(scrape()))
    assert samples, "the mapper with metrics on never reached Prometheus"
    assert not [sample for sample in samples if sample[1].get("mapper") == quiet]


def diagnosed_while_running(m: rm.Mapper, items: list, long_item: int
                            ) -> tuple[rm.Diagnosis, rm.MapperStats]:
    """``m.diagnose()`` and ``m.stats()`` once the call of ``long_item`` has run a second, the
    map run by a thread of its own (a suspended imap would send nothing more), then cancelled."""
    cancelled = []

    def run():
        try:
            m.map(items, batch_size=1)
        except rm.MapCancelledError as error:
            cancelled.append(error)

    mapping = threading.Thread(target=run)
    mapping.start()
    try:
        found = eventually(lambda: [call for call in m.diagnose(limit=1, stacks=False).calls
                                    if call.first_item == long_item and call.seconds > 1], 60)
        assert found, "the long item never ran"
        diagnosis, stats = m.diagnose(limit=1), m.stats()
    finally:
        m.cancel()
        mapping.join(60)
    assert cancelled and not mapping.is_alive()
    return diagnosis, stats


def test_diagnose_names_the_longest_call_its_process_and_its_stack(ray_local):
    pool = f"stuck_{uuid.uuid4().hex[:6]}"
    with rm.mapper(sleepy, replicas=2, env=rm.Env(name=pool)) as m:
        diagnosis, _ = diagnosed_while_running(m, [0.01] * 40 + [60.0], long_item=40)
        # The command, in a process of its own, sees the same replica's stack.
        command = subprocess.run(
            [RHMAPPER, "diagnose", pool, "--address", ray.get_runtime_context().gcs_address],
            env=client_env(), capture_output=True, text=True, timeout=120)
    longest = diagnosis.calls[0]
    assert (longest.first_item, longest.items) == (40, 1)
    assert longest.seconds > 0 and longest.times_p99 > 1
    assert longest.replica.startswith("stuck_") and longest.pid > 0
    stack = diagnosis.stacks[(longest.node_id, longest.pid)]
    assert "sleepy (" in stack and "batch_runner.py" in stack, stack
    assert "item 40 of map" in str(diagnosis) and "sleepy (" in str(diagnosis)
    assert command.returncode == 0, command.stderr
    assert f"{longest.replica} (node {longest.node_id}, pid {longest.pid}):" in command.stdout
    assert "sleepy (" in command.stdout, command.stdout
    unknown = subprocess.run(
        [RHMAPPER, "diagnose", "no_such_pool", "--address",
         ray.get_runtime_context().gcs_address],
        env=client_env(), capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1 and "no pool named 'no_such_pool'" in unknown.stderr


def test_stats_and_diagnose_of_a_mapper_on_the_cluster(ray_local):
    """The host on the cluster keeps the counters and takes the stacks; the driver asks it."""
    with rm.mapper(sleepy, replicas=2, on_cluster=True) as m:
        assert m.map([0.0] * 30, batch_size=1) == [0.0] * 30
        assert sum(replica.calls for replica in m.stats().replicas) == 30
        diagnosis, stats = diagnosed_while_running(m, [0.01] * 10 + [30.0], long_item=10)
    [snapshot] = stats.maps
    assert snapshot.done == 10 and snapshot.in_flight == 1
    [longest] = diagnosis.calls
    assert (longest.first_item, longest.items) == (10, 1)
    assert "sleepy (" in diagnosis.stacks[(longest.node_id, longest.pid)]
