"""The autoscaler's policy (`rhmapper.autoscaling`) and the pool state's scaling actions, without
Ray: targets from the backlog, idle replicas stopped, your actors kept, decisions with reasons."""

from __future__ import annotations

import pytest

from rhmapper.autoscaling import Autoscale, Backlog, ScalingPolicy
from rhmapper.pool_events import Create, Stop
from rhmapper.pool_records import Reason, ReplicaRecord, ReplicaState
from rhmapper.pool_state import PoolState


def replica(name: str, owned: bool = True, state: ReplicaState = ReplicaState.READY,
            in_flight: int = 0, idle_since: float = 0.0) -> ReplicaRecord:
    record = ReplicaRecord(name, owned=owned, requested=1, index=0 if owned else None)
    record.state, record.in_flight, record.idle_since = state, in_flight, idle_since
    return record


def backlog_of(items: int, item_seconds: float | None) -> Backlog:
    backlog = Backlog()
    backlog.report("map", items, item_seconds)
    return backlog


def decide(autoscale: Autoscale, backlog: Backlog, replicas: list, now: float = 0.0,
           concurrency: int = 1, start_seconds: float = 10.0):
    policy = ScalingPolicy(autoscale)
    policy.start_seconds = start_seconds
    return policy.decide(now, backlog, concurrency, replicas)


