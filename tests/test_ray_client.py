"""Ray Client drivers (``ray://HOST:PORT``): an impossible ``compute`` request fails as on the head,
the ``rhmapper`` CLI and ``list_pools``/``kill_pool`` work over the client, and a driver without the
cluster's token is told at once how to fix it.

Every driver runs in its own process against one real head on loopback (``tests/ray_head.py``) with
token authentication and a Ray Client server: the first of the session's heads (the ``heads``
fixture, shared with the other tests marked ``heads``; each test leaves it as it found it). The
head is started with ``GRPC_ENABLE_FORK_SUPPORT=false``: Ray 2.60's client server forks a server
process per client from a process busy in gRPC, and with gRPC's fork handlers on that child
sometimes dies at once (the client then fails after 30 s with "Starting Ray client server failed";
ray-project/ray#63202).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.driver_process import DriverProcess
from tests.ray_head import RHMAPPER, wait_until

pytestmark = pytest.mark.heads

CONNECT_SECONDS = 10.0
"""A token mismatch must be reported within this (Ray itself retries 20 s for a GCS address, 30 s
for a client address)."""

KILLED_DRIVER_GRACE = {"RAY_CLIENT_RECONNECT_GRACE_PERIOD": "3"}
"""The environment of a driver the test kills: a Ray Client driver sends its reconnect grace
period to the cluster, which ends the driver's session (its job, so its non-detached actors) only
once the driver has been gone that long: 3 s instead of Ray's default 30 s."""


@pytest.fixture
def head(heads):
    """The session's first head (a Ray Client server on loopback, see tests/ray_head.py)."""
    (head,) = heads.live(1)
    return head


