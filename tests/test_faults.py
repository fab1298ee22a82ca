"""Faults injected into running maps on a real local Ray: every result checked, exactly once."""

from __future__ import annotations

import _thread
import os
import random
import signal
import threading
import time

import pytest
import ray

import rhmapper as rm

pytestmark = pytest.mark.usefixtures("ray_local")


def exit_once(x, marker_dir):
    time.sleep(0.005)
    if x == 37:
        marker = os.path.join(marker_dir, "exited")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
    return x * 2


def always_exits_on(x, poison):
    if x == poison:
        os._exit(1)
    time.sleep(0.002)
    return x


def sleep_then(x, seconds=0.01):
    time.sleep(seconds)
    return x


def slow_item(x, slow, seconds):
    time.sleep(seconds if x == slow else 0.01)
    return x


def sometimes_fails(x):
    time.sleep(0.0005)
    if random.random() < 0.01:
        raise RuntimeError(f"random failure on {x}")
    return -x


@ray.remote
class UserWorker:
    def run(self, x):
        time.sleep(0.01)
        return x + 1


def kill_when(mapper, progress_at, done_counter, killed):
    """Kill a live auto replica from outside once ``done_counter`` reaches ``progress_at``."""
    def killer():
        while done_counter() < progress_at:
            time.sleep(0.01)
        victim = mapper.replicas[0]
        ray.kill(victim, no_restart=True)
        killed.append(victim)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def test_replica_process_exit_mid_map_loses_nothing(tmp_path):
    with rm.mapper(exit_once, replicas=3, env=rm.Env(name="exiter")).wait_ready() as m:
        names_before = m.replica_names
        results = m.map(range(300), kwargs={"marker_dir": str(tmp_path)})
        assert results == [2 * x for x in range(300)]
        assert (tmp_path / "exited").exists()
        assert m.num_replicas == 3
        assert sorted(m.replica_names) == sorted(names_before)  # replaced under the same names
        assert m.map(range(10), kwargs={"marker_dir": str(tmp_path)}) == [2 * x for x in range(10)]


def test_replica_killed_from_outside_mid_map_loses_nothing():
    with rm.mapper(sleep_then, replicas=3, env=rm.Env(name="victim"), concurrency=2) as m:
        m.wait_ready()
        done = []
        killed: list = []
        thread = kill_when(m, 1, lambda: len(done), killed)
        results = []
        for value in m.imap(range(400), batch_size=2):
            results.append(value)
            done.append(value)
        thread.join(5)
        assert killed, "the killer never fired"
        assert results == list(range(400))
        assert m.num_replicas == 3


def test_dead_user_actor_is_dropped_with_a_warning():
    users = [UserWorker.remote() for _ in range(2)]
    m = rm.mapper(UserWorker, method="run", replicas=users)
    m.wait_ready()
    ray.kill(users[0])
    with pytest.warns(RuntimeWarning, match="your actor.*dropped from the pool"):
        results = m.map(range(100), batch_size=1)
    assert results == [x + 1 for x in range(100)]
    assert m.num_replicas == 1
    ray.kill(users[1])
    with pytest.raises(rm.NoReplicasError, match="no replicas left"):
        with pytest.warns(RuntimeWarning):
            m.map(range(10))
    m.shutdown()


def test_poison_input_fails_after_bounded_attempts_naming_the_item():
    with rm.mapper(always_exits_on, replicas=2, env=rm.Env(name="poisoned")) as m:
        started = time.monotonic()
        with pytest.raises(rm.ReplicaLostError, match="item 13 was running each time"):
            m.map(range(40), kwargs={"poison": 13}, max_replica_crashes=2)
        assert time.monotonic() - started < 60
        results = m.map(range(40), kwargs={"poison": 13}, return_exceptions=True)
        assert isinstance(results[13], rm.ReplicaLostError)
        assert [r for i, r in enumerate(results) if i != 13] == [x for x in range(40) if x != 13]


class FailsInFirstConstructor:
    """The first replica built (the one that creates ``marker``) fails in its constructor."""

    def __init__(self, marker):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        raise RuntimeError("this replica cannot start")

    def double(self, x):
        return 2 * x


def test_a_replica_that_fails_in_its_constructor_fails_once_and_is_dropped(tmp_path):
    target = rm.module(FailsInFirstConstructor, str(tmp_path / "marker"))
    with rm.mapper(target, method="double", replicas=3, env=rm.Env(name="fails_first")) as m:
        with pytest.raises(rm.RhmapperError, match=r"failed in its constructor(.|\n)*this replica "
                           r"cannot start(.|\n)*dropped from the pool"):
            m.wait_ready(timeout=120)
        assert m.num_replicas == 2
        assert m.wait_ready(timeout=120) is m, "the other two replicas started"
        assert m.map(range(20), batch_size=1) == [2 * x for x in range(20)]


