"""The dispatch loop on an in-process pool: no Ray, so it can run at scales Ray can't here."""

from __future__ import annotations

import collections

import pytest

from rhmapper.errors import NoReplicasError, ReplicaLostError
from rhmapper.retries import Retries
from rhmapper.call_sizing import QUEUE_AHEAD_SECONDS
from rhmapper.plan import MapPlan
from rhmapper.scheduler import MapRun
from rhmapper.wire import CallSpec
from tests.fakes import FakePool, ReplicaKiller


def collect(pool, items, as_list=False, **options):
    """``items`` mapped as ``Mapper.map`` maps a list (``as_list``), else as from an iterator."""
    plan = MapPlan(CallSpec("fn"), collect=True, total=len(items), window=None, **options)
    run = MapRun(pool, plan, list(items) if as_list else iter(items))
    for _ in run.chunks():
        pass
    return run.results, run


def stream(pool, source, ordered=True, window=64, total=None, **options):
    plan = MapPlan(CallSpec("fn"), ordered=ordered, total=total, window=window, **options)
    run = MapRun(pool, plan, source)
    return [value for chunk in run.chunks() for value in chunk], run


@pytest.mark.parametrize("as_list", [False, True], ids=["iterator", "list"])
def test_collect_keeps_input_order_under_shuffled_completion(as_list):
    pool = FakePool(4, fn=lambda x: x * 3, capacity=2, seed=7)
    results, run = collect(pool, list(range(5000)), as_list)
    assert results == [x * 3 for x in range(5000)]
    assert run.stats.done == 5000


@pytest.mark.parametrize("item_seconds, queued_ahead", [(2 * QUEUE_AHEAD_SECONDS, 0), (1e-6, 1)])
def test_slots_are_never_exceeded_and_every_replica_works(item_seconds, queued_ahead):
    """With a fixed batch_size, calls of 5 ms or more never exceed the slots; shorter ones keep
    one more call queued per replica, so that it never idles for a round trip."""
    pool = FakePool(5, capacity=3, item_seconds=item_seconds)
    results, _ = collect(pool, list(range(2000)), batch_size=1)
    assert results == list(range(2000))
    assert all(replica.peak_in_flight == 3 + queued_ahead for replica in pool.replicas)
    assert all(replica.calls for replica in pool.replicas)


@pytest.mark.parametrize("options, queues_ahead", [
    ({"batch_size": 1, "timeout": 10.0}, True), ({}, True), ({"batch_size": 1}, False)],
    ids=["under a timeout", "with auto batches", "on your actors"])
def test_no_call_is_queued_ahead(options, queues_ahead):
    pool = FakePool(5, capacity=3, item_seconds=1e-6)
    for replica in pool.replicas:
        replica.queues_ahead = queues_ahead
    results, _ = collect(pool, list(range(500)), **options)
    assert results == list(range(500))
    assert all(replica.peak_in_flight <= 3 for replica in pool.replicas)
    assert any(replica.peak_in_flight == 3 for replica in pool.replicas)


def test_tiny_items_take_a_few_large_calls_after_one_probe_per_slot():
    pool = FakePool(4, item_seconds=1e-7)  # x + 1 takes ~0.1 us in a replica
    collect(pool, list(range(100_000)))
    sizes = [len(items) for _, _, items in pool.log]
    # calls sent before any answered measure one item each (at most one per slot: the feed's
    # thread may bring the next slots' items after the first answer sized them)
    assert sizes[0] == 1 and sizes.count(1) <= 4, sizes
    assert len(sizes) <= 20, f"tiny items should take few calls, got {len(sizes)}: {sizes}"
    assert max(sizes) >= 10_000 and min(sizes[4:]) >= 10_000 // 2
    assert max(sizes) <= 100_000 // (2 * 4), "a small map splits in equal shares, two per slot"


def test_a_later_map_sizes_its_first_calls_from_the_last_measured_item_time():
    pool = FakePool(4, item_seconds=1e-7)
    collect(pool, list(range(100_000)), as_list=True, item_seconds_hint=1e-7)
    sizes = [len(items) for _, _, items in pool.log]
    assert sizes[:4] == [12_500] * 4, "no one-item calls: an equal half share per slot at once"
    assert sum(sizes) == 100_000 and len(sizes) <= 10


def test_under_a_timeout_the_first_calls_measure_one_item_whatever_the_hint():
    pool = FakePool(4, item_seconds=1e-7)
    collect(pool, list(range(1000)), as_list=True, item_seconds_hint=1e-7, timeout=10.0)
    assert [len(items) for _, _, items in pool.log][:4] == [1, 1, 1, 1]


