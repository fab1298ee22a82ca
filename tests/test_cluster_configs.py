"""The cluster configs in cluster_configs/: launcher YAMLs, the KubeRay manifest, the local script.

The launcher YAMLs are checked against Ray's own schema (ray/autoscaler/ray-schema.json) and the
same preparation `ray up` applies; the local multi-node script is run for real. Nothing here calls
ray.init() in the pytest process: Ray is only driven from subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "cluster_configs"
LAUNCHER_CONFIGS = ["aws", "gcp", "onprem"]
CLOUD_CONFIGS = ["aws", "gcp"]
RAY_IMAGE = "rayproject/ray:2.60.0-py311"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def prepared(name: str) -> dict:
    """The config as `ray up` sees it: merged with the provider defaults, node types filled in."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)  # schema again, head_node_type, sum(min_workers) <= max_workers
    return config


def ray_start_args(commands: list[str]) -> list[list[str]]:
    """The argument lists of the `ray start` calls in a list of shell commands."""
    calls = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i in range(len(words) - 1):
            if words[i] == "ray" and words[i + 1] == "start":
                end = next((j for j in range(i + 2, len(words)) if words[j] in (";", "&&", "||", "|")),
                           len(words))
                calls.append(words[i + 2:end])
    return calls


def flag_values(args: list[str], flag: str) -> list[str]:
    values = []
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


# ---------------------------------------------------------------------------------------------
# Launcher YAMLs (aws, gcp, onprem)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_yaml_matches_ray_schema(name, ray_schema):
    validator = jsonschema.Draft7Validator(ray_schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
              for e in validator.iter_errors(load(name))]
    assert not errors, f"{name}.yaml does not match ray-schema.json:\n" + "\n".join(errors)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_yaml_passes_ray_up_preparation(name):
    config = prepared(name)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_yaml_has_head_cpu_and_gpu_worker_types(name):
    config = load(name)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("CPU") == 0, "replicas should not land on the head"

    workers = {k: v for k, v in types.items() if k != head}
    cpu_types = [k for k, v in workers.items() if not v["resources"].get("GPU")]
    gpu_types = [k for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1]
    assert len(cpu_types) == 1 and len(gpu_types) == 1, workers
    cpu, gpu = workers[cpu_types[0]], workers[gpu_types[0]]

    # The custom resources the comments tell users to pin with exist on the right type only.
    assert cpu["resources"].get("CPU", 0) >= 1 and cpu["resources"].get("cpu_worker", 0) >= 1
    assert gpu["resources"].get("gpu_worker", 0) >= 1
    assert "gpu_worker" not in cpu["resources"] and "cpu_worker" not in gpu["resources"]

    for node_type in (cpu, gpu):
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert config["max_workers"] >= cpu["min_workers"] + gpu["min_workers"]

    # CPU image everywhere, its CUDA build on the GPU workers.
    assert config["docker"]["image"] == RAY_IMAGE
    assert gpu["docker"]["worker_image"] == RAY_IMAGE + "-gpu"


def test_aws_and_gcp_instance_types():
    aws = load("aws")["available_node_types"]
    assert aws["cpu_workers"]["node_config"]["InstanceType"].startswith("m5.")
    assert aws["gpu_workers"]["node_config"]["InstanceType"].startswith("g5.")
    gcp = load("gcp")["available_node_types"]
    assert gcp["cpu_workers"]["node_config"]["machineType"].startswith("n2-")
    accelerators = gcp["gpu_workers"]["node_config"]["guestAccelerators"]
    assert accelerators == [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]
    # T4s attach to N1 machines only.
    assert gcp["gpu_workers"]["node_config"]["machineType"].startswith("n1-")
    for node_type in gcp.values():  # GCE wants an object here, not a list
        assert isinstance(node_type["node_config"].get("scheduling", {}), dict)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_head_binds_dashboard_to_localhost_and_all_nodes_use_token_auth(name):
    config = load(name)
    head_calls = ray_start_args(config["head_start_ray_commands"])
    assert len(head_calls) == 1 and "--head" in head_calls[0]
    assert flag_values(head_calls[0], "--dashboard-host") == ["127.0.0.1"]

    worker_calls = ray_start_args(config["worker_start_ray_commands"])
    assert len(worker_calls) == 1
    assert flag_values(worker_calls[0], "--address") == ["$RAY_HEAD_IP:6379"]

    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
    # The token each node presents is the one from the laptop.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_every_node_installs_rhmapper(name):
    config = load(name)
    # setup_commands run on head and workers alike (node-type overrides would replace them).
    assert any(re.search(r"pip install\b.*\brhmapper\b", c) for c in config["setup_commands"])
    for node_type in config.get("available_node_types", {}).values():
        assert "worker_setup_commands" not in node_type


