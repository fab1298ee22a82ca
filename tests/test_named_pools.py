"""Named detached pools: one driver makes and loads a pool, a later driver attaches to it, and the
``rhmapper`` CLI lists and kills it.

The slow test runs everything as separate processes against a real head on loopback
(``tests/ray_head.py``): its dashboard gives the CLI Ray's state API. The other tests use the
session's local Ray, which has no dashboard, so the CLI reads the GCS instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import ray

import rhmapper as rm
from rhmapper import cli
from tests.ray_head import RHMAPPER, client_env, free_ports, wait_until

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

DRIVER = textwrap.dedent("""
    import json, sys
    import rhmapper as rm
    from pool_state import Store

    m = rm.mapper(rm.module(Store), method="get", replicas=2,
                  env=rm.Env(name="shared", detached=True, compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    if sys.argv[1] == "create":
        m.broadcast("load", "state loaded by driver 1")
    results = m.map(range(8), batch_size=1)
    print(json.dumps({"names": m.replica_names,
                      "ids": [handle._actor_id.hex() for handle in m.replicas],
                      "results": results}))
    m.shutdown()  # a detached pool stays alive for the next driver
""")


def run_driver(head, step: str) -> dict:
    # cwd=tests/: Ray puts a driver's working directory on its workers' sys.path, so the
    # replicas (which outlive this driver) import pool_state.Store from there.
    done = subprocess.run([sys.executable, "-c", DRIVER, step], cwd=TESTS_DIR,
                          env={**head.env, "PYTHONPATH": TESTS_DIR},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def rhmapper_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RHMAPPER, *args], env=env, capture_output=True, text=True, timeout=120)



@pytest.mark.slow
def test_detached_pool_outlives_its_driver_and_the_cli_lists_and_kills_it(head):
    first = run_driver(head, "create")
    assert first["names"] == ["shared_replica_0", "shared_replica_1"]
    assert {r["value"] for r in first["results"]} == {"state loaded by driver 1"}

    second = run_driver(head, "attach")  # a new process: driver 1 has exited
    assert second["names"] == first["names"]
    assert second["ids"] == first["ids"]
    assert [r["item"] for r in second["results"]] == list(range(8))
    assert {r["value"] for r in second["results"]} == {"state loaded by driver 1"}
    assert {r["pid"] for r in second["results"]} <= {r["pid"] for r in first["results"]}
    assert {r["actor_id"] for r in second["results"]} <= set(first["ids"])

    address = ["--address", head.gcs_address]
    table = rhmapper_cli("pools", *address, env=head.env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["POOL", "REPLICAS", "ALIVE", "NODES", "DETACHED"]
    assert ["shared", "2", "2", "1", "yes"] in [line.split() for line in table.stdout.splitlines()]

    for source in ("state", "gcs"):  # the dashboard's state API, and the GCS directly
        listed = rhmapper_cli("pools", *address, "--json", "--source", source, env=head.env)
        assert listed.returncode == 0, listed.stderr
        (pool,) = [p for p in json.loads(listed.stdout) if p["pool"] == "shared"]
        assert (pool["replicas"], pool["alive"], pool["detached"]) == (2, 2, True), pool
        assert sorted(m["pid"] for m in pool["members"]) == sorted(
            {r["pid"] for r in first["results"]})

    # RAY_ADDRESS instead of --address.
    killed = rhmapper_cli("kill", "shared", env=head.env)
    assert killed.returncode == 0, killed.stderr
    assert "killed 2 replica(s) of pool 'shared'" in killed.stdout

    after = rhmapper_cli("pools", *address, "--json", env=head.env)
    assert after.returncode == 0, after.stderr
    assert [p["pool"] for p in json.loads(after.stdout)] == []
    assert "no rhmapper pools" in rhmapper_cli("pools", *address, env=head.env).stdout


def test_cli_without_a_dashboard_reads_the_gcs(ray_local):
    from tests.pool_state import Store

    env = rm.Env(name="nodash", detached=True, compute={"CPU": 0.5})
    m = rm.mapper(rm.module(Store), method="get", replicas=2, env=env).wait_ready(timeout=60)
    m.shutdown()  # detached: the replicas stay
    try:
        (pool,) = [p for p in cli.list_pools() if p.name == "nodash"]
        assert (pool.num_replicas, pool.num_alive, pool.detached) == (2, 2, True)
        assert [r.name for r in pool.replicas] == ["nodash_replica_0", "nodash_replica_1"]
        assert len(pool.nodes) == 1
        with pytest.raises(rm.RhmapperError, match="no dashboard"):
            cli.list_pools(source="state")

        # The console script, in its own process, against this session's cluster.
        env_vars = client_env()
        address = ["--address", ray.get_runtime_context().gcs_address]
        table = rhmapper_cli("pools", *address, env=env_vars)
        assert table.returncode == 0, table.stderr
        assert ["nodash", "2", "2", "1", "yes"] in [line.split() for line in table.stdout.splitlines()]
        killed = rhmapper_cli("kill", "nodash", *address, env=env_vars)
        assert killed.returncode == 0, killed.stderr
        assert wait_until(lambda: not [p for p in cli.list_pools() if p.name == "nodash"], 20.0)
    finally:
        for name in ("nodash_replica_0", "nodash_replica_1"):
            try:
                ray.kill(ray.get_actor(name, namespace="rhmapper"))
            except ValueError:
                pass


def test_cli_errors_are_clear(ray_local):
    (port,) = free_ports(1)
    env_vars = client_env()
    started = time.monotonic()
    nobody = rhmapper_cli("pools", "--address", f"127.0.0.1:{port}", env=env_vars)
    assert nobody.returncode == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in nobody.stderr, nobody.stderr
    assert time.monotonic() - started < 30

    address = ["--address", ray.get_runtime_context().gcs_address]
    unknown = rhmapper_cli("kill", "no_such_pool", *address, env=env_vars)
    assert unknown.returncode == 1
    assert "no pool named 'no_such_pool'" in unknown.stderr, unknown.stderr
    with pytest.raises(KeyError, match="no_such_pool"):
        cli.kill_pool("no_such_pool")
