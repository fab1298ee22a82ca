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


def call_from_threads(coalescer, calls, timeout=30):
    """``coalescer.call(*arguments)`` for each of ``calls``, each from a thread of its own:
    what each returned, or the exception it raised."""
    import threading

    outcomes = [None] * len(calls)

    def call(position):
        try:
            outcomes[position] = coalescer.call(*calls[position])
        except Exception as error:
            outcomes[position] = error

    threads = [threading.Thread(target=call, args=(position,)) for position in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a coalesced call never returned"
    return outcomes


def test_calls_of_many_threads_share_runs_and_each_gets_its_own_outcome():
    from rhmapper.batching import CallCoalescer

    runs = []

    def run(args, kwargs, options):
        runs.append(len(args))
        return [ValueError(f"{x} is bad") if x == 13 else x * kwargs["scale"] for (x,) in args]

    coalescer = CallCoalescer(max_size=16, max_wait_seconds=0.2, run=run)
    outcomes = call_from_threads(coalescer, [((x,), {"scale": 2}) for x in range(40)])
    assert [outcome for x, outcome in enumerate(outcomes) if x != 13] == [
        2 * x for x in range(40) if x != 13]
    assert isinstance(outcomes[13], ValueError) and str(outcomes[13]) == "13 is bad"
    assert sum(runs) == 40 and len(runs) < 40 and max(runs) <= 16


def test_only_calls_with_equal_kwargs_share_a_run_and_a_failed_run_fails_each_call():
    from rhmapper.batching import CallCoalescer

    kwargs_seen = []

    def run(args, kwargs, options):
        kwargs_seen.append(kwargs)
        if kwargs == {"fail": True}:
            raise RuntimeError("the map was cancelled")
        return [x for (x,) in args]

    coalescer = CallCoalescer(max_size=64, max_wait_seconds=0.2, run=run)
    calls = [((x,), {"fail": x % 2 == 1}) for x in range(10)]
    outcomes = call_from_threads(coalescer, calls)
    assert outcomes[0::2] == [0, 2, 4, 6, 8]
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes[1::2])
    assert sorted(map(str, kwargs_seen)) == ["{'fail': False}", "{'fail': True}"]


def test_a_lone_call_waits_at_most_max_wait():
    import time

    from rhmapper.batching import CallCoalescer

    coalescer = CallCoalescer(max_size=64, max_wait_seconds=0.05, run=lambda args, kwargs, options: [1])
    started = time.monotonic()
    assert coalescer.call((0,), None) == 1
    assert time.monotonic() - started < 5  # loose: waits ~0.05 s, not for a full batch


def test_max_wait_ms_is_checked():
    with pytest.raises(ValueError, match=r"max_wait_ms=...\) must be a number of milliseconds"):
        Batched(max_wait_ms=-1)
    assert Batched(max_wait_ms=0).max_wait_ms == 0
