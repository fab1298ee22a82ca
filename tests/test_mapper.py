"""The mapper on a real local Ray: ordering, inputs, concurrency, modules, user actors, errors."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray

import rhmapper as rm

pytestmark = pytest.mark.usefixtures("ray_local")


def double(x):
    return 2 * x


def add(x, y):
    return x + y


def sleepy_identity(x, seconds):
    time.sleep(seconds)
    return x


def pid_of(_x=None):
    return os.getpid()


@ray.remote
class Counter:
    def __init__(self):
        self.count = 0

    def incr(self):
        self.count += 1
        return self.count

    def value(self):
        return self.count


class Overlap:
    """Counts calls running at once inside one replica."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def work(self, x):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.3)
        with self.lock:
            self.active -= 1
        return x

    def peak_overlap(self):
        return self.peak


class Model:
    def __init__(self, counter_name, scale=1):
        ray.get(ray.get_actor(counter_name).incr.remote())
        self.scale = scale

    def predict(self, x):
        return (os.getpid(), x * self.scale)


class Tagged:
    def __init__(self, tag="auto"):
        self.tag = tag

    def predict(self, x):
        time.sleep(0.01)
        return (self.tag, x * 10)

    def whoami(self):
        return (self.tag, os.getpid())


RemoteTagged = ray.remote(Tagged)