@pytest.mark.parametrize("arguments, message", [
    ({"min": 3, "max": 2}, r"Autoscale\(min=3, max=2\): min must be <= max"),
    ({"min": -1}, r"Autoscale\(min=...\) must be a whole number >= 0"),
    ({"max": 0}, r"Autoscale\(max=...\) must be a whole number >= 1"),
    ({"idle_seconds": 0}, r"Autoscale\(idle_seconds=...\) must be a number of seconds > 0"),
])
def test_bad_arguments_say_what_is_wrong(arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Autoscale(**arguments)


def test_a_backlog_gets_as_many_replicas_as_its_work_needs_in_one_start_time_at_once():
    decision, stop = decide(Autoscale(max=32), backlog_of(1000, 0.05), [])
    assert (decision.change, decision.target, stop) == (5, 5, [])  # 50 s of work / 10 s start
    assert "backlog of 1000 items x 0.05 s per item = 50 replica-seconds" in decision.reason
    decision, _ = decide(Autoscale(max=32), backlog_of(1000, 0.05), [], concurrency=2)
    assert decision.change == 3  # two slots per replica: 25 s each


def test_the_target_never_passes_max_and_says_so():
    decision, _ = decide(Autoscale(max=4), backlog_of(10_000, 1.0), [replica("r0")])
    assert (decision.change, decision.target) == (3, 4)
    assert decision.reason.endswith("at max=4")


def test_unmeasured_items_count_a_replica_start_each_and_a_lone_item_starts_a_pool_at_zero():
    decision, _ = decide(Autoscale(max=32), backlog_of(6, None), [], start_seconds=5.0)
    assert decision.change == 6
    decision, _ = decide(Autoscale(max=32), backlog_of(1, 1e-4), [])
    assert decision.change == 1  # a pool at zero with work starts one replica


def test_small_work_on_a_pool_that_has_replicas_asks_for_none_and_stops_none():
    busy = [replica("r0", in_flight=1), replica("r1", idle_since=-1000.0)]
    decision, stop = decide(Autoscale(max=8, idle_seconds=1), backlog_of(10, 0.01), busy)
    assert (decision.change, stop) == (0, [])  # work waits: nothing is stopped


def test_idle_auto_replicas_stop_newest_first_down_to_min_never_yours_nor_busy_ones():
    yours = replica("yours", owned=False, idle_since=0.0)
    busy = replica("busy", in_flight=1, idle_since=0.0)
    old = replica("old", idle_since=0.0)
    new = replica("new", idle_since=0.0)
    recent = replica("recent", idle_since=55.0)  # idle 5 s at now=60
    pool = [yours, busy, old, recent, new]
    decision, stop = decide(Autoscale(min=2, max=8, idle_seconds=10), Backlog(), pool, now=60.0)
    assert [r.name for r in stop] == ["new", "old"]
    assert (decision.change, decision.target) == (-2, 3)
    assert "2 replica(s) idle for 10 s or more, no work waiting" == decision.reason
    decision, stop = decide(Autoscale(min=4, max=8, idle_seconds=10), Backlog(), pool, now=60.0)
    assert [r.name for r in stop] == ["new"]  # min=4 of 5


def test_a_pool_below_min_grows_to_min_and_starting_replicas_count():
    starting = replica("s", state=ReplicaState.STARTING)
    decision, _ = decide(Autoscale(min=3, max=8), Backlog(), [starting])
    assert (decision.change, decision.reason) == (2, "below min=3")


def test_history_keeps_every_change_and_the_first_no_op_after_one():
    policy = ScalingPolicy(Autoscale(min=0, max=4, idle_seconds=1))
    ready = [replica("r0", idle_since=0.0)]
    policy.decide(0.0, backlog_of(100, None), 1, [])
    for now in (0.1, 0.2, 0.3):
        policy.decide(now, backlog_of(100, None), 1, [replica(f"r{i}") for i in range(4)])
    policy.decide(5.0, Backlog(), 1, ready)
    assert [str(decision).split(":")[0] for decision in policy.history] == [
        "up by 4 (0 -> 4)", "no change (4 -> 4)", "down by 1 (1 -> 0)"]


def test_starts_are_measured_as_replicas_become_ready():
    from rhmapper.pool_events import Probed, ProbeOutcome

    state = PoolState("timed", fingerprint={})
    state.scaling = ScalingPolicy(Autoscale(max=2))
    record = state.join(ReplicaRecord("timed_replica_0", owned=True, requested=1, index=0))
    record.started_at -= 9.0  # it took 9 s
    state.handle(Probed(record, ProbeOutcome.READY, fingerprint={}))
    assert 6.9 < state.scaling.start_seconds < 7.5  # halfway from the 5 s guess to 9 s


def test_the_pool_state_creates_and_stops_replicas_for_the_policy():
    state = PoolState("scaled", fingerprint={})
    state.scaling = ScalingPolicy(Autoscale(min=0, max=3, idle_seconds=1))
    assert state.idle_error() is None  # empty, but the autoscaler will create replicas
    state.slots.backlog.report("map", 50, None)
    actions = state.scale(now=0.0, wall_time=0.0, concurrency=1)
    assert state.scaling.last.change == 3
    assert [(type(a), a.index, a.reason) for a in actions] == [
        (Create, index, Reason.SCALED_UP) for index in range(3)]
    replicas = [state.join(ReplicaRecord(f"scaled_replica_{i}", owned=True, requested=1,
                                         index=i)) for i in range(3)]
    for record in replicas:
        state.move(record, ReplicaState.READY, Reason.PROBED)
        record.idle_since = 0.0
    state.slots.backlog.report("map", 0, None)
    actions = state.scale(now=2.0, wall_time=0.0, concurrency=1)
    assert state.scaling.last.change == -3
    assert all(isinstance(a, Stop) and a.kill and a.reason is Reason.SCALED_DOWN for a in actions)
    assert state.replicas == [] and len(state.slots) == 0


def test_a_map_whose_work_starts_to_wait_wakes_the_autoscaler_once():
    woken = []
    backlog = Backlog()
    backlog.on_new_work = lambda: woken.append(1)
    backlog.report("map", 10, None)
    backlog.report("map", 8, 0.1)  # the same map, still waiting: no new wake-up
    backlog.report("map", 0, 0.1)
    backlog.report("other", 0, None)  # nothing waits: nothing to wake for
    backlog.report("map", 3, 0.1)
    assert len(woken) == 2


def test_replicas_still_starting_beyond_the_measured_need_are_stopped_never_ready_ones():
    ready = [replica("r0", in_flight=1), replica("r1", in_flight=1)]
    yours = replica("yours", owned=False, state=ReplicaState.STARTING)
    starting = [replica(f"s{i}", state=ReplicaState.STARTING) for i in range(3)]
    pool = ready + [yours] + starting
    # Asked for when each item counted a start-up; measured, 40 items x 0.1 s need 1 replica.
    decision, stop = decide(Autoscale(min=0, max=8), backlog_of(40, 0.1), pool)
    assert [r.name for r in stop] == ["s2", "s1", "s0"]
    assert (decision.change, decision.size, decision.target) == (-3, 6, 3)
    assert decision.reason.endswith("3 replica(s) still starting are not needed")
    decision, stop = decide(Autoscale(min=5, max=8), backlog_of(40, 0.1), pool)
    assert [r.name for r in stop] == ["s2"]  # never below min
    decision, stop = decide(Autoscale(min=0, max=8), backlog_of(600, 0.1), pool)
    assert (decision.change, stop) == (0, [])  # 60 s of work: 6 replicas, and 6 are there


def test_replicas_still_starting_stop_once_no_work_has_waited_for_idle_seconds():
    policy = ScalingPolicy(Autoscale(min=1, max=8, idle_seconds=10))
    starting = [replica(f"s{i}", state=ReplicaState.STARTING) for i in range(3)]
    decision, stop = policy.decide(0.0, backlog_of(50, 1.0), 1, starting)
    assert stop == []
    decision, stop = policy.decide(9.0, Backlog(), 1, starting)
    assert stop == []  # work waited 9 s ago
    decision, stop = policy.decide(10.0, Backlog(), 1, starting)
    assert [r.name for r in stop] == ["s2", "s1"]  # down to min=1
    assert decision.reason == "2 replica(s) idle for 10 s or more, no work waiting"
