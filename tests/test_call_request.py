"""The request a call carries to a replica (`rhmapper.wire.CallRequest`): its wire form is the
plain six-element list the pool sends (items of plain data in one C pickle), it reads back to the same request, and a replica runs
exactly that list (the shape ``rhmapper.replicas`` builds) with its guard honoured."""

from __future__ import annotations

import pickle
import time

import pytest

from rhmapper.digests import input_digests
from rhmapper.wire import BatchReply, CallRequest, Guard, plain_pickle


def test_a_request_round_trips_through_its_wire_form():
    guarded = CallRequest("predict", [(1, 2), (3, 4)], star=True, kwargs={"scale": "ref"},
                          guard=Guard("board_0", "map-7", 30.0, 10.0))
    unguarded = CallRequest("fn", [1, "x", None])
    batched = CallRequest("embed", [[0.5, 1.5]], batched=True)
    digested = CallRequest("fn", [1], digests=True)
    for request in (guarded, unguarded, batched, digested):
        wire = request.to_wire()
        assert type(wire) is list and len(wire) == 7
        assert CallRequest.from_wire(wire) == request
        assert CallRequest.from_wire(tuple(wire)) == request
        assert CallRequest.from_wire(wire).plain and not request.plain
    assert guarded.to_wire()[2:] == [True, {"scale": "ref"}, ["board_0", "map-7", 30.0, 10.0],
                                     False, False]
    assert unguarded.to_wire()[2:] == [False, None, None, False, False]
    assert batched.to_wire()[2:] == [False, None, None, True, False]
    assert digested.to_wire()[2:] == [False, None, None, False, True]
    assert pickle.loads(guarded.to_wire()[1]) == [(1, 2), (3, 4)]


def test_items_that_are_not_plain_data_travel_as_they_are_for_ray_to_serialize():
    """An object of a class (an ``ObjectRef`` among them) is not plain data: those items go as
    a list, and the replica looks for references in them."""

    class Point:
        def __init__(self, x):
            self.x = x

    items = [1, Point(2)]
    wire = CallRequest("fn", items).to_wire()
    assert wire[1] is items
    read = CallRequest.from_wire(wire)
    assert read.items is items and not read.plain
    assert plain_pickle([1, 2.5, "s", b"b", None, True, (1,), [2], {"k": {3}}]) is not None
    for not_plain in (3j, Point(1), len, type, frozenset({Point(1)}), [[Point(1)]]):
        assert plain_pickle([1, not_plain]) is None, not_plain


def test_the_wire_form_pickles_no_class_of_rhmapper():
    """Ray packs a list of plain values without pickling a class: the codec names the fields,
    it adds nothing that travels."""
    wire = CallRequest("fn", [1, 2], guard=Guard("board", "key", 1.0, 0.5)).to_wire()
    assert b"rhmapper" not in pickle.dumps(wire, protocol=5)


def test_from_wire_reads_the_lists_the_pool_sends():
    """The literal shapes ``RayReplica.start`` and ``RayReplica.broadcast`` build."""
    items, kwargs, now = [5, 6], {"k": "ref"}, time.time()
    started = CallRequest.from_wire(["fn", items, False, kwargs, ["b", "m", now + 3, now], False,
                                      False])
    assert (started.method, started.items, started.star, started.kwargs) == ("fn", items, False,
                                                                            kwargs)
    assert started.items is items
    assert started.guard == Guard(board="b", key="m", deadline=now + 3, sent_at=now)
    idle = CallRequest.from_wire(["fn", items, False, None, [None, None, None, None], False,
                                   False])
    assert idle.guard == Guard(None, None, None, None)
    broadcast = CallRequest.from_wire(["warm_up", [("a", 1)], True, None, None, False, False])
    assert (broadcast.method, broadcast.items, broadcast.star, broadcast.guard) == (
        "warm_up", [("a", 1)], True, None)


def test_sent_now_moves_the_deadline_by_the_wait_in_the_driver():
    request = CallRequest("fn", [1], guard=Guard("b", "m", deadline=10.0, sent_at=4.0))
    later = request.sent_now(5.5)
    assert later.guard == Guard("b", "m", deadline=11.5, sent_at=4.0)
    assert later.items is request.items and request.guard.deadline == 10.0  # a new request
    assert request.sent_now(3.0).guard.deadline == 10.0  # a clock step back moves nothing
    assert CallRequest("fn", [1]).sent_now(5.5).guard is None
    no_deadline = CallRequest("fn", [1], guard=Guard("b", "m", None, 4.0))
    assert no_deadline.sent_now(9.0) == no_deadline


class Counter:
    """A replica's class that counts the items it ran."""

    def __init__(self) -> None:
        self.runs = 0

    def add_one(self, x: int) -> int:
        self.runs += 1
        return x + 1

    def runs_so_far(self) -> int:
        return self.runs


@pytest.mark.timeout(120)
def test_a_replica_runs_the_wire_list_and_honours_its_guard(ray_local):
    import ray

    from rhmapper.module import replica_class, run_call

    actor = ray.remote(replica_class(Counter)).remote()
    try:
        now = time.time()
        # as RayReplica.start builds it: method, items, star, kwargs, [board, key, deadline,
        # sent], batched, digests
        ran = BatchReply.from_wire(ray.get(actor._rhmapper_run.remote(
            ["add_one", [1, 2, 3], False, None, [None, None, now + 60, now], False, True]),
            timeout=60)).unpacked()
        assert ran.values == [2, 3, 4] and ran.failures is None and ran.not_started is None
        assert ran.digests == input_digests([1, 2, 3])  # a checkpointed map's: made there
        assert pickle.loads(ran.values_pickle) == [2, 3, 4]  # the one pickle the values came in
        assert ray.get(actor.runs_so_far.remote(), timeout=60) == 3
        # past its deadline: the replica starts none of its items
        late = CallRequest("add_one", [4, 5], guard=Guard(None, None, now - 1, now - 2))
        refused = BatchReply.from_wire(ray.get(actor._rhmapper_run.remote(late.to_wire()),
                                               timeout=60)).unpacked()
        assert refused.not_started == (0, "timeout") and refused.values == [None, None]
        assert refused.digests is None  # not asked for
        assert ray.get(actor.runs_so_far.remote(), timeout=60) == 3
        # your actors run the same entry point through __ray_call__
        via_ray_call = BatchReply.from_wire(ray.get(actor.__ray_call__.remote(
            run_call, CallRequest("add_one", [(10,)], star=True).to_wire()), timeout=60)).unpacked()
        assert via_ray_call.values == [11]
        assert ray.get(actor.runs_so_far.remote(), timeout=60) == 4
    finally:
        ray.kill(actor)


def test_values_of_one_type_travel_in_one_pickle_and_fail_together_if_unreadable():
    import numpy as np

    from rhmapper.wire import WHOLE, pack_values

    values = list(np.arange(5, dtype=np.int64))
    packed_values, failures, packed = pack_values(values, {}, lambda obj: False)
    assert packed == WHOLE and packed_values[0] == 5 and failures == {}
    assert BatchReply(packed_values, None, 0.1, packed).unpacked().values == values
    unreadable = BatchReply([2, b"not a pickle"], None, 0.1, WHOLE).unpacked()
    assert unreadable.values == [None, None]
    assert {position: failure.type_name for position, failure in unreadable.failures.items()} == {
        0: "UnreadableResult", 1: "UnreadableResult"}
    mixed, _, packed = pack_values([np.int64(1), np.float32(2.0)], {}, lambda obj: False)
    assert packed is True and len(mixed) == 2, "two types: one pickle per value"
