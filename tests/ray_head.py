"""A real Ray head on loopback for tests that need their own cluster (job submission, detached pools).

``start_head()`` runs ``ray start --head --block`` from the venv's ``ray`` as the leader of a new
session, on free loopback ports and a short temp dir of its own, so it cannot clash with the
pytest session's local Ray (or any other Ray on the machine). ``RayHead.stop()`` ends exactly that
head: SIGTERM to the leader (Ray stops its own children), then SIGKILL to whatever is left in its
session or names its temp dir on its command line. Nothing is killed by name and ``ray stop`` is
never run, since that would stop every Ray on the machine.

Example:
    >>> head = start_head(num_cpus=2)  # doctest: +SKIP
    >>> subprocess.run(["python", "driver.py"], env=head.env, check=True)  # doctest: +SKIP
    >>> head.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import psutil

VENV_BIN = os.path.dirname(sys.executable)
RAY = os.path.join(VENV_BIN, "ray")
RHMAPPER = os.path.join(VENV_BIN, "rhmapper")
LOOPBACK = "127.0.0.1"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nobody listens on right now (the OS picks them).

    Example:
        >>> len(set(free_ports(3)))
        3
    """
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port_range(size: int = 100, low: int = 20000, high: int = 32000) -> tuple[int, int]:
    """A block of ``size`` consecutive free ports below the OS's ephemeral range.

    Example:
        >>> first, last = free_port_range(10); last - first
        9
    """
    for _ in range(200):
        first = random.randrange(low, high - size)
        if all(_port_free(port) for port in range(first, first + size)):
            return first, first + size - 1
    raise RuntimeError(f"no {size} consecutive free ports between {low} and {high}")