def test_async_targets_take_an_equal_share_per_slot_from_the_first_call():
    pool = FakePool(2, capacity=4, item_seconds=0.05)
    plan = MapPlan(CallSpec("fn", is_async=True), collect=True, total=200, window=None)
    run = MapRun(pool, plan, iter(range(200)))
    for _ in run.chunks():
        pass
    assert run.results == list(range(200))
    assert [len(items) for _, _, items in pool.log] == [25] * 8, "items of a call await together"


def test_auto_batches_aim_at_a_quarter_second_and_shrink_before_the_end():
    pool = FakePool(4, item_seconds=0.002)
    collect(pool, list(range(20_000)))
    sizes = [len(items) for _, _, items in pool.log]
    assert sum(sizes) == 20_000
    assert max(sizes) == 125, "0.25 s of 2 ms items is 125 per call"
    assert len(sizes) < 20_000 / 125 * 1.3, f"{len(sizes)} calls: batches should stay near 125"
    assert sizes[-1] <= 13, f"guided shares should shrink to the 25 ms floor: {sizes[-12:]}"


def test_fixed_batch_size_is_respected():
    pool = FakePool(3)
    results, _ = collect(pool, list(range(100)), batch_size=7)
    assert results == list(range(100))
    sizes = [len(items) for replica in pool.replicas for _, items in replica.calls]
    assert max(sizes) == 7 and sum(sizes) == 100


@pytest.mark.parametrize("ordered", [True, False])
def test_streams_pull_lazily_within_the_window(ordered):
    pulled = [0]

    def source():
        for x in range(10_000):
            pulled[0] += 1
            yield x

    pool = FakePool(3, capacity=2, seed=3)
    run = MapRun(pool, MapPlan(CallSpec("fn"), ordered=ordered, window=50), source())
    seen = []
    for chunk in run.chunks():
        seen.extend(chunk)
        assert pulled[0] - len(seen) <= 50
    assert (seen if ordered else sorted(seen)) == list(range(10_000))


def test_failures_raise_return_or_retry_per_item_inside_batches():
    def fn(x):
        if x % 10 == 3:
            raise ValueError(f"bad {x}")
        return x

    with pytest.raises(ValueError, match="bad 3") as raised:
        collect(FakePool(2, fn=fn), list(range(50)), batch_size=5)
    assert "rhmapper: item 3 failed on replica fake_replica_" in raised.value.__notes__[-1]

    results, run = collect(FakePool(2, fn=fn), list(range(50)), batch_size=5, return_exceptions=True)
    assert [r for r in results if not isinstance(r, ValueError)] == [
        x for x in range(50) if x % 10 != 3]
    assert [str(r) for r in results if isinstance(r, ValueError)] == [
        f"bad {x}" for x in range(3, 50, 10)]
    assert run.stats.failures == 5


def test_retries_rerun_on_another_replica_and_give_up_after_max():
    attempts: dict[int, int] = {}

    def flaky(x):
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] <= 2:
            raise RuntimeError(f"attempt {attempts[x]} of {x}")
        return x

    pool = FakePool(3, fn=flaky)
    results, run = collect(pool, list(range(20)), batch_size=4,
                           retries=Retries(max_retries=2, initial_delay=0))
    assert results == list(range(20))
    assert run.stats.retries == 40
    for x in range(20):
        ran_on = [name for name, _, items in pool.log if x in items]
        assert len(ran_on) == 3 and ran_on[1] != ran_on[0] and ran_on[2] != ran_on[1], ran_on

    attempts.clear()
    with pytest.raises(RuntimeError, match="attempt 2"):
        collect(FakePool(3, fn=flaky), list(range(5)), retries=Retries(max_retries=1, initial_delay=0))


def test_retry_on_filters_exception_types():
    def fn(x):
        raise KeyError(x)

    with pytest.raises(KeyError):
        collect(FakePool(2, fn=fn), [1], retries=Retries(max_retries=5, retry_on=(TimeoutError,)))


def test_replica_death_requeues_its_items_and_loses_nothing():
    killed = set()

    def dies_once_per_multiple_of_97(x):
        if x % 97 == 0 and x not in killed:
            killed.add(x)
            raise ReplicaKiller(f"item {x}")
        return x + 1

    pool = FakePool(4, fn=dies_once_per_multiple_of_97, capacity=2, seed=11)
    results, run = collect(pool, list(range(3000)), batch_size=10)
    assert results == [x + 1 for x in range(3000)]
    assert pool.lost_count == len(killed) == 31
    assert len(pool.replicas) == 4


