"""With Ray's autoscaler configured, a replica that needs a node type the autoscaler can add waits
for that node instead of failing (an autoscaled pool at zero asks for it, and once idle its
replica and then the node go away); a request no node type can satisfy still fails fast.

The cluster is a real head on loopback (``tests/ray_head.py``) started the way
``ray.cluster_utils.AutoscalingCluster`` starts one, but by hand, since that class runs
``ray stop --force`` (which would stop every Ray on the machine): a fake multi-node autoscaling
config (Ray's ``fake_multinode`` provider, which launches extra raylets on this machine) is passed
with ``--autoscaling-config`` and ``RAY_FAKE_CLUSTER=1``. The head has 1 CPU and no GPU; the one
worker node type, ``gpu_node``, has 1 CPU and 1 GPU (0 to 1 of them).

The fake nodes are started by the head's autoscaler (``monitor.py``) and do not exit with it: they
are in the head's session and name its temp dir, so ``RayHead.stop`` ends them by pid; the test
stops them first by pid (a raylet on SIGTERM ends its own workers) and checks none survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from tests.ray_head import LOOPBACK, free_ports, start_head

FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's node type


def fake_multinode_config(gcs_address: str) -> dict:
    """A ``fake_multinode`` autoscaling config, as ``AutoscalingCluster`` generates it from Ray's
    ``fake_multi_node/example.yaml`` (which the wheel does not ship)."""
    return {
        "cluster_name": "rhmapper_autoscaler_test",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Without it the fake nodes dial <node ip>:6379, not this head.
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            FAKE_HEAD_TYPE: {"resources": {"CPU": 1, "GPU": 0}, "node_config": {},
                             "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100_000_000},
                         "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def autoscaler_pids(head) -> set[int]:
    """The head's autoscaler processes (``monitor.py``)."""
    found = set()
    for pid in head.pids():
        try:
            if any(arg.endswith("autoscaler/_private/monitor.py")
                   for arg in psutil.Process(pid).cmdline()):
                found.add(pid)
        except psutil.Error:
            continue
    return found


def fake_node_processes(head) -> dict[tuple[int, float], str]:
    """(pid, create time) -> command line of every process of the fake nodes the autoscaler
    launched: its children (a raylet and a log monitor per node) and theirs (agents, workers)."""
    found = {}
    for monitor in autoscaler_pids(head):
        try:
            children = psutil.Process(monitor).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                found[(child.pid, child.create_time())] = " ".join(child.cmdline())
            except psutil.Error:
                continue
    return found


def alive(processes) -> set[tuple[int, float]]:
    """Those of ``processes`` ((pid, create time) pairs) still running (a reused pid is not)."""
    left = set()
    for pid, created in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                left.add((pid, created))
        except psutil.Error:
            continue
    return left


def stop_cluster(head) -> tuple[set[tuple[int, float]], set[int]]:
    """Stop the fake nodes (SIGTERM: a raylet ends its own workers), then the head, by pid.
    Returns the fake nodes' processes and the head's pids that were running."""
    fake = set(fake_node_processes(head))
    for pid, _ in fake:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(fake):
        time.sleep(0.2)
    running = head.stop(timeout=10)  # SIGKILLs whatever of its session or temp dir is left
    return fake, running


