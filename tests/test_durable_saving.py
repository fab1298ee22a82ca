"""How a durable map's results reach its checkpoint, without Ray: a call that succeeded whole is
saved as it came (its indexes as a range, the replica's digests and its one pickle of values);
a call with failed or unstarted items saves only the items that succeeded, their digests cut
out of the replica's and their values pickled again."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

import rhmapper.checkpoint_store
import rhmapper.durable
import rhmapper.errors
from rhmapper.checkpoint_read import indexed_results
from rhmapper.digests import input_digest, input_digests
from rhmapper.durable import Checkpointing, DurableMap
from rhmapper.plan import MapPlan
from rhmapper.results import ResultBook, SentCall
from rhmapper.wire import BatchReply, CallSpec, RemoteFailure, pack_values

pytestmark = pytest.mark.timeout(60)
REPLICA = SimpleNamespace(name="replica_0")


def replica_reply(items: list, failed: dict[int, Exception] | None = None,
                  not_started: tuple[int, str] | None = None) -> BatchReply:
    """The reply a replica of a checkpointed map sends for ``items`` (squaring them), through
    the wire form and unpacked as the driver unpacks it."""
    failures = {position: RemoteFailure.capture(error) for position, error in
                (failed or {}).items()}
    values = [None if position in failures or (not_started and position >= not_started[0])
              else item * item for position, item in enumerate(items)]
    packed, failures, how = pack_values(values, failures, lambda obj: False)
    wire = BatchReply(packed, failures or None, 0.01, how, not_started,
                      input_digests(items)).to_wire()
    return BatchReply.from_wire(wire).unpacked()


def recording_book() -> tuple[ResultBook, list]:
    saved: list = []
    book = ResultBook(MapPlan(CallSpec("fn", digests=True), ordered=True, return_exceptions=True),
                      on_progress=None, on_values=lambda *args: saved.append(args))
    return book, saved


def test_a_call_that_succeeded_whole_is_handed_on_as_it_came():
    book, saved = recording_book()
    items = [3, 4, 5]
    reply = replica_reply(items)
    assert reply.values_pickle is not None and pickle.loads(reply.values_pickle) == [9, 16, 25]
    book.record(SentCall(REPLICA, 10, items, False, None, None), reply, ran=3)
    [(indexes, got_items, values, digests, values_pickle)] = saved
    assert indexes == range(10, 13) and got_items is items and values == [9, 16, 25]
    assert digests is reply.digests and digests == input_digests(items)
    assert values_pickle is reply.values_pickle


def test_a_call_with_a_failed_item_hands_on_only_the_others_with_their_own_digests():
    book, saved = recording_book()
    items = [3, 4, 5, 6]
    book.record(SentCall(REPLICA, 20, items, False, None, None),
                replica_reply(items, failed={1: ValueError("four")}), ran=4)
    [(indexes, got_items, values, digests, values_pickle)] = saved
    assert list(indexes) == [20, 22, 23] and got_items == [3, 5, 6] and values == [9, 25, 36]
    assert digests == input_digest(3) + input_digest(5) + input_digest(6)
    assert values_pickle is None  # the one pickle held the failed item's hole: pickled again


def test_a_call_cut_short_hands_on_only_the_items_that_ran():
    book, saved = recording_book()
    items = [7, 8, 9]
    book.record(SentCall(REPLICA, 0, items, False, None, None),
                replica_reply(items, not_started=(1, "cancelled")), ran=1)
    [(indexes, got_items, values, digests, values_pickle)] = saved
    assert list(indexes) == [0] and values == [49] and digests == input_digest(7)
    assert values_pickle is None


def test_a_durable_map_saves_the_replicas_pickle_and_digests_without_making_its_own(
        tmp_path, monkeypatch):
    def refuse(*args):
        raise AssertionError("the driver made what the replica had sent")

    monkeypatch.setattr(rhmapper.durable, "dumps", refuse)
    monkeypatch.setattr(rhmapper.durable, "input_digests", refuse)
    spec = Checkpointing(str(tmp_path), {"target": "square"})
    items = [3, 4, 5]
    reply = replica_reply(items)
    assert reply.values_pickle is not None and reply.digests is not None
    with DurableMap(spec, ordered=True) as durable:
        durable.on_values(range(0, 3), items, reply.values, reply.digests, reply.values_pickle)
    assert list(indexed_results(str(tmp_path))) == [(0, 9), (1, 16), (2, 25)]
    with DurableMap(spec, ordered=True) as durable:
        assert durable.stored_before == 3
        durable.store.check_input(1, input_digest(4))  # the replica's digest is the driver's


def saved_checkpoint(uri: str, runs: list[range]) -> None:
    """A checkpoint of a map of ``square`` with the results of ``runs`` (of inputs
    ``("item", i)``) saved."""
    from rhmapper.checkpoint_store import CheckpointStore

    with CheckpointStore.open(uri, {"target": "square"}) as store:
        for indexes in runs:
            items = [("item", index) for index in indexes]
            store.add_run(indexes, input_digests(items), pickle.dumps([f"r{index}" for index in
                                                                      indexes]))


def test_a_resumed_list_sends_only_its_unsaved_items_and_checks_the_others_a_stretch_at_a_time(
        tmp_path):
    """Stretches longer than one check (`CHECK_STRETCH`) and stretches between gaps: the unsaved
    items go on with their indexes in the user's input, a changed item far inside a stretch is
    named by its index."""
    from rhmapper.checkpoint_store import CHECK_STRETCH

    uri = str(tmp_path)
    total = CHECK_STRETCH + 5000
    saved_checkpoint(uri, [range(0, 10), range(12, CHECK_STRETCH + 100),
                           range(CHECK_STRETCH + 200, total - 1)])
    spec = Checkpointing(uri, {"target": "square"})
    items = [("item", index) for index in range(total)]
    with DurableMap(spec, ordered=True) as durable:
        rest = durable.source(items)
        missing = [10, 11, *range(CHECK_STRETCH + 100, CHECK_STRETCH + 200), total - 1]
        assert rest == [("item", index) for index in missing]
        durable.on_values(range(len(rest)), rest, [f"r{item[1]}" for item in rest])
        results = durable.collected([f"r{item[1]}" for item in rest])
    assert results == [f"r{index}" for index in range(total)]
    changed = list(items)
    changed[CHECK_STRETCH + 50] = ("item", "changed")
    with DurableMap(spec, ordered=True) as durable, pytest.raises(
            rhmapper.errors.CheckpointMismatchError, match=f"input {CHECK_STRETCH + 50} differs"):
        durable.source(changed)


def test_inputs_that_are_not_plain_data_are_checked_one_by_one_and_named(tmp_path):
    uri = str(tmp_path)
    with rhmapper.checkpoint_store.CheckpointStore.open(uri, {"target": "f"}) as store:
        items = [complex(index, 1) for index in range(50)]  # objects of a class: not plain
        store.add_run(range(50), input_digests(items), pickle.dumps(list(range(50))))
    store = rhmapper.checkpoint_store.CheckpointStore.open(uri, {"target": "f"})
    store.check_inputs(items, 0, 50)
    with pytest.raises(rhmapper.errors.CheckpointMismatchError, match="input 37 differs"):
        store.check_inputs(items[:37] + [complex(0, 0)] + items[38:], 0, 50)
    store.close()