def test_poison_item_fails_after_bounded_attempts():
    def poison(x):
        if x == 42:
            raise ReplicaKiller("always")
        return x

    pool = FakePool(3, fn=poison)
    with pytest.raises(ReplicaLostError, match="item 42 was running each time a replica died"):
        collect(pool, list(range(100)), batch_size=8, max_replica_crashes=3)
    assert pool.lost_count == 3

    pool = FakePool(3, fn=poison)
    results, run = collect(pool, list(range(100)), batch_size=8, return_exceptions=True)
    assert isinstance(results[42], ReplicaLostError)
    assert [r for i, r in enumerate(results) if i != 42] == [x for x in range(100) if x != 42]
    assert run.stats.done == 100, "done counts the item lost with its replicas, with no callback"


def test_replicas_lost_with_their_cluster_count_no_crash_for_their_items():
    losses = collections.Counter()

    def lost_with_its_cluster_three_times(x):
        if x == 5 and losses[x] < 3:
            losses[x] += 1
            raise ReplicaKiller("cluster unreachable", blames_items=False)
        return x * 10

    pool = FakePool(2, fn=lost_with_its_cluster_three_times)
    results, run = collect(pool, list(range(20)), batch_size=4, max_replica_crashes=1)
    assert results == [x * 10 for x in range(20)]
    assert pool.lost_count == 3 and run.stats.replicas_lost == 3
    assert sum(1 for _, _, items in pool.log if 5 in items) == 4, "lost 3 times, then ran"


def test_no_replica_left_raises():
    def kills(x):
        raise ReplicaKiller("boom")

    with pytest.raises(NoReplicasError):
        collect(FakePool(2, fn=kills, replace=False), list(range(10)), max_replica_crashes=100)


def test_one_million_items_stream_through_a_small_window():
    pool = FakePool(8, capacity=4)
    total = 0
    count = 0
    plan = MapPlan(CallSpec("fn"), ordered=True, window=4096)
    run = MapRun(pool, plan, iter(range(1_000_000)))
    expected = 0
    for chunk in run.chunks():
        for value in chunk:
            assert value == expected
            expected += 1
        count += len(chunk)
        total += sum(chunk)
    assert count == 1_000_000 and total == sum(range(1_000_000))


def test_unequal_star_items_are_passed_as_arguments():
    pool = FakePool(2, fn=lambda x, y: x * y)
    plan = MapPlan(CallSpec("fn", star=True), collect=True, total=3, window=None)
    run = MapRun(pool, plan, iter([(1, 2), (3, 4), (5, 6)]))
    list(run.chunks())
    assert run.results == [2, 12, 30]