def run_watching(head, script: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``script`` as a driver of ``head``; also return every fake-node process seen meanwhile
    (the autoscaler may remove an idle node before the driver's end)."""
    seen: dict = {}
    with subprocess.Popen([sys.executable, "-c", script], env=head.env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as driver:
        deadline = time.monotonic() + timeout
        while driver.poll() is None and time.monotonic() < deadline:
            seen.update(fake_node_processes(head))
            time.sleep(0.3)
        if driver.poll() is None:
            driver.kill()
        stdout, stderr = driver.communicate()
    seen.update(fake_node_processes(head))
    return subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr), seen


@pytest.fixture
def autoscaling_head():
    config_dir = tempfile.mkdtemp(prefix="rhm-autoscaler-")
    (gcs_port,) = free_ports(1)
    config_path = os.path.join(config_dir, "fake_multinode.json")
    with open(config_path, "w") as handle:
        json.dump(fake_multinode_config(f"{LOOPBACK}:{gcs_port}"), handle)
    head = start_head(
        num_cpus=1, gcs_port=gcs_port, extra_args=[f"--autoscaling-config={config_path}"],
        extra_env={"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"})
    try:
        yield head
    finally:
        if head.pids():
            stop_cluster(head)
        shutil.rmtree(config_dir, ignore_errors=True)


DRIVER = textwrap.dedent("""
    import json, time
    import ray
    import rhmapper as rm

    def square_where(x):
        import ray
        return x * x, ray.get_runtime_context().get_node_id()

    ray.init()
    (head_id,) = [n["NodeID"] for n in ray.nodes()
                  if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    report = {"head": head_id, "gpus_before": ray.cluster_resources().get("GPU", 0),
              "nodes_before": sum(n["Alive"] for n in ray.nodes())}

    # (a) No node has a GPU, but the autoscaler's gpu_node type does: no UnschedulableError. An
    # autoscaled pool at zero asks for a replica for the map's backlog; the replica waits for the
    # node Ray's autoscaler adds; once idle, the replica and then the node go away.
    started = time.monotonic()
    m = rm.mapper(square_where, replicas=rm.Autoscale(min=0, max=1, idle_seconds=2),
                  env=rm.Env(name="gpu", compute={"GPU": 1, "CPU": 0.5}), ready_timeout=120)
    report["create_seconds"] = time.monotonic() - started
    report["replicas_at_start"] = m.num_replicas
    out = m.map(range(5))
    report["map_seconds"] = time.monotonic() - started
    report["results"] = [value for value, _ in out]
    report["ran_on"] = [node for _, node in out]
    report["ran_off_head"] = [node != head_id for _, node in out]
    report["gpu_nodes"] = [n["NodeID"] for n in ray.nodes()
                           if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]
    for item, ((value, node), off_head) in enumerate(zip(out, report["ran_off_head"])):
        print(f"item {item} -> {value} on node {node} (not the head: {off_head})", flush=True)
    deadline = time.monotonic() + 60
    while m.num_replicas and time.monotonic() < deadline:
        time.sleep(0.5)
    report["replicas_after_idle"] = m.num_replicas
    while time.monotonic() < deadline and any(
            n["Alive"] and n["Resources"].get("GPU", 0) >= 1 for n in ray.nodes()):
        time.sleep(0.5)
    report["gpu_nodes_after_idle"] = sum(n["Alive"] and n["Resources"].get("GPU", 0) >= 1
                                         for n in ray.nodes())
    report["scaling"] = [str(decision) for decision in m.scaling_history()]
    print("scaling:", report["scaling"], flush=True)
    m.shutdown()

    # (b) No node type offers 8 GPUs: fail fast at creation, naming the resource.
    started = time.monotonic()
    try:
        rm.mapper(square_where, env=rm.Env(name="huge", compute={"GPU": 8}))
    except rm.UnschedulableError as error:
        report["huge_error"] = str(error)
    else:
        report["huge_error"] = None
    report["huge_seconds"] = time.monotonic() - started
    print("huge:", report["huge_error"], flush=True)
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_autoscaler_node_type_is_waited_for_and_impossible_request_fails_fast(autoscaling_head):
    head = autoscaling_head
    assert autoscaler_pids(head), f"no autoscaler runs on the head:\n{head.log()[-2000:]}"
    assert not fake_node_processes(head)  # min_workers=0: nothing launched before the demand

    done, seen = run_watching(head, DRIVER, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    (line,) = [line for line in done.stdout.splitlines() if line.startswith('{"head"')]
    report = json.loads(line)

    # (a) The cluster had one node and no GPU; the mapper was created at once (not refused) and the
    # map ran every item on the GPU node the autoscaler added.
    assert (report["gpus_before"], report["nodes_before"]) == (0, 1), report
    waited_in_map = report["map_seconds"] - report["create_seconds"]
    assert report["create_seconds"] < waited_in_map, "the mapper's creation waited for the node"
    assert report["results"] == [x * x for x in range(5)]
    assert all(report["ran_off_head"]), report
    assert len(set(report["ran_on"])) == 1 and report["ran_on"][0] in report["gpu_nodes"], report
    # The pool started at zero, grew for the map, and once idle its replica, then the node, left.
    assert report["replicas_at_start"] == 0, report
    assert any(decision.startswith("up by 1 (0 -> 1): backlog of 5 items")
               for decision in report["scaling"]), report
    assert (report["replicas_after_idle"], report["gpu_nodes_after_idle"]) == (0, 0), report

    # (b) A request no node type can meet fails fast, naming the resource.
    assert report["huge_error"] is not None, report
    assert report["huge_seconds"] < 30, report
    assert "GPU" in report["huge_error"] and "huge" in report["huge_error"], report["huge_error"]

    # The fake node was launched by this head's autoscaler, and everything it started ends with it.
    assert any("raylet/raylet" in command for command in seen.values()), seen
    # What is left of them is in the head's session or names its temp dir, so its stop finds it.
    assert {pid for pid, _ in alive(seen)} <= head.pids()
    fake, running = stop_cluster(head)
    print(f"fake-node processes seen: {len(seen)}, still running at stop: {len(fake)}; "
          f"head processes stopped: {len(running)}")
    left = alive(set(seen) | fake)
    assert not left, {key: seen.get(key) for key in left}
    assert head.leader.pid in running
    assert not [pid for pid in running if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not head.pids()
