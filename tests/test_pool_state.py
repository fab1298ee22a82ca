"""The pool's policy without Ray: event sequences fed to `PoolState.handle`, actions checked."""

from __future__ import annotations

import pytest

from rhmapper.errors import NoReplicasError, PoolMismatchError, RhmapperError
from rhmapper.pool_calls import STUCK_GRACE_SECONDS
from rhmapper.pool_events import (
    ClusterLost,
    Create,
    Died,
    Drained,
    Fail,
    Probe,
    Probed,
    ProbeOutcome,
    Stop,
    Tick,
    Unavailable,
    Warn,
)
from rhmapper.pool_records import (
    CallRecord,
    IllegalTransition,
    Reason,
    ReplicaRecord,
    ReplicaState,
)
from rhmapper.pool_state import PoolState

FINGERPRINT = {"target": "t1", "constructor": "c1"}


def pool(replace_mismatched: bool = False, ready_timeout: float | None = None) -> PoolState:
    return PoolState("p", FINGERPRINT, replace_mismatched, ready_timeout, resources=["CPU"])


def auto(state: PoolState, index: int, ready: bool = True) -> ReplicaRecord:
    replica = state.join(ReplicaRecord(f"p_replica_{index}", owned=True, requested=1, index=index))
    if ready:
        assert state.handle(Probed(replica, ProbeOutcome.READY, fingerprint=FINGERPRINT)) == []
    return replica


def yours(state: PoolState, name: str, requested: int | None = None,
          max_concurrency: int = 1) -> ReplicaRecord:
    replica = state.join(ReplicaRecord(name, owned=False, requested=requested))
    state.handle(Probed(replica, ProbeOutcome.READY, max_concurrency=max_concurrency))
    return replica


def send(state: PoolState, replica: ReplicaRecord, token: str, key: str = "map") -> None:
    state.calls.submitted(token, CallRecord(None, replica, submitted_at=0.0, key=key),
                    asks_at_once=False)


def kinds(actions: list) -> list[str]:
    return [type(action).__name__ for action in actions]


def test_a_replica_that_dies_mid_call_is_replaced_at_its_place_under_its_index():
    state = pool()
    first, second = auto(state, 0), auto(state, 1)
    send(state, first, "call-a")
    actions = state.handle(Died(first, "actor died\nmore"))
    assert actions == [Stop(first, kill=True, reason=Reason.REPLACES_DEAD),
                       Create(0, Reason.REPLACES_DEAD, position=0)]
    assert first.state is ReplicaState.DEAD and first not in state.slots
    assert state.replicas == [second]
    # Its call's slot is given back when its map fetches the failed call: the dead record's
    # count drops, the live replica's does not move.
    state.calls.fetched("call-a", now=1.0)
    assert first.in_flight == 0 and second.in_flight == 0
    assert state.handle(Died(first, "again")) == []  # a second report of the same death


def test_your_actor_that_dies_is_dropped_with_a_warning_naming_it_and_not_killed():
    state = pool()
    actor = yours(state, "Model(ab12)")
    [stop, warn] = state.handle(Died(actor, "node 3 died\ntraceback..."))
    assert stop == Stop(actor, kill=False, reason=Reason.DIED)
    assert isinstance(warn, Warn) and "Model(ab12)" in warn.message
    assert warn.message.endswith("Cause: node 3 died")
    assert isinstance(state.idle_error(), NoReplicasError)
    assert "no replicas left" in str(state.idle_error())


def test_a_death_reported_during_a_replace_creates_one_replacement():
    """The probe of the replaced replica and a failed call both report its death: the second
    report finds it gone and does nothing; the replacement's own death is replaced again."""
    state = pool()
    first = auto(state, 0)
    assert kinds(state.handle(Died(first, "probe failed"))) == ["Stop", "Create"]
    assert state.handle(Probed(first, ProbeOutcome.DIED, "call failed")) == []
    replacement = auto(state, 0, ready=False)  # what the Ray pool does for the Create
    assert replacement.state is ReplicaState.STARTING
    actions = state.handle(Probed(replacement, ProbeOutcome.DIED, "died while starting"))
    assert actions == [Stop(replacement, kill=True, reason=Reason.REPLACES_DEAD),
                       Create(0, Reason.REPLACES_DEAD, position=0)]