def replica_pids(m):
    return sorted(ray.get([handle.__ray_call__.remote(lambda self: os.getpid())
                           for handle in m.replicas], timeout=60))


def test_timeout_fails_the_item_and_frees_the_slot():
    with rm.mapper(slow_item, replicas=2, env=rm.Env(name="slowpoke")).wait_ready() as m:
        pids_before = replica_pids(m)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="item 3 ran longer than timeout=0.5s"):
            m.map(range(8), kwargs={"slow": 3, "seconds": 30}, timeout=0.5)
        assert time.monotonic() - started < 15
        started = time.monotonic()
        results = m.map(range(8), kwargs={"slow": 3, "seconds": 30}, timeout=0.5,
                        return_exceptions=True)
        assert isinstance(results[3], TimeoutError)
        assert [r for i, r in enumerate(results) if i != 3] == [x for x in range(8) if x != 3]
        assert time.monotonic() - started < 15
        # Both replicas still run a 30 s item 3: the next map gets replicas only because the
        # stuck ones are restarted once their 2 s of grace have passed.
        started = time.monotonic()
        assert m.map(range(20), kwargs={"slow": -1, "seconds": 0}) == list(range(20))
        assert time.monotonic() - started < 20, "the map waited for the stuck items"
        m.wait_ready(timeout=60)
        assert replica_pids(m) != pids_before, "a stuck replica was restarted"


def logged_slow_item(x, slow, seconds, log):
    with open(log, "a") as file:  # one line per item started, appended by the replicas
        file.write(f"{x}\n")
    return slow_item(x, slow, seconds)


def test_timeout_with_retries_reruns_the_item(tmp_path):
    log = tmp_path / "started.log"
    item_1_slow = {"slow": 1, "seconds": 30, "log": str(log)}
    with rm.mapper(logged_slow_item, replicas=3, env=rm.Env(name="slowretry")).wait_ready() as m:
        with pytest.raises(TimeoutError, match="item 1 ran longer than timeout=0.3s"):
            m.map(range(4), kwargs=item_1_slow, timeout=0.3, batch_size=1,
                  retries=rm.Retries(max_retries=1, initial_delay=0))
        assert log.read_text().split().count("1") == 2, "item 1 ran, timed out, ran once more"
        log.write_text("")
        results = m.map(range(4), kwargs=item_1_slow, timeout=0.3, batch_size=1,
                        retries=rm.Retries(max_retries=1, initial_delay=0, retry_on=(KeyError,)),
                        return_exceptions=True)
        assert isinstance(results[1], TimeoutError) and results[:1] + results[2:] == [0, 2, 3]
        assert log.read_text().split().count("1") == 1, "TimeoutError is not retried on KeyError"


def test_impossible_resources_fail_at_creation_naming_the_resource():
    started = time.monotonic()
    with pytest.raises(rm.UnschedulableError, match=r"GPU=1.*nodes offer: .*GPU=0"):
        rm.mapper(sleep_then, env=rm.Env(name="gpu", compute={"GPU": 1}))
    with pytest.raises(rm.UnschedulableError, match=r"CPU=64.*CPU=4"):
        rm.mapper(sleep_then, env=rm.Env(name="huge", compute={"CPU": 64}))
    with pytest.raises(rm.UnschedulableError, match=r"unicorn"):
        rm.mapper(sleep_then, env=rm.Env(name="odd", compute={"unicorn": 1}))
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError):
        ray.get_actor("gpu_replica_0", namespace="rhmapper")


