"""Durable maps on Ray (issue 22): ``checkpoint=`` saves each result as it finishes; the same map
run again sends only the inputs without a result and gives back every result, in order, as if
nothing had failed. Executions are counted in files the replicas write; locally and with the
mapper on the cluster."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import os
import pathlib
import threading
import time
import uuid
from pathlib import Path

import pytest

import rhmapper as rm
from rhmapper.checkpoint_read import indexed_results
from rhmapper.errors import CheckpointMismatchError
from tests.ray_head import wait_until

pytestmark = pytest.mark.timeout(240)

ITEMS = list(range(60))


def counted_square(x: int, runs: str, fail_at: int = -1) -> int:
    """x squared; each run leaves a line in ``runs/x``; ``fail_at`` raises (the "crash")."""
    with open(os.path.join(runs, str(x)), "a") as log:
        log.write("run\n")
    if x == fail_at:
        raise RuntimeError(f"item {x} fails on purpose")
    return x * x


def runs_of(path: Path, items) -> dict[int, int]:
    return {x: len((path / str(x)).read_text().splitlines()) if (path / str(x)).exists() else 0
            for x in items}


@pytest.fixture(scope="module", params=[False, True], ids=["local", "on_cluster"])
def squarer(request, ray_session):
    """One mapper per backend for the module's tests (each test has its own checkpoint)."""
    assert ray_session.is_initialized(), "a multi-node test ran before a local-Ray test"
    with rm.mapper(counted_square, replicas=2, on_cluster=request.param) as m:
        yield m


def test_a_failed_map_resumes_sending_only_what_is_not_saved_and_returns_all_in_order(
        squarer, tmp_path):
    checkpoint, runs = str(tmp_path / "ckpt"), tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(RuntimeError, match="item 45 fails on purpose"):
        squarer.map(ITEMS, kwargs={"runs": str(runs), "fail_at": 45}, checkpoint=checkpoint,
                    batch_size=3)
    saved = dict(indexed_results(checkpoint))
    assert saved and all(saved[x] == x * x for x in saved) and 45 not in saved
    first = runs_of(runs, ITEMS)
    # The same map again (item 45 still fails: its exception comes back in its place).
    assert squarer.map(ITEMS, kwargs={"runs": str(runs), "fail_at": 45}, checkpoint=checkpoint,
                       return_exceptions=True)[:45] == [x * x for x in ITEMS[:45]]
    second = runs_of(runs, ITEMS)
    assert all(second[x] == first[x] for x in saved), "a saved item ran again"
    # (an item in flight when the first run failed may still have run after `first` was read)
    assert all(second[x] >= first[x] + 1 for x in ITEMS if x not in saved)
    again = squarer.map(ITEMS, kwargs={"runs": str(runs), "fail_at": 45}, checkpoint=checkpoint,
                        return_exceptions=True)
    assert isinstance(again[45], RuntimeError) and again[:45] == [x * x for x in ITEMS[:45]]
    assert again[46:] == [x * x for x in ITEMS[46:]]
    third = runs_of(runs, ITEMS)
    assert {x: third[x] - second[x] for x in ITEMS} == {x: int(x == 45) for x in ITEMS}, (
        "only the failed item runs again")


@pytest.mark.parametrize("verb", ["imap", "imap_unordered"])
def test_an_imap_left_early_resumes_with_the_rest(squarer, tmp_path, verb):
    checkpoint, runs = str(tmp_path / "ckpt"), tmp_path / "runs"
    runs.mkdir()
    kwargs = {"runs": str(runs)}
    stream = getattr(squarer, verb)(iter(ITEMS), kwargs=kwargs, checkpoint=checkpoint,
                                    batch_size=2, window=8)
    taken = [next(stream) for _ in range(10)]
    stream.close()
    assert len(taken) == 10 and all(value in {x * x for x in ITEMS} for value in taken)
    first = runs_of(runs, ITEMS)
    saved = dict(indexed_results(checkpoint))
    assert len(saved) >= 10
    results = list(getattr(squarer, verb)(iter(ITEMS), kwargs=kwargs, checkpoint=checkpoint))
    expected = [x * x for x in ITEMS]
    assert (results if verb == "imap" else sorted(results)) == expected
    second = runs_of(runs, ITEMS)
    assert all(second[x] == first[x] for x in saved), "a saved item ran again"
    assert all(second[x] >= 1 for x in ITEMS)
    again = list(getattr(squarer, verb)(ITEMS, kwargs=kwargs, checkpoint=checkpoint))
    assert (again if verb == "imap" else sorted(again)) == expected, (
        "a complete checkpoint gives its results back")
    assert runs_of(runs, ITEMS) == second, "a complete checkpoint runs nothing"
    assert list(rm.read_checkpoint(checkpoint)) == expected