def test_a_mismatched_named_replica_is_refused_alive_and_later_maps_are_told_why():
    state = pool()
    replica = auto(state, 0, ready=False)
    actions = state.handle(Probed(replica, ProbeOutcome.READY,
                                  fingerprint={"target": "old", "constructor": "c1"}))
    assert kinds(actions) == ["Stop", "Fail"]
    assert actions[0].kill is False, "another mapper's replica stays alive"
    assert isinstance(actions[1].error, PoolMismatchError)
    assert "built from another target" in str(actions[1].error)
    assert isinstance(state.idle_error(), PoolMismatchError)


def test_a_mismatched_replica_is_rebuilt_under_its_name_when_asked():
    state = pool(replace_mismatched=True)
    auto(state, 0)
    replica = auto(state, 1, ready=False)
    actions = state.handle(Probed(replica, ProbeOutcome.READY, fingerprint={"target": "old"}))
    assert actions == [Stop(replica, kill=True, reason=Reason.REPLACES_MISMATCHED),
                       Create(1, Reason.REPLACES_MISMATCHED, position=1,
                              wait_for_name="p_replica_1")]


def test_your_actor_benched_by_an_overtime_call_comes_back_when_it_answers():
    state = pool()
    actor = yours(state, "Model(1)", requested=2, max_concurrency=2)
    send(state, actor, "slow")
    send(state, actor, "slower")
    state.calls.abandoned("slow", actor, deadline=10.0, answered=False)
    state.calls.abandoned("slower", actor, deadline=10.0, answered=False)
    assert state.handle(Tick(10.0 + STUCK_GRACE_SECONDS - 0.01)) == []
    assert actor.state is ReplicaState.READY
    assert state.handle(Tick(10.0 + STUCK_GRACE_SECONDS)) == []
    assert actor.state is ReplicaState.BENCHED and actor not in state.slots
    error = state.idle_error()
    assert isinstance(error, NoReplicasError) and error.benched
    state.handle(Drained("slow"))
    assert actor.state is ReplicaState.BENCHED, "still stuck on its other call"
    state.handle(Drained("slower"))
    assert actor.state is ReplicaState.READY and actor.in_flight == 0
    assert [state for state, _ in actor.history] == [
        ReplicaState.STARTING, ReplicaState.READY, ReplicaState.BENCHED, ReplicaState.READY]


def test_an_auto_replica_with_an_overtime_call_is_restarted_and_its_slot_freed():
    state = pool()
    first, second = auto(state, 0), auto(state, 1)
    send(state, second, "stuck")
    state.calls.abandoned("stuck", second, deadline=5.0, answered=False)
    actions = state.handle(Tick(5.0 + STUCK_GRACE_SECONDS))
    assert actions == [Stop(second, kill=True, reason=Reason.OVERTIME),
                       Create(1, Reason.OVERTIME, position=1)]
    assert second.in_flight == 0 and "stuck" not in state.calls.records
    assert state.handle(Drained("stuck")) == []  # its late answer changes nothing
    assert state.replicas == [first]


def test_an_overtime_call_on_a_replica_out_of_rotation_is_looked_at_again_later():
    state = pool()
    replica = auto(state, 0)
    send(state, replica, "stuck")
    state.calls.abandoned("stuck", replica, deadline=0.0, answered=False)
    state.handle(Unavailable(replica))
    assert replica.state is ReplicaState.STARTING
    assert state.handle(Tick(STUCK_GRACE_SECONDS)) == []
    state.handle(Probed(replica, ProbeOutcome.READY, fingerprint=FINGERPRINT))
    assert state.handle(Tick(STUCK_GRACE_SECONDS + 0.5)) == []  # re-armed a grace later
    assert kinds(state.handle(Tick(2 * STUCK_GRACE_SECONDS))) == ["Stop", "Create"]


def test_draining_calls_hold_their_slot_until_they_answer_and_free_it_once():
    state = pool()
    replica = auto(state, 0)
    send(state, replica, "a")
    send(state, replica, "b")
    assert replica.in_flight == 2
    state.calls.answered("a")  # answered before its map gave up on it: the slot is free at once
    state.calls.abandoned("a", replica, deadline=None, answered=True)
    state.calls.abandoned("b", replica, deadline=None, answered=False)
    assert replica.in_flight == 1 and "b" in state.calls.draining
    assert state.handle(Tick(1e9)) == [], "no deadline: a draining call never restarts anything"
    state.handle(Drained("b"))
    state.handle(Drained("b"))
    assert replica.in_flight == 0 and not state.calls.draining and not state.calls.records