def test_onprem_uses_local_provider_with_placeholders():
    config = load("onprem")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and len(provider["worker_ips"]) >= 2
    assert "available_node_types" not in config  # the local provider refuses it
    # ray up keeps every listed host.
    node_type = prepared("onprem")["available_node_types"]["local.cluster.node"]
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize("gpus", [2, 0])
def test_onprem_worker_command_gives_gpu_and_cpu_hosts_their_resources(gpus, tmp_path):
    """Run the real worker start command with a fake `ray` (and a fake `nvidia-smi` on GPU hosts)."""
    command = next(c for c in load("onprem")["worker_start_ray_commands"] if "ray start" in c)
    (tmp_path / "ray").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "ray").chmod(0o755)
    if gpus:
        lines = "".join(f'echo "GPU {i}: Tesla T4 (UUID: GPU-{i})"\n' for i in range(gpus))
        (tmp_path / "nvidia-smi").write_text("#!/bin/sh\n" + lines)
        (tmp_path / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.10", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    args = out.stdout.split("\n")
    assert args[0] == "start" and "--address=10.0.0.10:6379" in args
    assert flag_values(args, "--num-gpus") == [str(gpus)]
    (resources,) = flag_values(args, "--resources")
    if gpus:
        assert json.loads(resources) == {"gpu_worker": 1}
    else:
        assert json.loads(resources) == {"cpu_worker": os.cpu_count()}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS + ["kuberay"])
