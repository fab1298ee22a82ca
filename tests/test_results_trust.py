"""A map's promise: every item's result or its own error, each exactly once, and an end (on a
real local Ray). Executions are counted inside the replicas."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import types
import weakref

import pytest
import ray

import rhmapper as rm
from rhmapper.signals import start_board

pytestmark = pytest.mark.usefixtures("ray_local")
REPLICA_ONLY_DIR = os.path.join(os.path.dirname(__file__), "replica_only")


def lock_on_two(x):
    return threading.Lock() if x == 2 else x


def replica_only(x):
    import replica_only_mod

    return replica_only_mod.make(x)


class CustomBase(BaseException):
    pass


def raises_base_exceptions(x):
    if x == 1:
        raise KeyboardInterrupt("user code pressed ctrl-c")
    if x == 2:
        raise SystemExit(3)
    if x == 3:
        raise CustomBase("base")
    return (os.getpid(), x)


def double(x):
    return 2 * x


def sleepy_double(x):
    time.sleep(0.03)
    return 2 * x


async def async_system_exit(x):
    await asyncio.sleep(0)
    if x == 2:
        raise SystemExit(2)
    return x


def test_unpicklable_result_fails_only_its_item():
    with rm.mapper(lock_on_two, replicas=1) as m:
        values = m.map(range(6), batch_size=6, return_exceptions=True)
        assert values[:2] == [0, 1] and values[3:] == [3, 4, 5]
        assert isinstance(values[2], TypeError) and "cannot be pickled" in str(values[2])
        assert "item 2 failed on replica" in values[2].__notes__[-1]
        with pytest.raises(TypeError, match="cannot be pickled"):
            m.map(range(6), batch_size=6)


def test_result_and_exception_classes_only_the_replica_can_import():
    with pytest.raises(ImportError):
        import replica_only_mod  # noqa: F401 - the point: the driver does not have it
    env = rm.Env(name="replica_only", py_modules=[os.path.join(REPLICA_ONLY_DIR, "replica_only_mod.py")])
    with rm.mapper(replica_only, replicas=1, env=env) as m:
        values = m.map(range(5), batch_size=5, return_exceptions=True)
    assert values[0] == 0 and values[2] == 2 and values[4] == 4
    assert isinstance(values[1], rm.RhmapperError) and "could not be unpickled" in str(values[1])
    assert "item 1 failed" in values[1].__notes__[-1]
    assert isinstance(values[3], rm.RhmapperError)
    assert "SecretError: secret failure on 3" in str(values[3])
    assert "could not be rebuilt on the driver" in str(values[3])


def test_base_exceptions_in_user_code_cost_only_their_item():
    with rm.mapper(raises_base_exceptions, replicas=1) as m:
        values = m.map(range(6), batch_size=6, return_exceptions=True)
        assert isinstance(values[1], KeyboardInterrupt) and "item 1" in values[1].__notes__[-1]
        assert isinstance(values[2], SystemExit) and values[2].code == 3
        assert isinstance(values[3], CustomBase)
        pids = {values[i][0] for i in (0, 4, 5)}
        assert [values[i][1] for i in (0, 4, 5)] == [0, 4, 5] and len(pids) == 1
        with pytest.raises(SystemExit):
            m.map([0, 2])
        assert {pid for pid, _ in m.map([0, 4, 5])} == pids, "the replica survived"
    with rm.mapper(async_system_exit, replicas=1) as m:
        values = m.map(range(4), return_exceptions=True)
    assert values[:2] == [0, 1] and values[3] == 3 and isinstance(values[2], SystemExit)


@ray.remote
class Moody:
    """Hangs on the items in ``hang_on``; fails the items in ``fail_once_on`` the first time."""

    def __init__(self, hang_on=(), fail_once_on=()):
        self.hang_on = set(hang_on)
        self.fail_once_on = set(fail_once_on)
        self.runs: dict = {}

    def work(self, x):
        self.runs[x] = self.runs.get(x, 0) + 1
        if x in self.hang_on:
            time.sleep(30)
        if x in self.fail_once_on and self.runs[x] == 1:
            raise RuntimeError(f"first attempt of {x} fails")
        return x * 2

    def counts(self):
        return self.runs


def test_timeout_ends_the_map_when_one_actor_hangs_and_the_other_fails_an_item():
    hung = Moody.remote(hang_on=[0])
    flaky = Moody.remote(fail_once_on=[1])
    try:
        m = rm.mapper(Moody, method="work", replicas=[hung, flaky])
        m.wait_ready()
        started = time.monotonic()
        assert m.map(range(6), timeout=2, retries=2) == [x * 2 for x in range(6)]
        assert time.monotonic() - started < 2 * 3 + 2 + 8
        assert ray.get(flaky.counts.remote())[1] == 2
    finally:
        ray.kill(hung)
        ray.kill(flaky)


def test_timeout_ends_the_map_when_every_actor_hangs():
    hung = Moody.remote(hang_on=range(100))
    try:
        m = rm.mapper(Moody, method="work", replicas=[hung])
        m.wait_ready()
        started = time.monotonic()
        with pytest.raises(rm.NoReplicasError, match="your actors still running calls that "
                           "outlived timeout="):
            m.map(range(4), timeout=1, retries=1)
        assert time.monotonic() - started < 1 * 2 + 2 + 8
    finally:
        ray.kill(hung)


@ray.remote
class Counted:
    """A one-at-a-time actor that counts how often each item ran."""

    def __init__(self):
        self.runs: dict = {}

    def work(self, x, seconds=0.0):
        self.runs[x] = self.runs.get(x, 0) + 1
        time.sleep(seconds)
        return x

    def block(self, seconds):
        time.sleep(seconds)

    def counts(self):
        return self.runs


def test_a_call_cancelled_while_queued_never_runs():
    actor = Counted.remote()
    ray.get(actor.counts.remote())
    m = rm.mapper(Counted, method="work", replicas=[actor])
    m.wait_ready()
    blocker = actor.block.remote(2.0)  # someone else's call: the map's call queues behind it
    threading.Timer(0.5, m.cancel).start()
    with pytest.raises(rm.MapCancelledError):
        m.map(range(5), batch_size=5)
    ray.get(blocker)
    time.sleep(0.3)
    assert ray.get(actor.counts.remote()) == {}, "the cancelled call ran its items"
    ray.kill(actor)


def test_a_cancelled_batch_starts_no_more_items():
    actor = Counted.remote()
    m = rm.mapper(Counted, method="work", replicas=[actor])
    m.wait_ready()
    threading.Timer(0.5, m.cancel).start()
    with pytest.raises(rm.MapCancelledError):
        m.map(range(10), batch_size=10, kwargs={"seconds": 0.2})
    time.sleep(1.0)
    counts = ray.get(actor.counts.remote())
    assert all(runs == 1 for runs in counts.values()) and 1 <= len(counts) <= 5, counts
    ray.kill(actor)


def test_a_call_queued_behind_a_broadcast_on_an_auto_replica_never_runs_once_cancelled():
    with rm.mapper(Counted, method="work", replicas=1) as m:
        m.wait_ready()
        broadcast = threading.Thread(target=m.broadcast, args=("block", 2.0))
        broadcast.start()
        time.sleep(0.3)  # the broadcast runs: the map's call queues behind it
        threading.Timer(0.5, m.cancel).start()
        with pytest.raises(rm.MapCancelledError):
            m.map(range(5), batch_size=5)
        broadcast.join(timeout=10)
        time.sleep(0.3)
        assert m.broadcast("counts") == [{}], "the cancelled call ran its items"


def test_a_cancelled_batch_on_an_idle_auto_replica_starts_no_more_items():
    with rm.mapper(Counted, method="work", replicas=1) as m:
        m.wait_ready()
        threading.Timer(0.5, m.cancel).start()
        with pytest.raises(rm.MapCancelledError):
            m.map(range(10), batch_size=10, kwargs={"seconds": 0.2})
        time.sleep(1.0)
        [counts] = m.broadcast("counts")
        assert all(runs == 1 for runs in counts.values()) and 1 <= len(counts) <= 5, counts


def _questions_asked(handle) -> int:
    """How many maps the replica of ``handle`` asked the end board about."""
    def asked(_instance):
        from rhmapper import signals

        return len(signals._futures)

    return ray.get(handle.__ray_call__.remote(asked))


def _unanswered_questions() -> int:
    """Questions waiting on this driver's end board (each is answered when its map ends)."""
    _, board = start_board()
    return ray.get(board.__ray_call__.remote(lambda board: len(board._waiting)))


