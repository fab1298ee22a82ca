"""Batched calls without Ray: the mapper's ``batched=`` argument, and how a replica splits a
failing batch until the items that raise fail alone (`rhmapper.batching.BatchedCall`)."""

from __future__ import annotations

import pytest

from rhmapper.batching import Batched, BatchedCall, batched_of


def run(fn, items, stop_reason=lambda position: None):
    """Drive a `BatchedCall` over ``items`` as a replica does; count fn's calls."""
    calls = []
    batch = BatchedCall(len(items), fn.__name__, stop_reason)
    while (span := batch.next_span()) is not None:
        calls.append(span)
        try:
            result = fn(items[span[0]:span[1]])
        except Exception as error:
            batch.failed(*span, error)
            continue
        batch.answered(*span, result)
    return batch, calls


def increment_unless_bad(batch, bad=(13,)):
    if any(x in bad for x in batch):
        raise ValueError(f"bad item in {batch}")
    return [x + 1 for x in batch]


def test_a_good_batch_is_one_call():
    batch, calls = run(increment_unless_bad, list(range(100, 164)))
    assert calls == [(0, 64)]
    assert batch.values == list(range(101, 165)) and batch.errors == {}


@pytest.mark.parametrize("bad_position", [0, 13, 31, 32, 63])
def test_one_bad_item_of_64_costs_at_most_12_extra_calls_and_fails_alone(bad_position):
    batch, calls = run(lambda xs: increment_unless_bad(xs, bad=(bad_position,)), list(range(64)))
    assert len(calls) - 1 <= 12
    assert set(batch.errors) == {bad_position}
    assert str(batch.errors[bad_position]) == f"bad item in [{bad_position}]"
    assert [value for position, value in enumerate(batch.values) if position != bad_position] == [
        x + 1 for x in range(64) if x != bad_position]


def test_several_bad_items_each_fail_with_their_own_exception():
    batch, _ = run(lambda xs: increment_unless_bad(xs, bad=(3, 40, 41)), list(range(50)))
    assert {position: str(error) for position, error in batch.errors.items()} == {
        3: "bad item in [3]", 40: "bad item in [40]", 41: "bad item in [41]"}
    assert batch.values[4] == 5 and batch.values[42] == 43


@pytest.mark.parametrize("result, problem", [
    ([1, 2], "returned 2 values"), ("abc", "returned str, not a sequence"),
    (None, "returned NoneType, not a sequence"), ({"a": 1, "b": 2, "c": 3}, "returned dict")])
def test_a_wrong_result_fails_every_item_with_a_clear_error_and_is_not_split(result, problem):
    def wrong(batch):
        return result
    batch, calls = run(wrong, [1, 2, 3])
    assert calls == [(0, 3)], "a wrong shape is the function's, for every batch: no split"
    assert set(batch.errors) == {0, 1, 2}
    message = str(batch.errors[0])
    assert "wrong" in message and "batch of 3 items" in message and problem in message


def test_a_tuple_or_any_sized_sequence_is_a_result():
    batch, _ = run(lambda xs: tuple(x * 2 for x in xs), [1, 2, 3])
    assert batch.values == [2, 4, 6]


def test_a_stop_before_a_span_leaves_the_rest_not_started():
    stops = {2: "cancelled"}
    batch, calls = run(lambda xs: increment_unless_bad(xs, bad=(1,)), [0, 1, 2, 3],
                       stop_reason=lambda position: stops.get(position))
    assert calls == [(0, 4), (0, 2), (0, 1), (1, 2)]
    assert batch.not_started == (2, "cancelled")
    assert batch.values[:2] == [1, None] and set(batch.errors) == {1}


def test_batched_argument_and_max_size_are_checked():
    assert batched_of(True) == Batched(64) and batched_of(False) is None
    assert batched_of(Batched(max_size=8)).max_size == 8
    with pytest.raises(TypeError, match="batched must be True, False or rm.Batched"):
        batched_of("yes")
    with pytest.raises(ValueError, match=r"Batched\(max_size=...\) must be a whole number >= 1"):
        Batched(max_size=0)
    with pytest.raises(TypeError, match="whole number"):
        Batched(max_size=2.5)
    assert Batched(max_size=16).size_of("auto") == 16
    with pytest.raises(ValueError, match="batch_size=17 is more than"):
        Batched(max_size=16).size_of(17)


def test_max_wait_ms_is_checked():
    with pytest.raises(ValueError, match=r"max_wait_ms=...\) must be a number of milliseconds"):
        Batched(max_wait_ms=-1)
    assert Batched(max_wait_ms=0).max_wait_ms == 0