def test_another_map_or_other_inputs_are_refused_before_anything_runs(squarer, tmp_path):
    checkpoint, runs = str(tmp_path / "ckpt"), tmp_path / "runs"
    runs.mkdir()
    kwargs = {"runs": str(runs)}
    assert squarer.map([1, 2, 3], kwargs=kwargs, checkpoint=checkpoint) == [1, 4, 9]
    before = runs_of(runs, range(10))
    with pytest.raises(CheckpointMismatchError, match="'kwargs'"):
        squarer.map([1, 2, 3], kwargs={**kwargs, "fail_at": 7}, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match="input 1 differs"):
        squarer.map([1, 5, 3], kwargs=kwargs, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match="input has 2 items"):
        squarer.map([1, 2], kwargs=kwargs, checkpoint=checkpoint)
    assert runs_of(runs, range(10)) == before, "a refused map ran items"
    assert squarer.map([1, 5, 3], kwargs=kwargs, checkpoint=checkpoint, overwrite=True) == [
        1, 25, 9]
    assert runs_of(runs, [1, 5, 3]) == {1: before[1] + 1, 5: 1, 3: before[3] + 1}
    with pytest.raises(ValueError, match="overwrite=True applies to a map with checkpoint"):
        squarer.map([1], kwargs=kwargs, overwrite=True)


def test_a_longer_input_resumes_and_star_maps_are_their_own_maps(squarer, tmp_path):
    checkpoint, runs = str(tmp_path / "ckpt"), str(tmp_path)
    assert squarer.map([1, 2], kwargs={"runs": runs}, checkpoint=checkpoint) == [1, 4]
    assert squarer.map([1, 2, 3], kwargs={"runs": runs}, checkpoint=checkpoint) == [1, 4, 9]
    assert runs_of(tmp_path, [1, 2, 3]) == {1: 1, 2: 1, 3: 1}
    with pytest.raises(CheckpointMismatchError, match="'star'"):
        squarer.starmap([(1, runs)], checkpoint=checkpoint)


def test_a_starmap_of_lists_or_named_tuples_resumes(squarer, tmp_path):
    """Its arguments may reach the replicas as tuples: digested as tuples on both sides."""
    Arguments = collections.namedtuple("Arguments", "x runs fail_at")
    runs = tmp_path / "runs"
    runs.mkdir()
    for kind, make in [("lists", lambda x, fail_at: [x, str(runs), fail_at]),
                       ("named", lambda x, fail_at: Arguments(100 + x, str(runs), fail_at))]:
        checkpoint = str(tmp_path / kind)
        offset = 0 if kind == "lists" else 100
        with pytest.raises(RuntimeError, match=f"item {offset + 7} fails on purpose"):
            squarer.starmap([make(x, offset + 7) for x in range(12)], checkpoint=checkpoint,
                            batch_size=2)
        saved = dict(indexed_results(checkpoint))
        assert saved and 7 not in saved
        first = runs_of(runs, [offset + x for x in range(12)])
        assert squarer.starmap([make(x, -1) if x == 7 else make(x, offset + 7)
                                for x in range(12)], checkpoint=checkpoint,
                               return_exceptions=False) == [(offset + x) ** 2 for x in range(12)]
        second = runs_of(runs, [offset + x for x in range(12)])
        assert all(second[offset + x] == first[offset + x] for x in saved), (
            f"a saved item of the {kind} ran again")


def slow_square(x: int, runs: str) -> int:
    counted_square(x, runs)
    time.sleep(0.05)
    return x * x


def test_a_map_to_s3_resumes_from_what_it_saved(ray_local, s3_uri, tmp_path):
    with rm.mapper(counted_square, replicas=2) as m:
        kwargs = {"runs": str(tmp_path), "fail_at": 30}
        with pytest.raises(RuntimeError, match="item 30 fails on purpose"):
            m.map(ITEMS, kwargs=kwargs, checkpoint=s3_uri, batch_size=2)
        saved = dict(indexed_results(s3_uri))
        assert saved and all(saved[x] == x * x for x in saved) and 30 not in saved
        first = runs_of(tmp_path, ITEMS)
        values = m.map(ITEMS, kwargs=kwargs, checkpoint=s3_uri, return_exceptions=True)
        assert [v for x, v in enumerate(values) if x != 30] == [x * x for x in ITEMS if x != 30]
        second = runs_of(tmp_path, ITEMS)
        assert all(second[x] == first[x] for x in saved), "a saved item ran again"