def test_comments_explain_launch_and_which_env_lands_where(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    launch = (f"kubectl apply -f cluster_configs/{name}.yaml" if name == "kuberay"
              else f"ray up cluster_configs/{name}.yaml")
    for needle in (launch,
                   "ray job submit --address http://127.0.0.1:8265",
                   'rm.Env(name="embed", compute={"CPU": 0.5})',
                   'rm.Env(name="gpu", compute={"GPU": 1})',
                   '"cpu_worker": 1', '"gpu_worker": 1',
                   "127.0.0.1", "RAY_AUTH_MODE=token"):
        assert needle in comments, f"{name}.yaml: no comment mentions {needle!r}"


# ---------------------------------------------------------------------------------------------
# KubeRay manifest
# ---------------------------------------------------------------------------------------------


def ray_container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert containers, "a pod template without containers"
    return containers[0]  # KubeRay treats the first container as the Ray container


def test_kuberay_manifest_head_group():
    manifest = load("kuberay")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    head = manifest["spec"]["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
    assert params["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert ray_container(head["template"])["image"] == RAY_IMAGE


def test_kuberay_manifest_worker_groups():
    groups = load("kuberay")["spec"]["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups) >= 2
    custom = {}
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values())
        # KubeRay's format for custom resources: a JSON object inside a quoted string.
        custom[group["groupName"]] = json.loads(json.loads(params["resources"]))
        container = ray_container(group["template"])
        assert container["image"].startswith(RAY_IMAGE)
        assert container["resources"]["limits"] and container["resources"]["requests"]

    gpu = [g for g in groups if "nvidia.com/gpu" in ray_container(g["template"])["resources"]["limits"]]
    cpu = [g for g in groups if g not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1
    gpu_container = ray_container(gpu[0]["template"])
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu_container["image"] == RAY_IMAGE + "-gpu"
    assert ray_container(cpu[0]["template"])["image"] == RAY_IMAGE
    assert custom[gpu[0]["groupName"]] == {"gpu_worker": 1}
    assert set(custom[cpu[0]["groupName"]]) == {"cpu_worker"}


def test_kuberay_every_ray_container_installs_rhmapper_and_uses_token_auth():
    spec = load("kuberay")["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        container = ray_container(template)
        # A custom command replaces KubeRay's only with this annotation, and must still run
        # the generated `ray start`.
        assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        script = " ".join(container["args"])
        assert re.search(r"pip install\b.*\brhmapper\b", script)
        assert script.index("rhmapper") < script.index("$KUBERAY_GEN_RAY_START_CMD")
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    autoscaler_env = {e["name"] for e in spec["autoscalerOptions"]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= autoscaler_env


# ---------------------------------------------------------------------------------------------
# local_multinode.sh: a real 3-node cluster on this machine
# ---------------------------------------------------------------------------------------------

SCRIPT = CONFIGS / "local_multinode.sh"

DRIVER = r"""
import json, ray
ray.init()  # RAY_ADDRESS and RAY_AUTH_MODE come from the script's output
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=0, resources={"worker_a": 1})
def where():
    return ray.get_runtime_context().get_node_id()

print("RESULT " + json.dumps({
    "nodes": len(nodes),
    "cpus": ray.cluster_resources().get("CPU"),
    "node_cpus": sorted(n["Resources"].get("CPU", 0) for n in nodes),
    "worker_a_nodes": [n["NodeID"] for n in nodes if n["Resources"].get("worker_a")],
    "pinned_to": ray.get(where.remote(), timeout=120),
}))
"""


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a live process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[3])


def running(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def session_members(sids: set[int]) -> set[int]:
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = proc_state(int(entry))
            if state and state[1] in sids:
                members.add(int(entry))
    return members


def processes_mentioning(text: str) -> list[int]:
    """Running processes whose command line contains `text` (e.g. this cluster's temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline and running(int(entry)):
                pids.append(int(entry))
    return pids


def http_status(url: str, headers: dict | None = None) -> int | None:
    """The HTTP status of a GET, None if nothing listens there."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def free_port_block(size: int) -> int:
    """A base port with `size` free ports after it (below the ephemeral range)."""
    for base in range(21000, 32000, 500):
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no free block of ports for the local cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multinode
@pytest.mark.timeout(600)
def test_local_multinode_script_starts_three_nodes_and_stops_them_by_pid():
    # Short paths: Ray's unix sockets live under the cluster dir (108-byte limit).
    cluster_dir = tempfile.mkdtemp(prefix="rhm", dir="/tmp")
    home = tempfile.mkdtemp(prefix="rhmhome", dir="/tmp")  # its own ~/.ray/auth_token
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        HOME=home,
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        RAY=os.path.join(bin_dir, "ray"),
        RHM_CLUSTER_DIR=cluster_dir,
        RHM_PORT_BASE=str(free_port_block(400)),
        RHM_DASHBOARD_PORT=str(free_port()),
    )

    def script(*args, timeout=240):
        return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    leaders: dict[str, int] = {}
    members: set[int] = set()
    started = False
    try:
        out = script("start")
        started = True
        assert out.returncode == 0, out.stdout + out.stderr
        printed = dict(re.findall(r"^(RAY_ADDRESS|RAY_AUTH_MODE)=(\S+)$", out.stdout, re.M))
        assert printed.get("RAY_AUTH_MODE") == "token", out.stdout  # Ray's default, kept
        assert re.fullmatch(r"[\d.]+:" + env["RHM_PORT_BASE"], printed["RAY_ADDRESS"])
        assert (Path(home) / ".ray" / "auth_token").read_text().strip(), "no token generated"

        for line in (Path(cluster_dir) / "pids").read_text().splitlines():
            name, pid = line.split()
            leaders[name] = int(pid)
        assert set(leaders) == {"head", "worker_a", "worker_b"}
        assert all(running(pid) for pid in leaders.values())
        members = session_members(set(leaders.values()))
        assert len(members) > len(leaders)  # raylets, GCS, agents... in the recorded sessions

        # Refuses to start a second time over a running cluster.
        again = script("start", timeout=60)
        assert again.returncode != 0 and "already running" in again.stderr

        driver = subprocess.run([sys.executable, "-c", DRIVER], env={**env, **printed},
                                capture_output=True, text=True, timeout=180)
        assert driver.returncode == 0, driver.stderr[-3000:]
        (result,) = [json.loads(line[7:]) for line in driver.stdout.splitlines()
                     if line.startswith("RESULT ")]
        assert result["nodes"] == 3
        assert result["cpus"] == 5
        assert result["node_cpus"] == [1, 2, 2]
        assert result["pinned_to"] in result["worker_a_nodes"] and len(result["worker_a_nodes"]) == 1

        # The dashboard answers on 127.0.0.1 only, and only with the token.
        dashboard = f"http://127.0.0.1:{env['RHM_DASHBOARD_PORT']}/api/version"
        token = (Path(home) / ".ray" / "auth_token").read_text().strip()
        assert http_status(dashboard) == 401
        assert http_status(dashboard, {"Authorization": f"Bearer {token}"}) == 200
        node_ip = printed["RAY_ADDRESS"].rsplit(":", 1)[0]
        if node_ip != "127.0.0.1":
            assert http_status(dashboard.replace("127.0.0.1", node_ip)) is None

        members |= session_members(set(leaders.values()))
        stop = script("stop", timeout=180)
        started = False
        assert stop.returncode == 0, stop.stdout + stop.stderr
        deadline = time.time() + 30
        while any(running(p) for p in members) and time.time() < deadline:
            time.sleep(0.5)
        assert not [p for p in members if running(p)], "stop left processes running"
        assert not processes_mentioning(cluster_dir), "stop left Ray processes of this cluster"
        assert not (Path(cluster_dir) / "pids").exists()
        assert "not running" in script("stop", timeout=60).stdout
    finally:
        if started:
            script("stop", timeout=180)
        # Last resort, by recorded pid only: never leave this test's Ray behind.
        for pid in members | session_members(set(leaders.values())) | set(
                processes_mentioning(cluster_dir)):
            if running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(cluster_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