def test_a_map_nobody_ends_early_asks_the_end_board_nothing(monkeypatch):
    """Calls sent to idle auto replicas wait behind nothing there, however slow their way: a
    replica does not stop to ask the board before it starts them."""
    from rhmapper import replicas

    with rm.mapper(double, replicas=2) as m:
        m.wait_ready()
        real_time = time.time  # the driver's clock 1 s behind: every call looks 1 s in transit
        monkeypatch.setattr(replicas, "time", types.SimpleNamespace(
            time=lambda: real_time() - 1.0, monotonic=time.monotonic, sleep=time.sleep))
        assert m.map(range(2000)) == [2 * x for x in range(2000)]
        assert list(m.imap(range(500))) == [2 * x for x in range(500)]
        assert [_questions_asked(handle) for handle in m.replicas] == [0, 0]


def test_every_question_to_the_end_board_is_answered():
    """Calls that run long enough ask the board about their map; its end answers them all
    (a map's end is sent whenever a replica may have asked)."""
    with rm.mapper(sleepy_double, replicas=2) as m:
        assert m.map(range(12), batch_size=3) == [2 * x for x in range(12)]
        assert sum(_questions_asked(handle) for handle in m.replicas) >= 1
        deadline = time.monotonic() + 10
        while _unanswered_questions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _unanswered_questions() == 0