def client_env(**extra: str) -> dict[str, str]:
    """The environment for Ray clients of a test head: token auth on, no stray RAY_ADDRESS.

    Example:
        >>> client_env(RAY_ADDRESS="127.0.0.1:6379")["RAY_AUTH_MODE"]
        'token'
    """
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_JOB_ID", "PYTEST_CURRENT_TEST")}
    # The venv's `ray` and `python` come first: a job's entrypoint `python job.py` runs with the
    # head's PATH.
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class RayHead:
    """A running test head: its addresses, temp dir, leader pid and client environment.

    ``client_address`` is its Ray Client server, ``ray://127.0.0.1:PORT``."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    leader: subprocess.Popen
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    client_address: str = ""
    stopped: bool = False
    """Whether `stop` was called."""

    def pids(self) -> set[int]:
        """Live pids of this head: its session's processes and any naming its temp dir."""
        found = set()
        for process in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                in_session = os.getsid(process.pid) == self.leader.pid
                cmdline = " ".join(process.info["cmdline"] or [])
                if in_session or self.temp_dir in cmdline:
                    found.add(process.pid)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        found.discard(os.getpid())
        return found

    def driver_env(self, *, token: bool = True, **extra: str) -> dict[str, str]:
        """This head's client environment without RAY_ADDRESS (a driver names the address it
        joins), plus ``extra``; without ``token``, no RAY_AUTH_MODE."""
        env = {key: value for key, value in self.env.items() if key != "RAY_ADDRESS"}
        if not token:
            env.pop("RAY_AUTH_MODE", None)
        env.update(extra)
        return env

    def log(self) -> str:
        """What ``ray start`` printed so far."""
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 30.0) -> set[int]:
        """Stop this head (and only it); return the pids that were running. Raises if any stays."""
        self.stopped = True
        running = self.pids()
        if self.leader.poll() is None:
            self.leader.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.3)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.leader.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.2)
        left = self.pids()
        if left:
            raise RuntimeError(f"processes of the head in {self.temp_dir} still alive: {left}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return running


def start_head(num_cpus: int = 2, timeout: float = 90.0, extra_args: Sequence[str] = (),
               extra_env: Mapping[str, str] | None = None,
               gcs_port: int | None = None) -> RayHead:
    """Start a Ray head with the dashboard (job API) on loopback; see the module docstring.

    ``extra_args`` are appended to the ``ray start`` command line (e.g.
    ``--autoscaling-config=...``); ``extra_env`` is added to the environment of ``ray start``
    only (its clients get ``head.env`` as usual). ``gcs_port`` fixes the GCS port (for configs
    that must name the head's address before it starts); by default a free port is picked.

    Example:
        >>> head = start_head(); head.dashboard_url  # doctest: +SKIP
        'http://127.0.0.1:41234'
    """
    env = client_env()
    token_file = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray",
                                                                "auth_token")
    if not env.get("RAY_AUTH_TOKEN") and not os.path.exists(token_file):  # (1-2 s otherwise)
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True,
                       check=False)  # creates ~/.ray/auth_token
    temp_dir = tempfile.mkdtemp(prefix="rhm-", dir="/tmp")
    ports = free_ports(9)
    while gcs_port is not None and gcs_port in ports[1:]:
        ports = free_ports(9)
    (gcs, client, dashboard, node_manager, object_manager, metrics, agent_http, agent_grpc,
     runtime_env_agent) = [gcs_port or ports[0], *ports[1:]]
    min_worker, max_worker = free_port_range(100)
    log_path = os.path.join(temp_dir, "head.log")
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}", f"--port={gcs}", f"--ray-client-server-port={client}",
        "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
        f"--min-worker-port={min_worker}", f"--max-worker-port={max_worker}",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--object-store-memory=200000000", *extra_args,
    ]
    with open(log_path, "w") as log:
        leader = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=client_env(**(extra_env or {})),
                                  start_new_session=True)
    gcs_address = f"{LOOPBACK}:{gcs}"
    head = RayHead(temp_dir=temp_dir, gcs_address=gcs_address,
                   dashboard_url=f"http://{LOOPBACK}:{dashboard}", leader=leader,
                   log_path=log_path, env=client_env(RAY_ADDRESS=gcs_address),
                   client_address=f"ray://{LOOPBACK}:{client}")
    try:
        _wait_started(head, timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_started(head: RayHead, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in head.log():
        if head.leader.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not start:\n{head.log()[-3000:]}")
        time.sleep(0.3)
    while True:  # the job API answers once the dashboard is up
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (maybe asking for the token): it is up
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard never answered:\n{head.log()[-3000:]}")
            time.sleep(0.3)


class Heads:
    """Test heads shared by one module's tests (the ``heads`` fixture); a test that stopped
    one gets a new one from the next `live`."""

    def __init__(self) -> None:
        self._heads: list[RayHead] = []

    def live(self, count: int) -> list[RayHead]:
        """The first ``count`` heads; those missing, and any that was stopped, are started first,
        side by side."""
        wanted = [index for index, head in enumerate(self._heads) if head.stopped]
        wanted += range(len(self._heads), count)
        started: dict[int, RayHead] = {}
        errors: list[BaseException] = []

        def start(index: int) -> None:
            try:
                started[index] = start_head_for_client()
            except BaseException as error:  # start_head stopped what it had started
                errors.append(error)

        starters = [threading.Thread(target=start, args=(index,), daemon=True)
                    for index in wanted]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join(300)  # a start ends (or raises) within its 90 s, plus a stop if it failed
        for index in wanted:  # kept even if another failed, so that `stop` stops them
            if index in started and index < len(self._heads):
                self._heads[index] = started[index]
            elif index in started:
                self._heads.append(started[index])
        if any(starter.is_alive() for starter in starters):
            raise RuntimeError("a test head did not start within 300 s")
        if errors:
            raise errors[0]
        return self._heads[:count]

    def stop(self) -> None:
        stop_heads(self._heads)


def stop_heads(heads: Sequence[RayHead]) -> None:
    """Stop the ``heads`` side by side, each as `RayHead.stop` does (by pid); raise the first
    error a stop raised."""
    errors: list[BaseException] = []

    def stop(head: RayHead) -> None:
        try:
            head.stop()
        except BaseException as error:
            errors.append(error)

    stoppers = [threading.Thread(target=stop, args=(head,), daemon=True) for head in heads]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join(120)  # a stop ends (or raises) within its 30 + 10 + 10 s of waiting
    if any(stopper.is_alive() for stopper in stoppers):
        raise RuntimeError("a test head did not stop within 120 s")
    if errors:
        raise errors[0]


def start_head_for_client() -> RayHead:
    """A head for drivers that connect over Ray Client (gRPC fork support off, as they need)."""
    return start_head(num_cpus=2, extra_env={"GRPC_ENABLE_FORK_SUPPORT": "false"})


def wait_until(predicate, seconds: float = 30.0) -> bool:
    """Poll ``predicate`` every 0.2 s until it is true (True) or ``seconds`` pass (False).

    Example:
        >>> wait_until(lambda: True)
        True
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