def test_storage_failing_mid_map_fails_it_and_the_rerun_resumes_from_what_was_written(
        ray_local, tmp_path):
    checkpoint, runs = tmp_path / "ckpt", tmp_path / "runs"
    runs.mkdir()
    shards, moved = checkpoint / "shards", checkpoint / "shards.moved"
    items = range(300)
    with rm.mapper(slow_square, replicas=2) as m:
        failed = []

        def map_in_thread():
            try:
                m.map(items, kwargs={"runs": str(runs)}, checkpoint=str(checkpoint), batch_size=1)
            except rm.CheckpointWriteError as error:
                failed.append(error)

        mapping = threading.Thread(target=map_in_thread)
        mapping.start()
        assert wait_until(lambda: shards.is_dir() and any(shards.glob("*.arrow")), seconds=60)
        shards.rename(moved)  # the storage fails: no shard can be written from now on
        shards.write_text("not a directory")
        mapping.join(120)
        assert not mapping.is_alive() and failed, "the map did not fail with CheckpointWriteError"
        assert str(checkpoint) in str(failed[0]) and "were not saved" in str(failed[0])
        shards.unlink()
        moved.rename(shards)  # the storage is back
        saved = dict(indexed_results(str(checkpoint)))
        assert saved and all(saved[x] == x * x for x in saved)
        first = runs_of(runs, items)
        assert m.map(items, kwargs={"runs": str(runs)}, checkpoint=str(checkpoint)) == [
            x * x for x in items]
        second = runs_of(runs, items)
        assert all(second[x] == first[x] for x in saved), "a saved item ran again"
        assert all(second[x] >= 1 for x in items)


def counted_area(shape, runs: str, fail_at: str = "") -> float:
    """``shape.width * shape.height``; each run leaves a line in ``runs/<shape.name>``."""
    with open(os.path.join(runs, shape.name), "a") as log:
        log.write("run\n")
    if shape.name == fail_at:
        raise RuntimeError(f"{shape.name} fails on purpose")
    return shape.width * shape.height


@pytest.mark.parametrize("on_cluster", [False, True], ids=["local", "on_cluster"])
def test_inputs_of_a_class_made_in_a_function_resume_digested_by_the_replicas(
        ray_local, tmp_path, monkeypatch, on_cluster):
    """The replicas digest a call's inputs: an input whose class exists only by value (made in
    this function, pickled with it) digests there as it does on the driver (or host) that checks
    the saved inputs on the rerun, and the driver makes no digest and no pickle of its own."""
    from dataclasses import dataclass

    import rhmapper.durable

    @dataclass
    class Shape:
        name: str
        width: float
        height: float

    made_here = {"digests": 0, "pickles": 0}

    def counting(name: str, real):
        def count(*args, **kwargs):
            made_here[name] += 1
            return real(*args, **kwargs)
        return count

    monkeypatch.setattr(rhmapper.durable, "input_digests",
                        counting("digests", rhmapper.durable.input_digests))
    monkeypatch.setattr(rhmapper.durable, "dumps", counting("pickles", rhmapper.durable.dumps))
    checkpoint, runs = str(tmp_path / "ckpt"), tmp_path / "runs"
    runs.mkdir()
    shapes = [Shape(f"s{i}", i, 0.5) for i in range(40)]
    kwargs = {"runs": str(runs), "fail_at": "s30"}
    with rm.mapper(counted_area, replicas=2, on_cluster=on_cluster) as m:
        with pytest.raises(RuntimeError, match="s30 fails on purpose"):
            m.map(shapes, kwargs=kwargs, checkpoint=checkpoint, batch_size=4)
        if not on_cluster:  # (on the cluster, the host saves: these counters are the driver's)
            # Only the values of the call that held the failed item were pickled again here:
            # they came in one pickle with a hole in it.
            assert made_here == {"digests": 0, "pickles": 1}, (
                "the driver digested or pickled what the replicas had made")
        saved = dict(indexed_results(checkpoint))
        assert saved and all(saved[i] == i * 0.5 for i in saved) and 30 not in saved
        first = runs_of(runs, [shape.name for shape in shapes])
        equal_again = [Shape(f"s{i}", i, 0.5) for i in range(40)]  # new objects, same values
        values = m.map(equal_again, kwargs=kwargs, checkpoint=checkpoint, return_exceptions=True)
        assert isinstance(values[30], RuntimeError)
        assert [v for i, v in enumerate(values) if i != 30] == [i * 0.5 for i in range(40)
                                                                 if i != 30]
        second = runs_of(runs, [shape.name for shape in shapes])
        assert all(second[f"s{i}"] == first[f"s{i}"] for i in saved), "a saved item ran again"
        changed = [Shape(f"s{i}", i, 0.75 if i == min(saved) else 0.5) for i in range(40)]
        with pytest.raises(CheckpointMismatchError, match=f"input {min(saved)} differs"):
            m.map(changed, kwargs=kwargs, checkpoint=checkpoint)
        assert runs_of(runs, [shape.name for shape in shapes]) == second, (
            "a refused map ran items")