def wait_gone(name, namespace="rhmapper", seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return True
        time.sleep(0.1)
    return False


def test_results_keep_input_order_when_items_take_different_times():
    durations = [0.2, 0.0, 0.15, 0.0, 0.1, 0.05, 0.0, 0.12] * 2
    with rm.mapper(sleepy_identity, replicas=3, concurrency=2) as m:
        items = list(range(len(durations)))
        assert m.map(items, durations) == items
        assert list(m.imap(items, durations)) == items
        assert m.starmap(list(zip(items, durations))) == items
        unordered = list(m.imap_unordered(items, durations))
        assert sorted(unordered) == items


def test_map_over_several_iterables_and_generators():
    with rm.mapper(add, replicas=2) as m:
        assert m.map([1, 2, 3], (10, 20, 30)) == [11, 22, 33]
        assert m.map(range(100), (x * x for x in range(100))) == [x + x * x for x in range(100)]
        assert list(m.imap(iter(range(5)), iter(range(5)))) == [0, 2, 4, 6, 8]


def test_empty_input_returns_empty_without_calls():
    with rm.mapper(double, replicas=1) as m:
        assert m.map([]) == []
        assert m.starmap([]) == []
        assert list(m.imap([])) == []
        assert list(m.imap_unordered(iter([]))) == []


def test_unequal_lengths_raise_value_error():
    with rm.mapper(add, replicas=1) as m:
        with pytest.raises(ValueError, match=r"unequal lengths \[3, 2\]"):
            m.map([1, 2, 3], [1, 2])
        with pytest.raises(ValueError):
            list(m.imap([1, 2, 3], iter([1, 2])))


def test_per_replica_concurrency_measured_inside_the_replica():
    with rm.mapper(rm.module(Overlap), method="work", replicas=2, concurrency=3) as m:
        m.broadcast("peak_overlap")  # both replicas are up before the clock starts
        assert m.map(range(12)) == list(range(12))
        peaks = m.broadcast("peak_overlap")
    assert max(peaks) <= 3, peaks
    assert 3 in peaks, peaks


def test_maps_from_several_threads_share_one_pool():
    with rm.mapper(rm.module(Overlap), method="work", replicas=2, concurrency=1) as m:
        m.wait_ready(timeout=60)
        results: dict[int, list] = {}

        def run(k):
            results[k] = m.map(range(10 * k, 10 * k + 6), batch_size=1)

        threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        peaks = m.broadcast("peak_overlap")
        in_flight = [replica.in_flight for replica in m._backend.pool.replicas]
    assert results == {k: list(range(10 * k, 10 * k + 6)) for k in range(4)}
    assert peaks == [1, 1] and in_flight == [0, 0], (peaks, in_flight)


def test_module_is_built_once_per_replica():
    counter = Counter.options(name="constructions").remote()
    with rm.mapper(rm.module(Model, "constructions", scale=3), method="predict", replicas=3) as m:
        m.wait_ready()
        results = m.map(range(60))
        assert [value for _, value in results] == [3 * x for x in range(60)]
        replica_pids = {pid for pid, _ in m.broadcast("predict", 1)}
        assert len(replica_pids) == 3 and {pid for pid, _ in results} <= replica_pids
        more = m.map(range(60))
        assert {pid for pid, _ in more} <= replica_pids
        assert ray.get(counter.value.remote()) == 3
    ray.kill(counter)


def test_existing_actors_alone_and_mixed_with_auto_replicas():
    users = [RemoteTagged.remote(tag) for tag in ("a1", "a2")]
    m = rm.mapper(RemoteTagged, method="predict", replicas=users)
    try:
        m.wait_ready()
        results = m.map(range(40), batch_size=1)
        assert [value for _, value in results] == [10 * x for x in range(40)]
        assert {tag for tag, _ in results} == {"a1", "a2"}
        m.add_replicas(2)
        assert m.num_replicas == 4
        m.wait_ready()
        mixed = m.map(range(80), batch_size=1)
        assert [value for _, value in mixed] == [10 * x for x in range(80)]
        assert {tag for tag, _ in mixed} == {"a1", "a2", "auto"}
        assert len({pid for _, pid in m.broadcast("whoami")}) == 4
    finally:
        m.shutdown()
    assert ray.get([user.whoami.remote() for user in users])  # still alive after shutdown
    for user in users:
        ray.kill(user)


def test_add_and_drop_replicas():
    with rm.mapper(pid_of, replicas=1, env=rm.Env(name="adddrop")) as m:
        m.add_replicas(2)
        m.wait_ready()
        assert m.replica_names == ["adddrop_replica_0", "adddrop_replica_1", "adddrop_replica_2"]
        assert len(set(m.map(range(30), batch_size=1))) == 3
        m.drop_replicas(1)
        assert m.replica_names == ["adddrop_replica_0", "adddrop_replica_1"]
        assert wait_gone("adddrop_replica_2")
        assert len(set(m.map(range(30), batch_size=1))) == 2
        with pytest.raises(ValueError, match="cannot drop 5"):
            m.drop_replicas(5)


def test_call_goes_to_least_loaded_in_turn_and_broadcast_reaches_all():
    with rm.mapper(rm.module(Tagged), method="whoami", replicas=2) as m:
        m.wait_ready()
        pids = {m.call()[1] for _ in range(4)}
        assert len(pids) == 2
        everyone = m.broadcast("whoami")
        assert len(everyone) == 2 and {pid for _, pid in everyone} == pids
        handles_pids = [ray.get(h.whoami.remote())[1] for h in m.replicas]
        assert [pid for _, pid in everyone] == handles_pids
    with rm.mapper(add, replicas=1) as m:
        assert m.call(2, y=5) == 7


def flaky_once(x, marker_dir):
    marker = os.path.join(marker_dir, f"{x}.failed")
    if not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
        raise RuntimeError(f"first attempt of {x}")
    return (x, os.getpid())


def test_retries_rerun_failed_items_on_another_replica(tmp_path):
    (tmp_path / "first").mkdir()
    with rm.mapper(flaky_once, replicas=2).wait_ready() as m:
        with pytest.raises(RuntimeError, match="first attempt"):
            m.map(range(4), kwargs={"marker_dir": str(tmp_path / "first")})
        results = m.map(range(10), kwargs={"marker_dir": str(tmp_path)}, retries=1)
    assert [x for x, _ in results] == list(range(10))
    for x, pid in results:
        failed_pid = int((tmp_path / f"{x}.failed").read_text())
        assert pid != failed_pid, f"item {x} was retried on the replica it failed on"


def test_bad_inputs_are_refused_before_work_is_sent():
    with pytest.raises(AttributeError, match="Tagged has no method 'predcit'"):
        rm.mapper(rm.module(Tagged), method="predcit")
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with pytest.raises(TypeError, match="uses_lock.*cannot be pickled"):
        rm.mapper(uses_lock)
    with rm.mapper(double, replicas=1) as m:
        with pytest.raises(TypeError, match=r"input item 2 .*cannot be pickled"):
            m.map([1, 2, threading.Lock()], batch_size=1)
        with pytest.raises(TypeError, match=r"kwargs\['lock'\] cannot be pickled"):
            m.map([1], kwargs={"lock": lock})
        with pytest.raises(ValueError, match="batch_size"):
            m.map([1], batch_size=0)
        with pytest.raises(AttributeError, match="no method 'load'"):
            m.broadcast("load")
    with pytest.raises(ValueError, match="concurrency"):
        rm.mapper(double, concurrency=0)
    with pytest.raises(TypeError, match="function mapper runs only on auto replicas"):
        rm.mapper(double, replicas=[RemoteTagged.remote()])


def test_shutdown_and_context_exit_kill_auto_replicas_but_not_user_actors():
    user = RemoteTagged.remote("mine")
    with rm.mapper(RemoteTagged, method="predict", replicas=[user], env=rm.Env(name="ctx")) as m:
        m.add_replicas(1)
        m.wait_ready(timeout=60)
        tagged = m.map(range(20), batch_size=1)
        assert [value for _, value in tagged] == [10 * x for x in range(20)]
        assert {tag for tag, _ in tagged} == {"mine", "auto"}, "your actor and the auto replica"
        assert ray.get_actor("ctx_replica_0", namespace="rhmapper")
    assert wait_gone("ctx_replica_0")
    assert ray.get(user.whoami.remote())[0] == "mine"
    m2 = rm.mapper(double, replicas=2, env=rm.Env(name="shut"))
    assert m2.map([1]) == [2]
    m2.shutdown()
    assert wait_gone("shut_replica_0") and wait_gone("shut_replica_1")
    assert m2.num_replicas == 0
    ray.kill(user)


def test_progress_bar_counts_every_item(capsys):
    with rm.mapper(double, replicas=2, env=rm.Env(name="bar")) as m:
        m.map(range(50), progress=True)
    err = capsys.readouterr().err
    assert "bar" in err and "50/50" in err and "replicas=" in err


def test_a_later_map_of_a_mapper_sends_no_one_item_calls(monkeypatch):
    """The first map measures an item with one-item calls; the next one sizes its calls from
    that measurement at once."""
    from rhmapper.ray_replica import RayReplica

    sizes: list[int] = []
    start = RayReplica.start

    def counting_start(self, call, first, items, *args, **kwargs):
        sizes.append(len(items))
        return start(self, call, first, items, *args, **kwargs)

    monkeypatch.setattr(RayReplica, "start", counting_start)
    with rm.mapper(abs, replicas=2) as m:
        m.wait_ready(timeout=120)
        assert m.map(range(-2000, 0)) == list(range(2000, 0, -1))
        first_map, sizes[:] = list(sizes), []
        assert m.map(range(-4000, -2000)) == list(range(4000, 2000, -1))
    assert first_map[:2] == [1, 1]
    assert sum(sizes) == 2000 and min(sizes) > 1, sizes