def run_python(script: str, env: dict[str, str], *args: str, timeout: float = 120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, env: dict[str, str], timeout: float = 120):
    return subprocess.run([RHMAPPER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_clis(*commands: tuple[str, ...], env: dict[str, str], timeout: float = 120):
    """Run the ``rhmapper`` ``commands`` side by side (each only reads the cluster); their
    results, in order."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: run_cli(*args, env=env, timeout=timeout), commands))


def last_json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


UNSCHEDULABLE = """
    import json, time
    import rhmapper as rm

    def report(make):
        started = time.monotonic()
        try:
            make()
        except Exception as error:
            return {"type": type(error).__name__, "message": str(error),
                    "seconds": time.monotonic() - started}
        return {"type": None, "seconds": time.monotonic() - started}

    # No ray.init: the mapper joins the cluster of RAY_ADDRESS=ray://..., as a Ray Client driver.
    impossible = report(lambda: rm.mapper(abs, env=rm.Env(name="x", compute={"CPU": 64})))
    import ray
    fits = rm.mapper(abs, replicas=1, env=rm.Env(name="fits", compute={"CPU": 0.5}))
    print(json.dumps({"client": ray.util.client.ray.is_connected(), "impossible": impossible,
                      "fits": fits.map([-3, 4])}))
    fits.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_impossible_compute_over_ray_client_raises_unschedulable(head):
    report = last_json(run_python(UNSCHEDULABLE, head.driver_env(RAY_ADDRESS=head.client_address)))
    assert report["client"] is True
    impossible = report["impossible"]
    assert impossible["type"] == "UnschedulableError", impossible
    assert "env 'x'" in impossible["message"] and "CPU=64" in impossible["message"], impossible
    assert "nodes offer: CPU=2" in impossible["message"], impossible
    assert impossible["seconds"] < 10, impossible
    assert report["fits"] == [3, 4]


POOLS = """
    import json, sys
    import ray
    import rhmapper as rm
    from rhmapper import cli

    ray.init(sys.argv[1])
    for name in ("by_cli", "by_api"):
        m = rm.mapper(abs, replicas=2, env=rm.Env(name=name, detached=True, compute={"CPU": 0.25}))
        assert m.wait_ready(timeout=120).map([-1, 2]) == [1, 2]
        m.shutdown()  # detached: the replicas stay
    listed = {pool.name: pool.to_dict() for pool in cli.list_pools()}
    killed = cli.kill_pool("by_api")
    after = [pool.name for pool in cli.list_pools(source="gcs")]
    print(json.dumps({"listed": listed, "killed": killed, "after": after}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pools_are_listed_and_killed_over_ray_client(head):
    report = last_json(run_python(POOLS, head.driver_env(), head.client_address))
    assert sorted(report["listed"]) == ["by_api", "by_cli"]
    for pool in report["listed"].values():
        assert (pool["replicas"], pool["alive"], pool["detached"]) == (2, 2, True), pool
    assert report["killed"] == ["by_api_replica_0", "by_api_replica_1"]
    assert report["after"] == ["by_cli"]
    api_pids = [member["pid"] for member in report["listed"]["by_api"]["members"]]
    assert wait_until(lambda: not any(alive(pid) for pid in api_pids)), api_pids

    client = ("--address", head.client_address)
    sources = ("state", "gcs")
    table, *listings = run_clis(("pools", *client), *(
        ("pools", *client, "--json", "--source", source) for source in sources),
        env=head.driver_env())
    assert table.returncode == 0, table.stderr
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["POOL", "REPLICAS", "ALIVE", "NODES", "DETACHED"], ["by_cli", "2", "2", "1", "yes"]]
    for source, listed in zip(sources, listings, strict=True):
        assert listed.returncode == 0, (source, listed.stderr)
        (pool,) = json.loads(listed.stdout)
        assert (pool["pool"], pool["alive"]) == ("by_cli", 2), pool
        assert sorted(m["pid"] for m in pool["members"]) == sorted(
            m["pid"] for m in report["listed"]["by_cli"]["members"])

    killed = run_cli("kill", "by_cli", *client, env=head.driver_env())
    assert killed.returncode == 0, killed.stderr
    assert "killed 2 replica(s) of pool 'by_cli'" in killed.stdout
    cli_pids = [member["pid"] for member in report["listed"]["by_cli"]["members"]]
    assert wait_until(lambda: not any(alive(pid) for pid in cli_pids)), cli_pids
    # Read back over the GCS address too, not only through the client.
    after, table = run_clis(("pools", "--address", head.gcs_address, "--json"),
                            ("pools", *client), env=head.driver_env())
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout) == []
    assert "no rhmapper pools" in table.stdout


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


MISMATCH = """
    import json, sys, time
    import rhmapper as rm
    from rhmapper.connect import connect
    started = time.monotonic()
    try:
        if sys.argv[1] == "connect":
            connect(sys.argv[2])
        else:  # the mapper's own ray.init(), with RAY_ADDRESS set
            rm.mapper(abs, replicas=1).map([1])
    except Exception as error:
        print(json.dumps({"type": type(error).__name__, "message": str(error),
                          "seconds": time.monotonic() - started}))
    else:
        print(json.dumps({"type": None}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_token_mismatch_fails_at_once_saying_how_to_fix_it(head):
    cases = {}
    for kind, address in (("client", head.client_address), ("gcs", head.gcs_address)):
        cases[f"connect {kind}"] = run_python(MISMATCH, head.driver_env(token=False),
                                              "connect", address, timeout=60)
        cases[f"mapper {kind}"] = run_python(MISMATCH, head.driver_env(token=False,
                                                                  RAY_ADDRESS=address),
                                             "mapper", timeout=60)
        cases[f"cli {kind}"] = run_cli("pools", "--address", address,
                                       env=head.driver_env(token=False), timeout=60)
    wrong = head.driver_env(RAY_AUTH_TOKEN="0123456789abcdef0123456789abcdef")
    cases["wrong token"] = run_python(MISMATCH, wrong, "connect", head.client_address, timeout=60)

    for case, done in cases.items():
        assert "gcs_client.cc" not in done.stderr and "Traceback" not in done.stderr, (case, done)
        if case.startswith("cli"):
            assert done.returncode == 1, (case, done)
            message = done.stderr
        else:
            report = last_json(done)
            assert report["type"] == "ClusterAuthenticationError", (case, report)
            assert report["seconds"] < CONNECT_SECONDS, (case, report)
            message = report["message"]
        assert "uses token authentication" in message, (case, message)
        assert "~/.ray/auth_token" in message and "RAY_AUTH_TOKEN" in message, (case, message)
        if case == "wrong token":
            assert "a token the cluster does not accept" in message, message
        else:
            assert "Set RAY_AUTH_MODE=token" in message, (case, message)


RAY_SEMANTICS = """
    import asyncio, json
    import ray
    import rhmapper as rm

    async def async_double(x):
        await asyncio.sleep(0.01)
        return 2 * x

    @ray.remote
    class Tagged:
        def __init__(self, tag):
            self.tag = tag

        def work(self, x):
            return (self.tag, x * 10)

    # A Ray Client driver: its own actors join the pool, async functions and ObjectRef inputs map.
    actors = [Tagged.remote(tag) for tag in ("a", "b")]
    users = rm.mapper(Tagged, method="work", replicas=actors)
    users.wait_ready(timeout=60)
    tagged = users.map(range(12), batch_size=1)
    with rm.mapper(async_double, replicas=1, env=rm.Env(name="client_async",
                                                        compute={"CPU": 0.5})) as m:
        doubled = m.map([ray.put(x) for x in range(6)])

        async def asynchronously():  # the async verbs of a Ray Client driver
            return (await m.amap(range(8)), [r async for r in m.aimap(range(5), window=2)],
                    await asyncio.gather(*(m.acall(x) for x in range(20))),
                    await users.abroadcast("work", 1))

        amapped, aimapped, acalled, abroadcast = asyncio.run(asynchronously())
    print(json.dumps({"client": ray.util.client.ray.is_connected(),
                      "values": [value for _, value in tagged],
                      "tags": sorted({tag for tag, _ in tagged}), "doubled": doubled,
                      "amap": amapped, "aimap": aimapped, "acall": acalled,
                      "abroadcast": sorted(abroadcast)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_users_actors_async_functions_and_refs_over_ray_client(head):
    result = last_json(run_python(RAY_SEMANTICS, head.driver_env(RAY_ADDRESS=head.client_address)))
    assert result["client"] is True
    assert result["values"] == [10 * x for x in range(12)]
    assert result["tags"] == ["a", "b"]
    assert result["doubled"] == [2 * x for x in range(6)]
    assert result["amap"] == [2 * x for x in range(8)] and result["aimap"] == [0, 2, 4, 6, 8]
    assert result["acall"] == [2 * x for x in range(20)]
    assert result["abroadcast"] == [["a", 10], ["b", 10]]


ON_CLUSTER = """
    import asyncio, json
    import ray
    import rhmapper as rm

    def cube(x):
        return x ** 3

    def picky(x):
        if x == 2:
            raise LookupError("two")
        return x

    with rm.mapper(cube, replicas=2, env=rm.Env(compute={"CPU": 0.5}), on_cluster=True) as m:
        values = m.map(range(300), batch_size=1)
        streamed = list(m.imap(range(50), window=8))

        async def asynchronously():  # the async verbs of a Ray Client driver, map on the cluster
            return (await m.amap(range(40)), [r async for r in m.aimap(range(9), window=2)],
                    await asyncio.gather(*(m.acall(x) for x in range(20))))

        amapped, aimapped, acalled = asyncio.run(asynchronously())
    with rm.mapper(picky, replicas=1, on_cluster=True) as m:
        try:
            m.map(range(4))
            error = None
        except LookupError as caught:
            error = {"type": type(caught).__name__, "note": caught.__notes__[-1]}
    print(json.dumps({"client": ray.util.client.ray.is_connected(), "values": values,
                      "streamed": streamed, "error": error, "amap": amapped, "aimap": aimapped,
                      "acall": acalled}))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mapper_on_the_cluster_over_ray_client(head):
    result = last_json(run_python(ON_CLUSTER, head.driver_env(RAY_ADDRESS=head.client_address)))
    assert result["client"] is True
    assert result["values"] == [x ** 3 for x in range(300)]
    assert result["streamed"] == [x ** 3 for x in range(50)]
    assert result["amap"] == [x ** 3 for x in range(40)]
    assert result["aimap"] == [x ** 3 for x in range(9)]
    assert result["acall"] == [x ** 3 for x in range(20)]
    assert result["error"]["type"] == "LookupError"
    assert result["error"]["note"].startswith("rhmapper: item 2 failed on replica picky_")


SPAWNS_AND_WAITS = """
    import json, sys, time
    import rhmapper as rm

    def logged(x, log):
        time.sleep(0.25)
        with open(log, "a") as file:  # one line per execution, appended by the replicas
            file.write(f"{x}\\n")
        return x * 7

    m = rm.mapper(logged, replicas=2, env=rm.Env(compute={"CPU": 0.5}), on_cluster=True)
    spawned = m.spawn_map(range(40), name="killed_driver_map", kwargs={"log": sys.argv[1]},
                          batch_size=1)
    status = spawned.status()
    print(json.dumps({"state": status.state, "done": status.done}), flush=True)
    time.sleep(600)  # killed by the test
"""

COLLECTS = """
    import json
    import rhmapper as rm

    spawned = rm.get_map("killed_driver_map")
    first = spawned.status()
    values = spawned.results()
    try:
        rm.get_map("killed_driver_map")
        gone = False
    except KeyError:
        gone = True
    print(json.dumps({"first": [first.state, first.done, first.total], "values": values,
                      "gone": gone}))
"""


LEFT_ALIVE = """
    import json, sys, time
    from ray.util.state import list_actors

    deadline = time.monotonic() + 120
    while True:  # the host exits once its driver's job ended and no spawned map is kept
        alive = [(actor.class_name, actor.name) for actor in list_actors(
            filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)]
        left = [a for a in alive if a[0] == "MapperHost" or a[1].startswith(sys.argv[1])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(json.dumps({"left": left}))
"""


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_spawned_map_outlives_its_killed_driver(head, tmp_path):
    """The driver that spawned the map is killed (SIGKILL) while the map runs; another driver
    attaches by name and gets every result exactly once, each item ran exactly once, and the
    host and its replicas are gone once the map is collected."""
    log = tmp_path / "executions.log"
    env = head.driver_env(RAY_ADDRESS=head.client_address)
    first = DriverProcess(SPAWNS_AND_WAITS, {**env, **KILLED_DRIVER_GRACE}, str(log))
    try:
        spawned_at = json.loads(first.next_line(timeout=120))
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind in the driver
    assert spawned_at["state"] == "running" and spawned_at["done"] < 40, spawned_at
    result = last_json(run_python(COLLECTS, env, timeout=150))
    assert result["values"] == [x * 7 for x in range(40)]
    assert result["gone"] is True, "a collected map is deleted"
    assert result["first"][2] == 40
    executions = log.read_text().split()
    assert sorted(map(int, executions)) == list(range(40)), "every item ran exactly once"
    assert left_alive(head, "logged_") == [], "the host and its replicas exited after collection"


def left_alive(head, replica_prefix: str) -> list:
    """The hosts, and the actors named ``replica_prefix...``, still alive on ``head`` once they
    are all gone or 120 s have passed."""
    return last_json(run_python(LEFT_ALIVE, head.driver_env(RAY_ADDRESS=head.gcs_address),
                                replica_prefix, timeout=150))["left"]


MAPS_AND_IS_KILLED = """
    import sys, time
    import rhmapper as rm

    def crawls(x, log):
        with open(log, "a") as file:  # one line per execution, appended by the replicas
            file.write(f"{x}\\n")
        time.sleep(0.2)
        return x

    m = rm.mapper(crawls, replicas=1, env=rm.Env(compute={"CPU": 0.5}), on_cluster=True)
    m.spawn_map([-1, -2], name="kept_past_its_driver", kwargs={"log": sys.argv[1]})
    for count, _ in enumerate(m.imap(range(1000), batch_size=1, kwargs={"log": sys.argv[1]}), 1):
        if count == 3:
            print("MAPPING", flush=True)  # the test kills this driver now
"""


COLLECTS_KEPT = """
    import json
    import rhmapper as rm

    print(json.dumps(rm.get_map("kept_past_its_driver").results()))
"""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_killed_drivers_map_on_the_cluster_ends_and_its_spawned_map_stays(head, tmp_path):
    """A driver with a spawned map and a running imap on the host is killed (SIGKILL): the host
    ends the imap once it sees the driver gone, keeps the spawned map for another driver, and
    exits with its replica once that map is collected."""
    log = tmp_path / "executions.log"
    env = head.driver_env(RAY_ADDRESS=head.client_address)
    driver = DriverProcess(MAPS_AND_IS_KILLED, {**env, **KILLED_DRIVER_GRACE}, str(log))
    try:
        assert driver.next_line(timeout=120) == "MAPPING"
    finally:
        driver.kill()

    def imap_items_run() -> int:
        return sum(1 for line in log.read_text().split() if int(line) >= 0)

    counts = [imap_items_run()]

    def imap_stopped() -> bool:
        time.sleep(2.0)
        counts.append(imap_items_run())
        return counts[-1] == counts[-2]

    assert wait_until(imap_stopped, seconds=150), f"the imap ran on: {counts}"
    assert counts[-1] < 1000, "the imap ended before its last item"
    assert last_json(run_python(COLLECTS_KEPT, env)) == [-1, -2], "the spawned map was kept"
    assert left_alive(head, "crawls_") == [], "the host and its replica exited after collection"