def test_a_due_retry_goes_to_any_free_replica_and_never_busy_waits():
    """A retry that must avoid the least-loaded replica goes to another free one; while no
    replica it may use has a slot, the loop waits for a completion instead of spinning."""
    failed_once: set[int] = set()

    def fails_first_time(x):
        if x not in failed_once:
            failed_once.add(x)
            raise RuntimeError(f"first attempt of {x}")
        return x

    class RecordingPool(FakePool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.timeouts: list[float] = []

        def wait(self, tokens, timeout):
            self.timeouts.append(timeout)
            return super().wait(tokens, timeout)

    pool = RecordingPool(2, fn=fails_first_time, capacity=2, seed=3)
    results, run = collect(pool, list(range(200)), batch_size=1,
                           retries=Retries(max_retries=1, initial_delay=0))
    assert results == list(range(200))
    assert run.stats.retries == 200
    assert min(pool.timeouts) > 0, "a queued retry made the loop poll with timeout 0"
    for x in range(200):
        ran_on = [name for name, _, items in pool.log if x in items]
        assert len(ran_on) == 2 and ran_on[0] != ran_on[1], ran_on


def test_one_item_maps_take_equally_loaded_replicas_in_turn():
    pool = FakePool(3)
    for x in range(6):
        assert collect(pool, [x])[0] == [x]
    assert [name for name, _, _ in pool.log] == [f"fake_replica_{i}" for i in (0, 1, 2, 0, 1, 2)]


@pytest.mark.parametrize("as_list", [False, True], ids=["iterator", "list"])
def test_calls_stay_under_the_byte_bound_and_a_huge_item_goes_alone(as_list):
    mib = 2**20
    items = [bytes([i]) * mib for i in range(40)]
    items[17] = b"\xff" * (10 * mib)
    pool = FakePool(3, fn=lambda blob: (len(blob), blob[0]), item_seconds=1e-6)
    results, _ = collect(pool, items, as_list, max_call_bytes=4 * mib)
    assert results == [(len(blob), blob[0]) for blob in items]
    assert all(sum(map(len, batch)) <= 4 * mib for _, _, batch in pool.log if items[17] not in batch)
    assert [batch for _, _, batch in pool.log if items[17] in batch] == [[items[17]]]


def test_a_hung_item_times_out_and_its_call_keeps_the_slot():
    pool = FakePool(2, fn=lambda x: x * 2, hangs=lambda x: x == 3)
    results, run = collect(pool, list(range(10)), timeout=0.05, return_exceptions=True,
                           batch_size=1)
    assert [value for index, value in enumerate(results) if index != 3] == [
        2 * x for x in range(10) if x != 3]
    assert isinstance(results[3], TimeoutError) and "item 3 ran longer than" in str(results[3])
    hung_on = [replica for replica in pool.replicas if replica.in_flight]
    assert len(hung_on) == 1 and [token.items for token in pool.abandoned] == [[3]]
    assert run.stats.failures == 1 and run.stats.done == 10


def test_a_timed_out_item_is_retried_elsewhere():
    submitted_three: list[int] = []

    def hangs_the_first_time(x):
        if x != 3:
            return False
        submitted_three.append(x)
        return len(submitted_three) == 1

    pool = FakePool(2, fn=lambda x: x * 2, hangs=hangs_the_first_time)
    results, run = collect(pool, list(range(6)), timeout=0.05, batch_size=1,
                           retries=Retries(max_retries=1, initial_delay=0))
    assert results == [2 * x for x in range(6)]
    assert run.stats.retries == 1
    (first, second) = [name for name, _, items in pool.log if 3 in items]
    assert first != second, "the retry went to the replica that was not hung"


def test_timeout_keeps_batching_and_a_batch_that_outlives_it_runs_again_item_by_item():
    """Under timeout=, calls still carry many items; a call that outlives its budget (timeout x
    its items) is sent again one item per call, with no attempt counted, so that only the item
    that hangs fails, with the truth."""
    pool = FakePool(3, fn=lambda x: x * 2, hangs=lambda x: x == 400, item_seconds=1e-6)
    results, run = collect(pool, list(range(1000)), timeout=0.05, return_exceptions=True)
    assert [value for index, value in enumerate(results) if index != 400] == [
        2 * x for x in range(1000) if x != 400]
    assert isinstance(results[400], TimeoutError) and "item 400 ran longer than" in str(results[400])
    assert run.stats.failures == 1 and run.stats.retries == 0
    hung_batch, alone = [items for _, _, items in pool.log if 400 in items]
    assert len(hung_batch) > 1 and alone == [400]
    batched = [items for _, _, items in pool.log if len(items) > 1]
    assert sum(map(len, batched)) >= 990 and len(batched) < 30, "timeout= stopped batching"
    sent_alone = {items[0] for _, _, items in pool.log[pool.log.index(
        next(entry for entry in pool.log if entry[2] == hung_batch)) + 1:] if len(items) == 1}
    assert set(hung_batch) <= sent_alone


def test_abandoned_calls_hold_their_slots_until_they_answer():
    def fails_on_five(x):
        if x == 5:
            raise ValueError("five")
        return x

    pool = FakePool(3, fn=fails_on_five, capacity=2, seed=4)
    with pytest.raises(ValueError, match="five"):
        collect(pool, list(range(200)), batch_size=1)
    held = sum(replica.in_flight for replica in pool.replicas)
    assert held == len(pool.abandoned) > 0, "cancelled calls keep their slots"
    collect(pool, list(range(10, 30)), batch_size=1)
    assert sum(replica.in_flight for replica in pool.replicas) == 0 and not pool.abandoned


def test_replicas_take_work_as_they_become_ready():
    pool = FakePool(3, starts_after=[0, 3, 6])
    results, _ = collect(pool, list(range(300)), batch_size=1)
    assert results == list(range(300))
    first_call = {name: min(index for index, (who, _, _) in enumerate(pool.log) if who == name)
                  for name in ("fake_replica_0", "fake_replica_1", "fake_replica_2")}
    assert first_call["fake_replica_0"] == 0
    assert 0 < first_call["fake_replica_1"] < first_call["fake_replica_2"]