@pytest.mark.parametrize("compiled_graphs", [False, True])
def test_keyboard_interrupt_cancels_and_context_exit_kills_replicas(compiled_graphs):
    mapping = threading.Event()
    finished = threading.Event()

    def ctrl_c(signum, frame):
        if mapping.is_set():  # one KeyboardInterrupt, raised while the map runs
            mapping.clear()
            raise KeyboardInterrupt

    def press_ctrl_c():
        # One simulated press was once lost in a full suite run (cause not found; Ray defers
        # SIGINT in places). Like a user, press again every 0.5 s until the map stops.
        while not finished.wait(0.5):
            if mapping.is_set():
                _thread.interrupt_main()

    previous_handler = signal.signal(signal.SIGINT, ctrl_c)
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            with rm.mapper(sleep_then, replicas=2, env=rm.Env(name="ctrlc"),
                           compiled_graphs=compiled_graphs).wait_ready() as m:
                started = time.monotonic()
                mapping.set()
                presser.start()
                m.map(range(200), kwargs={"seconds": 0.2}, batch_size=1)
        stopped_after = time.monotonic() - started
    finally:
        finished.set()
        presser.join(2)
        signal.signal(signal.SIGINT, previous_handler)
    assert stopped_after < 5, f"the 20 s map took {stopped_after:.1f} s to stop after Ctrl-C"
    for name in ("ctrlc_replica_0", "ctrlc_replica_1"):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace="rhmapper")
            except ValueError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"{name} outlived the with block")


@pytest.mark.parametrize("compiled_graphs", [False, True])
def test_stress_random_failures_and_two_kills(capsys, compiled_graphs):
    # Over compiled graphs: one item per call (the path they are for), concurrency 1, and half
    # the items (one call each: the same kills and retries at half the suite's time).
    options = {"batch_size": 1} if compiled_graphs else {}
    items = 10_000 if compiled_graphs else 20_000
    with rm.mapper(sometimes_fails, replicas=8, concurrency=1 if compiled_graphs else 2,
                   env=rm.Env(name="stress", compute={"CPU": 0.25}),
                   compiled_graphs=compiled_graphs).wait_ready() as m:
        done = [0]
        killed: list = []
        first = kill_when(m, items * 3 // 10, lambda: done[0], killed)
        second = kill_when(m, items * 13 // 20, lambda: done[0], killed)
        results = []
        for value in m.imap(range(items), retries=rm.Retries(max_retries=3, initial_delay=0.01),
                            progress=True, **options):
            results.append(value)
            done[0] += 1
        first.join(5)
        second.join(5)
        assert len(killed) == 2
        assert results == [-x for x in range(items)]
        assert m.num_replicas == 8
    err = capsys.readouterr().err
    assert f"{items}/{items}" in err and "failed=0" in err


def test_token_authentication_is_on():
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert is_token_auth_enabled()


def test_autoscaler_node_types_count_as_nodes(monkeypatch):
    from ray.core.generated import autoscaler_pb2

    from rhmapper.feasibility import check_feasible

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"GPU": 1, "CPU": 8}, max_count=2),
        autoscaler_pb2.NodeGroupConfig(name="off", resources={"GPU": 8}, max_count=0)])
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    check_feasible(rm.Env(name="scales", compute={"GPU": 1, "CPU": 8}))
    # Per node: two 1-GPU nodes do not make a 2-GPU node; a group of max 0 nodes never comes.
    with pytest.raises(rm.UnschedulableError, match="GPU=2"):
        check_feasible(rm.Env(name="toobig", compute={"GPU": 2}))


@ray.remote
class Hog:
    def ping(self):
        return True


def test_ready_timeout_fails_a_map_whose_replicas_never_start():
    hog = Hog.options(num_cpus=ray.cluster_resources()["CPU"] - 0.5).remote()
    ray.get(hog.ping.remote(), timeout=60)  # placed once earlier tests' replicas are gone
    try:
        m = rm.mapper(sleep_then, replicas=2, env=rm.Env(name="starved", compute={"CPU": 1}),
                      ready_timeout=2)
        started = time.monotonic()
        with pytest.raises(rm.NoReplicasError, match="ready_timeout=2"):
            m.map(range(5))
        assert time.monotonic() - started < 10
        m.shutdown()
    finally:
        ray.kill(hog)


def fails_twice(x, marker_dir):
    marker = os.path.join(marker_dir, str(x))
    attempts = len(open(marker).read()) if os.path.exists(marker) else 0
    with open(marker, "a") as handle:
        handle.write(".")
    if attempts < 2:
        raise ConnectionError(f"attempt {attempts + 1} of {x}")
    return x


def test_retries_back_off_exponentially(tmp_path):
    policy = rm.Retries(max_retries=2, initial_delay=0.4, backoff=2.0, retry_on=(ConnectionError,))
    with rm.mapper(fails_twice, replicas=2).wait_ready() as m:
        started = time.monotonic()
        assert m.map([7], kwargs={"marker_dir": str(tmp_path)}, retries=policy) == [7]
        elapsed = time.monotonic() - started
    assert (tmp_path / "7").read_text() == "..."
    assert elapsed >= 0.4 + 0.8, f"two retries after 0.4 s and 0.8 s took only {elapsed:.2f} s"