def test_a_cluster_lost_while_idle_takes_every_replica_out_with_one_warning():
    state = pool()
    first, second = auto(state, 0), auto(state, 1, ready=False)
    [warn] = state.handle(ClusterLost("10.0.0.2:10001", "connection reset"))
    assert isinstance(warn, Warn) and warn.reason is Reason.CLUSTER_LOST
    assert "cluster 10.0.0.2:10001 is unreachable: its 2 replica(s)" in warn.message
    assert first.state is second.state is ReplicaState.DEAD and not state.replicas
    assert len(state.slots) == 0 and state.unreachable
    assert state.handle(ClusterLost("10.0.0.2:10001", "again")) == []


def test_an_unavailable_replica_is_probed_again_and_marked_unsure():
    state = pool()
    replica = auto(state, 0)
    assert state.handle(Unavailable(replica)) == [Probe(replica, Reason.RESTARTING)]
    assert replica.unsure and replica.state is ReplicaState.STARTING
    assert state.handle(Unavailable(replica)) == [], "already being probed"
    assert state.handle(Probed(replica, ProbeOutcome.UNAVAILABLE)) == [
        Probe(replica, Reason.RESTARTING)]
    state.handle(Probed(replica, ProbeOutcome.READY, fingerprint=FINGERPRINT))
    assert replica in state.slots


def test_a_replica_that_cannot_start_is_dropped_and_the_failure_raised():
    state = pool()
    replica = auto(state, 0, ready=False)
    cause = ValueError("pip failed")
    stop, fail = state.handle(Probed(replica, ProbeOutcome.RUNTIME_ENV_FAILED, "{}: pip", cause))
    assert stop == Stop(replica, kill=True, reason=Reason.RUNTIME_ENV_FAILED)
    assert isinstance(fail, Fail) and isinstance(fail.error, RhmapperError)
    assert "could not set up its runtime_env" in str(fail.error) and fail.error.__cause__ is cause


def test_your_actors_slots_fit_their_max_concurrency_with_a_warning_when_fewer():
    state = pool()
    replica = state.join(ReplicaRecord("Model(1)", owned=False, requested=4))
    [warn] = state.handle(Probed(replica, ProbeOutcome.READY, max_concurrency=2))
    assert "runs at most 2 call(s) at once" in warn.message and replica.capacity == 2
    other = state.join(ReplicaRecord("Model(2)", owned=False, requested=None))
    assert state.handle(Probed(other, ProbeOutcome.READY, max_concurrency=3)) == []
    assert other.capacity == 3 and state.slots.total == 5


def test_drop_takes_the_newest_auto_replicas_first_then_your_actors():
    state = pool()
    actor = yours(state, "Model(1)")
    first, second = auto(state, 0), auto(state, 1)
    actions = state.drop(3)
    assert [(action.replica, action.kill) for action in actions] == [
        (second, True), (first, True), (actor, False)]
    assert "every replica died or was dropped" in str(state.idle_error())


def test_an_illegal_transition_raises_naming_the_replica_and_its_history():
    state = pool()
    replica = auto(state, 0)
    state.handle(Died(replica, "gone"))
    with pytest.raises(IllegalTransition, match=r"p_replica_0 cannot go from dead to ready .*"
                       r"history: starting \(added\), ready \(its probe answered\), dead"):
        state.move(replica, ReplicaState.READY, Reason.PROBED)


def test_a_stale_probe_answer_changes_nothing():
    state = pool()
    replica = auto(state, 0)
    assert state.handle(Probed(replica, ProbeOutcome.DIED, "old probe")) == []
    assert replica.state is ReplicaState.READY


def test_ready_timeout_and_an_unschedulable_cluster_are_reported_while_starting():
    state = pool(ready_timeout=5.0)
    replica = auto(state, 0, ready=False)
    assert state.idle_error(now=replica.started_at + 1) is None
    assert "ready_timeout=5.0s (not enough free CPU" in str(
        state.idle_error(now=replica.started_at + 6))
    assert state.feasibility_due(now=replica.started_at + 2)
    assert not state.feasibility_due(now=replica.started_at + 2.5), "at most once a second"


def test_a_maps_end_is_sent_only_when_a_replica_may_have_asked():
    state = pool()
    replica = auto(state, 0)
    send(state, replica, "quick", key="quiet-map")
    state.calls.fetched("quick", now=0.001)
    assert not state.calls.end_heard("quiet-map")
    send(state, replica, "long", key="long-map")
    state.calls.fetched("long", now=1.0)
    assert state.calls.end_heard("long-map") and not state.calls.end_heard("long-map")
    send(state, replica, "left", key="ended-map")
    state.calls.abandoned("left", replica, deadline=None, answered=False)
    assert state.calls.end_heard("ended-map"), "an abandoned call may still start"
