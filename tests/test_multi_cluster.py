"""One mapper over replicas on two Ray clusters (``replicas={"ray://a": n, "ray://b": m}``): both
clusters do work in one map (with constant keyword arguments put on each), your actors from
each connection join, and when one cluster's head
is stopped mid-map the map completes on the other, every result once.

Two independent heads on loopback (``tests/ray_head.py``: own ports, own temp dirs, Ray Client
servers), stopped by pid; the driver runs in a subprocess connected to both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.ray_head import start_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_heads():
    heads = []
    try:
        for _ in range(2):
            heads.append(start_head(num_cpus=2, extra_env={"GRPC_ENABLE_FORK_SUPPORT": "false"}))
        yield heads
    finally:
        for head in heads:
            head.stop()


def driver_env(head, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in head.env.items() if key != "RAY_ADDRESS"}
    env.update(extra)
    return env


BOTH_CLUSTERS = """
    import json, sys
    import ray
    import rhmapper as rm

    a, b = sys.argv[1:3]

    def tagged(x, factor):
        return x * factor, ray.get_runtime_context().get_node_id()

    class Tagger:
        def tag(self, x):
            return x, ray.get_runtime_context().get_node_id()

    m = rm.mapper(tagged, replicas={a: 2, b: 1}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    one_per_call = m.map(range(60), batch_size=1, kwargs={"factor": 3})
    batched = m.map(range(3000), kwargs={"factor": 3})
    m.shutdown()
    # Your actors, created over each connection, join one mapper of a class.
    users = rm.mapper(Tagger, method="tag", replicas={a: 0, b: 0})
    handles = []
    for address, pool in users._backend.pool.pools.items():
        with rhmapper_connection(pool):
            handles.append(ray.remote(Tagger).options(num_cpus=0.1).remote())
    users.add_replicas(handles)
    users.wait_ready(timeout=120)
    from_users = users.map(range(20), batch_size=1)
    print(json.dumps({"values": [v for v, _ in one_per_call], "nodes": sorted({n for _, n in one_per_call}),
                      "batched": [v for v, _ in batched], "user_nodes": sorted({n for _, n in from_users}),
                      "user_values": [v for v, _ in from_users]}))
"""

CONNECTION_HELPER = """
    from rhmapper import _ray_compat

    def rhmapper_connection(pool):
        return _ray_compat.using_client_connection(pool._connection)
"""


def run_driver(script: str, env: dict[str, str], *args: str, timeout: float = 240):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(CONNECTION_HELPER)
                           + textwrap.dedent(script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_one_map_spreads_over_both_clusters(two_heads):
    a, b = two_heads
    done = run_driver(BOTH_CLUSTERS, driver_env(a), a.client_address, b.client_address)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["values"] == [3 * x for x in range(60)]
    assert result["batched"] == [3 * x for x in range(3000)]
    assert len(result["nodes"]) == 2, "both clusters did work"
    assert result["user_values"] == list(range(20)) and len(result["user_nodes"]) == 2


FAILOVER = """
    import json, sys, time, warnings
    import rhmapper as rm

    a, b = sys.argv[1:3]

    def slow(x):
        time.sleep(0.2)
        return x * 5

    m = rm.mapper(slow, replicas={a: 2, b: 2}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    values = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in m.imap(range(80), batch_size=1):
            values.append(value)
            if len(values) == 10:
                print("STOP", flush=True)  # the test stops cluster b now
    print(json.dumps({"values": values, "warnings": [str(w.message) for w in caught],
                      "replicas": m.num_replicas}))
    m.shutdown()
"""


@pytest.mark.timeout(300)
def test_map_completes_on_the_other_cluster_when_one_is_lost(two_heads):
    a, b = two_heads
    env = driver_env(a, RAY_CLIENT_RECONNECT_GRACE_PERIOD="3")
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CONNECTION_HELPER) + textwrap.dedent(FAILOVER),
         a.client_address, b.client_address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "STOP", driver.stderr.read()
        b.stop()  # every process of cluster b, by pid, mid-map
        out, err = driver.communicate(timeout=240)
    finally:
        driver.kill()
    assert driver.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["values"] == [5 * x for x in range(80)], "every result once, in order"
    assert result["replicas"] == 2, "cluster b's replicas left the pool"
    assert any(b.client_address in message and "unreachable" in message
               for message in result["warnings"]), result["warnings"]


EVERY_CLUSTER_LOST = """
    import json, sys, time
    import rhmapper as rm

    a, c = sys.argv[1:3]

    def slow(x):
        time.sleep(0.2)
        return x

    m = rm.mapper(slow, replicas={a: 1, c: 1}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    try:
        for count, _ in enumerate(m.imap(range(200), batch_size=1), 1):
            if count == 4:
                print("STOP", flush=True)  # the test stops both clusters now
        error = None
    except rm.NoReplicasError as caught:
        error = str(caught)
    print(json.dumps({"error": error}))
"""


@pytest.mark.timeout(300)
def test_losing_every_cluster_raises_no_replicas(two_heads):
    a = two_heads[0]
    c = start_head(num_cpus=2, extra_env={"GRPC_ENABLE_FORK_SUPPORT": "false"})
    try:
        driver = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CONNECTION_HELPER)
             + textwrap.dedent(EVERY_CLUSTER_LOST), a.client_address, c.client_address],
            env=driver_env(a, RAY_CLIENT_RECONNECT_GRACE_PERIOD="3"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert driver.stdout.readline().strip() == "STOP", driver.stderr.read()
            a.stop()
            c.stop()
            out, err = driver.communicate(timeout=240)
        finally:
            driver.kill()
    finally:
        c.stop()
    assert driver.returncode == 0, out + err
    error = json.loads(out.strip().splitlines()[-1])["error"]
    assert error is not None and "no replica is left on any cluster" in error, out + err
    assert f"{a.client_address} (unreachable)" in error and f"{c.client_address} (unreachable)" in error