def test_a_timed_out_queued_call_never_runs():
    actor = Counted.remote()
    m = rm.mapper(Counted, method="work", replicas=[actor])
    m.wait_ready()
    blocker = actor.block.remote(1.5)
    values = m.map(range(3), timeout=1.0, return_exceptions=True)
    ray.get(blocker)
    assert isinstance(values[0], TimeoutError) and values[1:] == [1, 2]
    assert ray.get(actor.counts.remote()) == {1: 1, 2: 1}, "item 0 was past its deadline"
    ray.kill(actor)


def slow_pid(x):
    time.sleep(0.3)
    return os.getpid()


def test_breaking_out_of_imap_keeps_the_replicas():
    with rm.mapper(slow_pid, replicas=2, concurrency=2) as m:
        pids = set(m.map(range(8), batch_size=1))
        for _ in m.imap(range(40), batch_size=1):
            break
        with pytest.raises(KeyboardInterrupt):
            for _ in m.imap(range(40), batch_size=1):
                raise KeyboardInterrupt  # the consumer's Ctrl-C
        time.sleep(2.5)  # past the grace after which a stuck call would restart a replica
        assert set(m.map(range(8), batch_size=1)) == pids


class Box:
    def __init__(self, x):
        self.x = x


def boxed(x):
    return Box(x)


def test_imap_keeps_no_reference_to_yielded_results():
    with rm.mapper(boxed, replicas=1) as m:
        results = m.imap(range(8), batch_size=8)
        first = next(results)
        watch = weakref.ref(first)
        del first
        gc.collect()
        assert watch() is None
        assert [box.x for box in results] == list(range(1, 8))


def test_errors_say_what_happened():
    m = rm.mapper(slow_pid, replicas=0)
    with pytest.raises(rm.NoReplicasError, match="has no replicas: create it with replicas=N"):
        m.map([1])
    assert m.map([]) == [] and list(m.imap([])) == [] and list(m.imap(iter([]))) == []
    m.shutdown()
    with pytest.raises(rm.RhmapperError, match="was shut down"):
        m.map([1])
    with pytest.raises(ValueError, match="case-sensitive; did you mean 'CPU'"):
        rm.Env(compute={"cpu": 1})
    with rm.mapper(slow_pid, replicas=1) as m:
        with pytest.raises(TypeError, match="takes only the inputs"):
            m.map(slow_pid, [1, 2])


def test_imap_of_nothing_returns_at_once_while_replicas_start():
    with rm.mapper(slow_pid, replicas=2) as m:
        assert list(m.imap(iter([]))) == [] and list(m.imap_unordered([])) == []
        assert m.num_replicas == 2 and not m._backend.pool.slots, "the replicas were starting"