def counted_total(array, runs: str, fail_at: int = -1) -> float:
    """The sum of ``array``, named by its first element in ``runs``."""
    name = str(int(array.flat[0]))
    with open(os.path.join(runs, name), "a") as log:
        log.write("run\n")
    if int(array.flat[0]) == fail_at:
        raise RuntimeError(f"array {name} fails on purpose")
    return float(array.sum())


def test_numpy_inputs_small_and_sent_by_reference_resume_without_a_mismatch(ray_local, tmp_path):
    """A replica receives numpy arrays as read-only views (a large one through the object
    store): its digests equal those the driver makes of the writable originals on the rerun."""
    import numpy as np

    checkpoint, runs = str(tmp_path / "ckpt"), tmp_path / "runs"
    runs.mkdir()
    arrays = [np.full(300_000 if index % 5 == 0 else 100, index, dtype=np.int64)
              for index in range(20)]  # every fifth 2.4 MB: put in the object store alone
    expected = [float(array.sum()) for array in arrays]
    kwargs = {"runs": str(runs), "fail_at": 13}
    with rm.mapper(counted_total, replicas=2) as m:
        with pytest.raises(RuntimeError, match="array 13 fails on purpose"):
            m.map(arrays, kwargs=kwargs, checkpoint=checkpoint, batch_size=2)
        saved = dict(indexed_results(checkpoint))
        assert saved and {index: expected[index] for index in saved} == saved
        assert any(index % 5 == 0 for index in saved), "no large array was saved"
        first = runs_of(runs, range(20))
        values = m.map([array.copy() for array in arrays], kwargs=kwargs, checkpoint=checkpoint,
                       return_exceptions=True)
        assert isinstance(values[13], RuntimeError)
        assert [v for i, v in enumerate(values) if i != 13] == [
            v for i, v in enumerate(expected) if i != 13]
        second = runs_of(runs, range(20))
        assert all(second[index] == first[index] for index in saved), "a saved item ran again"


class Color(enum.Enum):
    RED = 1


Pair = collections.namedtuple("Pair", "a b")


def test_inputs_of_many_types_digest_alike_in_a_replica_and_on_the_driver(ray_local):
    """What a replica receives (read-only arrays, rebuilt classes, Arrow buffers through the
    object store) digests as the driver's originals do: else a rerun would call them changed."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import ray

    from rhmapper.digests import input_digest

    @dataclasses.dataclass(frozen=True)
    class Record:
        a: int
        b: np.ndarray = dataclasses.field(compare=False)

    inputs = {
        "frame": pd.DataFrame({"x": np.arange(1000), "y": ["s"] * 1000}),
        "large frame": pd.DataFrame(np.random.default_rng(0).random((2000, 100))),
        "series": pd.Series(np.arange(50.0)), "table": pa.table({"x": list(range(100))}),
        "array": np.arange(10), "structured": np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]),
        "scalar": np.float32(2.5), "record": Record(1, np.ones(3)), "enum": Color.RED,
        "named tuple": Pair(1, "x"), "time": datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC),
        "decimal": decimal.Decimal("1.25"), "uuid": uuid.UUID(int=5),
        "path": pathlib.PurePosixPath("/a/b"), "complex": 1 + 2j,
        "lambdas": [lambda x: x + 1, lambda x: x * 2],
    }

    @ray.remote
    def digests_there(values: dict) -> dict:
        from rhmapper.digests import input_digest

        return {name: input_digest(value) for name, value in values.items()}

    there = ray.get(digests_there.remote(inputs), timeout=60)
    here = {name: input_digest(value) for name, value in inputs.items()}
    assert [name for name in inputs if there[name] != here[name]] == []
    assert ray.get(digests_there.remote({"alone": inputs["large frame"]}), timeout=60) == {
        "alone": here["large frame"]}
