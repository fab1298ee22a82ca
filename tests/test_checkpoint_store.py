"""The storage of durable maps, on real storage: a local directory and an S3 API on loopback
(moto's server, reached through ``s3://`` and the AWS environment). Ray-free.

Each test runs on both: results written in shards are read back (the done-set and digests by a
store opened again, the values in input order by `read_checkpoint`), mismatches are named,
storage that goes down mid-way fails the writes with what was not saved and loses nothing written
before, and reading back holds a batch per shard, not the results. Runs (a call's results each)
that interleave across shards and within one, or that two runs of a map both saved, come back in
input order, each result once; bad runs and checkpoints of another layout version are refused.
Digests are those of stable pickles, the same in a process that got the input by value.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cloudpickle
import numpy as np
import psutil
import pytest

from rhmapper.checkpoint_layout import CheckpointLocation, PendingRuns, new_manifest
from rhmapper.checkpoint_read import indexed_results, read_checkpoint
from rhmapper.checkpoint_store import CheckpointStore
from rhmapper.digests import input_digest, input_digests, stable_pickle
from rhmapper.errors import (
    CheckpointCorruptError,
    CheckpointIncompleteError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from tests.conftest import REPO_DIR

MIB = 2**20
FINGERPRINT = {"target": "tests.square", "kwargs": "{}", "batched": "False"}


@dataclass
class Storage:
    """Where a test's checkpoint goes, and how to take that storage down and bring it back."""

    uri: str
    down: Callable[[], None]
    up: Callable[[], None]

    def put(self, name: str, data: bytes) -> None:
        """Write a raw file under the checkpoint's location (as something else would)."""
        location = CheckpointLocation(self.uri)
        path = f"{location.path}/{name}"
        if not location.in_place:
            location.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with location.filesystem.open_output_stream(path) as stream:
            stream.write(data)

    def shard_count(self) -> int:
        return len(CheckpointLocation(self.uri).shards())


def _local_storage(folder: str) -> Storage:
    """A local directory; down, its ``shards`` directory is moved away and a file takes its
    place, so writing a shard fails as on a broken disk (permissions do not stop root)."""
    uri = os.path.join(folder, "ckpt")
    shards = os.path.join(uri, "shards")

    def down() -> None:
        os.rename(shards, shards + ".away")
        with open(shards, "wb"):
            pass

    def up() -> None:
        os.remove(shards)
        os.rename(shards + ".away", shards)

    return Storage(uri, down, up)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Iterator[Storage]:
    if request.param == "local":
        yield _local_storage(str(tmp_path))
    else:
        server = request.getfixturevalue("s3_server")
        yield Storage(request.getfixturevalue("s3_uri"), server.stop, server.start)


def _write(uri: str, indexes: list[int], value: Callable[[int], object] = lambda i: i * i,
           **options) -> None:
    """Results ``value(i)`` of inputs ``i`` (digest of ``("item", i)``), written and closed."""
    with CheckpointStore.open(uri, FINGERPRINT, **options) as store:
        for index in indexes:
            store.add(index, input_digest(("item", index)), value(index))


def test_results_written_are_done_with_their_digests_when_opened_again(storage):
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        for index in [0, 2, 5, 3]:
            store.add(index, input_digest(("item", index)), index * index)
        assert store.done_count == 4 and store.is_done(5)
        store.flush()
        assert storage.shard_count() == 1
    store = CheckpointStore.open(storage.uri, FINGERPRINT)
    try:
        assert store.done_count == 4 and store.done_end == 6
        assert [index for index in range(8) if store.is_done(index)] == [0, 2, 3, 5]
        for index in [0, 2, 3, 5]:
            store.check_input(index, input_digest(("item", index)))  # the same inputs pass
        store.check_input(1, input_digest("anything"))  # not done: nothing to compare
        assert list(indexed_results(storage.uri)) == [(0, 0), (2, 4), (3, 9), (5, 25)]
    finally:
        store.close()
    store.close()  # again: nothing


class LabelledError(Exception):
    """An exception with a field of its own, as a map's ``return_exceptions=True`` keeps."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def test_values_round_trip(storage):
    error = LabelledError("bad item", 7)
    error.add_note("item 3 on replica embed_replica_0")
    values = [None, error, np.arange(12, dtype=np.float32).reshape(3, 4), lambda x: x + 1,
              {"nested": [1, ("two", b"\x00\xff")]}, b"x" * (3 * MIB), "last"]
    _write(storage.uri, list(range(len(values))), values.__getitem__)
    back = dict(indexed_results(storage.uri))
    assert sorted(back) == list(range(len(values)))
    assert back[0] is None
    assert type(back[1]) is LabelledError and back[1].args == ("bad item", 7)
    assert back[1].code == 7 and back[1].__notes__ == ["item 3 on replica embed_replica_0"]
    assert back[2].dtype == np.float32 and np.array_equal(back[2], values[2])
    assert back[3](1) == 2  # a lambda: written by cloudpickle
    assert back[4] == values[4] and back[5] == values[5] and back[6] == "last"


def test_another_fingerprint_is_refused_naming_the_first_difference(storage):
    _write(storage.uri, [0, 1])
    with pytest.raises(CheckpointMismatchError) as raised:
        CheckpointStore.open(storage.uri, {**FINGERPRINT, "kwargs": "{'scale': 2}"})
    message = str(raised.value)
    assert storage.uri in message
    assert "'kwargs' is '{}' there and \"{'scale': 2}\" here" in message
    assert "overwrite=True" in message and "another checkpoint URI" in message
    with pytest.raises(CheckpointMismatchError, match="'retries' is absent there and '3' here"):
        CheckpointStore.open(storage.uri, {**FINGERPRINT, "retries": "3"})
    assert isinstance(raised.value, ValueError)
    assert dict(indexed_results(storage.uri)) == {0: 0, 1: 1}, "refused: nothing deleted"


def test_a_changed_input_is_named(storage):
    _write(storage.uri, [0, 1, 2])
    store = CheckpointStore.open(storage.uri, FINGERPRINT)
    try:
        store.check_input(1, input_digest(("item", 1)))
        with pytest.raises(CheckpointMismatchError) as raised:
            store.check_input(2, input_digest(("item", "changed")))
    finally:
        store.close()
    message = str(raised.value)
    assert message.startswith(f"input 2 differs from the input whose result checkpoint "
                              f"{storage.uri} holds")
    assert "same inputs in the same order" in message and "overwrite=True" in message


def test_overwrite_discards_what_was_there(storage):
    _write(storage.uri, [0, 1, 2])
    with CheckpointStore.open(storage.uri, {"target": "other"}, overwrite=True) as store:
        assert store.done_count == 0 and not store.is_done(0)
        store.add(7, input_digest("x"), "new")
    assert list(indexed_results(storage.uri)) == [(7, "new")]
    assert CheckpointLocation(storage.uri).read_manifest()["fingerprint"] == {"target": "other"}
    with CheckpointStore.open(storage.uri, {"target": "other"}, overwrite=True) as store:
        assert store.done_count == 0
    assert list(indexed_results(storage.uri)) == [] and storage.shard_count() == 0


def test_results_are_written_after_flush_seconds_without_more_adds(storage):
    with CheckpointStore.open(storage.uri, FINGERPRINT, flush_seconds=1.5) as store:
        added = time.monotonic()
        store.add(0, input_digest(("item", 0)), "waits")
        assert storage.shard_count() == 0, "written before flush_seconds"
        while storage.shard_count() == 0:
            assert time.monotonic() - added < 20, "not written 20 s after it was added"
            time.sleep(0.05)
        assert time.monotonic() - added >= 1.5
        assert list(indexed_results(storage.uri)) == [(0, "waits")]


def test_tmp_leftovers_and_foreign_names_are_ignored(storage):
    _write(storage.uri, [0, 1])
    storage.put("shards/00000005-0a1b2c3d.arrow.tmp", b"half a shard")
    storage.put("shards/notes.txt", b"not a shard")
    store = CheckpointStore.open(storage.uri, FINGERPRINT)
    try:
        assert store.done_count == 2 and not store.is_done(5)
    finally:
        store.close()
    assert list(indexed_results(storage.uri)) == [(0, 0), (1, 1)]


def test_a_cut_short_shard_is_named(storage):
    _write(storage.uri, [0])
    storage.put("shards/00000001-0a1b2c3d.arrow", b"ARROW1\x00\x00cut short")
    with pytest.raises(CheckpointCorruptError, match="00000001-0a1b2c3d.arrow .*Delete that file"):
        CheckpointStore.open(storage.uri, FINGERPRINT)
    with pytest.raises(CheckpointCorruptError, match="00000001-0a1b2c3d.arrow"):
        list(indexed_results(storage.uri))


def test_results_come_in_input_order_across_many_interleaved_shards(storage):
    count = 2000
    order = list(range(count))
    random.Random(22).shuffle(order)  # every shard holds indexes from all over the input

    def value(index: int) -> bytes:
        return index.to_bytes(4, "little") * 2048  # 8 KiB: several record batches per shard

    with CheckpointStore.open(storage.uri, FINGERPRINT, total=count) as store:
        for start in range(0, count, 100):
            for index in order[start:start + 100]:
                store.add(index, input_digest(("item", index)), value(index))
            store.flush()
        store.mark_complete(count)
    assert storage.shard_count() == 20
    assert all(got == value(index) for index, got in enumerate(read_checkpoint(storage.uri)))
    assert sum(1 for _ in read_checkpoint(storage.uri)) == count


def test_an_unfinished_map_is_read_whole_only_with_partial(storage):
    with CheckpointStore.open(storage.uri, FINGERPRINT, total=10) as store:
        for index in [6, 0, 4, 1, 2, 5]:
            store.add(index, input_digest(("item", index)), f"r{index}")
        with pytest.raises(ValueError, match="holds 6 results, of inputs up to 6"):
            store.mark_complete(7)
    with pytest.raises(CheckpointIncompleteError) as raised:
        read_checkpoint(storage.uri)
    assert "holds 6 of 10 results" in str(raised.value)
    assert f"read_checkpoint({storage.uri!r}, partial=True)" in str(raised.value)
    assert list(read_checkpoint(storage.uri, partial=True)) == [
        (0, "r0"), (1, "r1"), (2, "r2"), (4, "r4"), (5, "r5"), (6, "r6")]
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        store.add(3, input_digest(("item", 3)), "r3")
        store.mark_complete(7)
    assert list(read_checkpoint(storage.uri)) == [f"r{index}" for index in range(7)]
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at .*no manifest.json"):
        read_checkpoint(storage.uri + "-nothing-here")


def test_storage_down_fails_the_writes_loses_nothing_written_and_resumes(storage):
    store = CheckpointStore.open(storage.uri, FINGERPRINT)
    for index in range(10):
        store.add(index, input_digest(("item", index)), f"r{index}")
    store.flush()
    storage.down()
    try:
        for index in range(10, 20):
            store.add(index, input_digest(("item", index)), f"r{index}")
        with pytest.raises(CheckpointWriteError) as raised:
            store.flush()
        message = str(raised.value)
        assert storage.uri in message and "10 results were not saved" in message
        assert "those written before stay" in message
        assert isinstance(raised.value.__cause__, OSError)
        with pytest.raises(CheckpointWriteError, match="10 results were not saved"):
            store.add(20, input_digest(("item", 20)), "r20")
        with pytest.raises(CheckpointWriteError, match="10 results were not saved"):
            store.close()
    finally:
        storage.up()
    assert list(indexed_results(storage.uri)) == [(index, f"r{index}") for index in range(10)]
    with CheckpointStore.open(storage.uri, FINGERPRINT) as resumed:
        assert resumed.done_count == 10
        assert [index for index in range(20) if resumed.is_done(index)] == list(range(10))
        for index in range(10, 20):
            resumed.add(index, input_digest(("item", index)), f"r{index}")
        resumed.mark_complete(20)
    assert list(read_checkpoint(storage.uri)) == [f"r{index}" for index in range(20)]


def test_a_location_of_other_files_is_never_written_nor_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in [False, True]:
        with pytest.raises(CheckpointMismatchError, match="such as 'notes.txt'"):
            CheckpointStore.open(str(tmp_path), FINGERPRINT, overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_reading_back_holds_a_batch_per_shard_not_the_results(tmp_path):
    """300 MiB of results in shards of 16 MiB: reading them back in order grows this process by
    less than 100 MiB (a batch of 256 KiB per open shard: 1-10 MiB measured), and so does writing
    them (at most 2 x 16 MiB of results wait: 55-70 MiB measured). On a local directory only:
    what is held is the reader's and the writer's, whatever the storage (on S3 it took 18 s)."""
    storage = _local_storage(str(tmp_path))
    count, size = 300 * MIB // (64 * 1024), 64 * 1024

    def value(index: int) -> bytes:
        return index.to_bytes(8, "little") * (size // 8)

    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        gc.collect()
        before = _rss()  # pyarrow and its filesystem loaded
        peak = before
        for index in range(count):
            store.add(index, input_digest(index), value(index))
            if index % 256 == 0:
                peak = max(peak, _rss())
        store.mark_complete(count)
    assert peak - before < 100 * MIB, f"writing grew RSS by {(peak - before) / MIB:.0f} MiB"
    assert storage.shard_count() >= 10  # 16 MiB each, or up to 32 MiB when the writer lags
    gc.collect()
    before = _rss()
    peak = before
    read = 0
    for index, got in enumerate(read_checkpoint(storage.uri)):
        assert got == value(index)
        read += 1
        if index % 256 == 0:
            peak = max(peak, _rss())
    assert read == count
    assert peak - before < 100 * MIB, f"reading grew RSS by {(peak - before) / MIB:.0f} MiB"


def test_digests_are_the_same_in_every_process_but_for_unordered_pickles():
    """The same input has the same digest in another process; a set of strings, pickled in hash
    order, does not when the hash seed differs (the documented limit)."""
    script = ("from rhmapper.digests import input_digest; "
              "print(input_digest(('a', 1, [2.5, None], {'k': b'v'})).hex(), "
              "input_digest({'alpha', 'beta', 'gamma', 'delta', 'epsilon'}).hex())")
    digests = [subprocess.run([sys.executable, "-c", script], cwd=REPO_DIR, timeout=60,
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()
               for seed in ["1", "2"]]
    assert digests[0][0] == digests[1][0] == input_digest(("a", 1, [2.5, None], {"k": b"v"})).hex()
    assert digests[0][1] != digests[1][1]


def test_a_result_is_added_once_and_never_after_close(tmp_path):
    store = CheckpointStore.open(str(tmp_path), FINGERPRINT)
    store.add(0, input_digest(("item", 0)), "first")
    with pytest.raises(ValueError, match="input 0 has a result in checkpoint .* already"):
        store.add(0, input_digest(("item", 0)), "second")
    with pytest.raises(ValueError, match="a digest has 16 bytes"):
        store.add(1, b"short", "value")
    store.close()
    with pytest.raises(ValueError, match="is closed: open it again"):
        store.add(1, input_digest(("item", 1)), "late")
    assert list(indexed_results(str(tmp_path))) == [(0, "first")]


def test_without_pyarrow_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rhmapper\[durable\]'"):
        CheckpointStore.open(str(tmp_path), FINGERPRINT)
    with pytest.raises(ImportError, match="checkpoint= needs pyarrow"):
        read_checkpoint(str(tmp_path))


def _run(indexes: Sequence[int], value: Callable[[int], object] = lambda i: f"r{i}"
         ) -> tuple[Sequence[int], bytes, bytes]:
    """The run of inputs ``indexes`` as `CheckpointStore.add_run` and `PendingRuns.add` take it:
    the indexes, the digests of ``("item", i)``, the pickled list of ``value(i)``."""
    return (indexes, b"".join(input_digest(("item", index)) for index in indexes),
            pickle.dumps([value(index) for index in indexes], protocol=5))


@pytest.mark.timeout(120)
def test_runs_interleaving_across_shards_come_back_in_input_order(storage):
    """Runs of calls that finished out of order, in shards whose index ranges overlap: one
    shard's runs interleave with another's ([10, 12, 14] here, [11, 13] in a later shard), and
    within a shard two runs interleave, each in a record batch of its own (results of 100 KiB)."""

    def value(index: int) -> object:
        return index.to_bytes(4, "little") * 25_600 if index >= 30 else f"r{index}"

    shards = [[range(0, 10), [10, 12, 14]], [range(20, 30)], [[11, 13], range(15, 20)],
              [[31, 33], [30, 32, 34]]]
    with CheckpointStore.open(storage.uri, FINGERPRINT, flush_seconds=600) as store:
        for runs in shards:
            for indexes in runs:
                store.add_run(*_run(indexes, value))
            store.flush()
        assert store.done_count == 35 and store.done_end == 35
        store.mark_complete(35)
    assert storage.shard_count() == 4
    assert list(read_checkpoint(storage.uri)) == [value(index) for index in range(35)]
    assert list(read_checkpoint(storage.uri, partial=True)) == [
        (index, value(index)) for index in range(35)]


@pytest.mark.timeout(120)
def test_a_range_run_and_a_list_run_are_done_with_their_digests_when_opened_again(storage):
    """A range run takes DoneSet's fast path, a list run with gaps its slow one (as they do
    when read back by a store opened again): both keep each index's own digest."""

    def check(store: CheckpointStore, done: list[int], stretches: list[tuple]) -> None:
        assert store.done_count == len(done) and store.done_end == 18
        assert [index for index in range(20) if store.is_done(index)] == done
        assert list(store.stretches(20)) == stretches
        for index in done:
            store.check_input(index, input_digest(("item", index)))
        store.check_inputs([("item", index) for index in range(8)], 0, 8)
        with pytest.raises(CheckpointMismatchError, match="input 5 differs"):
            store.check_inputs([("item", index if index != 5 else -5) for index in range(8)], 2, 8)
        store.check_input(14, input_digest("anything"))  # not done: nothing to compare
        for index, wrong in [(0, ("item", 1)), (3, ("item", 4)), (5, ("item", "changed")),
                             (7, ("item", 6)), (13, ("item", 17))]:
            with pytest.raises(CheckpointMismatchError) as raised:
                store.check_input(index, input_digest(wrong))
            assert str(raised.value).startswith(
                f"input {index} differs from the input whose result checkpoint {storage.uri}")
            assert f"the checkpoint's {input_digest(('item', index)).hex()}" in str(raised.value)

    done = [*range(0, 8), 10, 13, 17]
    stretches = [(0, 8, True), (8, 10, False), (10, 11, True), (11, 13, False), (13, 14, True),
                 (14, 17, False), (17, 18, True), (18, 20, False)]
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        store.add_run(*_run(range(0, 8)))
        store.add_run(*_run([10, 13, 17]))
        check(store, done, stretches)
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        check(store, done, stretches)
        store.add_run(*_run(range(8, 10)))  # the fast path on a store opened again
        store.add_run(*_run([11, 12]))
        check(store, [*range(0, 14), 17], [(0, 14, True), *stretches[5:]])
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        check(store, [*range(0, 14), 17], [(0, 14, True), *stretches[5:]])
    assert list(indexed_results(storage.uri)) == [
        (index, f"r{index}") for index in [*range(0, 14), 17]]


@pytest.mark.timeout(120)
def test_a_bad_run_is_refused_and_nothing_of_it_is_added(storage):
    store = CheckpointStore.open(storage.uri, FINGERPRINT)
    try:
        store.add_run(*_run(range(0, 5)))
        store.add_run(*_run([7, 9]))
        _, digests_of_8_9_10, values = _run([8, 9, 10])
        refused = [
            ([12, 11], bytes(32), "a run's indexes ascend, each once .*: \\[12, 11\\]"),
            ([11, 12, 12], bytes(48), "a run's indexes ascend, each once .*: \\[11, 12, 12\\]"),
            ([11, 12], bytes(16), "2 indexes need 32 bytes of digests, not 16"),
            (range(11, 13), bytes(48), "2 indexes need 32 bytes of digests, not 48"),
            ([-1, 11], bytes(32), "an input's index is 0 or more, not -1"),
            (range(3, 6), bytes(48), "input 3 has a result in checkpoint .* already"),
            (range(5, 8), bytes(48), "input 7 has a result in checkpoint .* already"),
            ([8, 9, 10], digests_of_8_9_10, "input 9 has a result in checkpoint .* already"),
        ]
        for indexes, digests, message in refused:
            with pytest.raises(ValueError, match=message):
                store.add_run(indexes, digests, values)
            assert store.done_count == 7 and store.done_end == 10, indexes
            assert [index for index in range(14) if store.is_done(index)] == [0, 1, 2, 3, 4, 7, 9]
        store.add_run(*_run([5, 8, 11]))  # what was refused was not flagged done
        assert store.done_count == 10 and store.done_end == 12
    finally:
        store.close()
    expected = [(index, f"r{index}") for index in [0, 1, 2, 3, 4, 5, 7, 8, 9, 11]]
    assert list(indexed_results(storage.uri)) == expected
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        assert store.done_count == 10 and store.done_end == 12
        store.check_input(8, input_digest(("item", 8)))  # 8's digest, not one refused
    assert list(indexed_results(storage.uri)) == expected


@pytest.mark.timeout(120)
def test_an_index_saved_by_two_runs_of_the_map_comes_back_once(storage):
    """Two runs of a map writing the same checkpoint at once (two stores, each unaware of the
    other's results), and a third writer's shard of a retried item's one-result run."""
    first = CheckpointStore.open(storage.uri, FINGERPRINT, flush_seconds=600)
    second = CheckpointStore.open(storage.uri, FINGERPRINT, flush_seconds=600)
    try:
        first.add_run(*_run(range(0, 6)))
        second.add_run(*_run([3, 4, 6, 7]))
        second.flush()
        first.flush()
    finally:
        second.close()
        first.close()
    third = PendingRuns()
    third.add(*_run([5]))
    third.add(*_run(range(7, 9)))
    CheckpointLocation(storage.uri).write_shard(third)
    assert storage.shard_count() == 3
    expected = [(index, f"r{index}") for index in range(9)]
    assert list(read_checkpoint(storage.uri, partial=True)) == expected
    assert list(indexed_results(storage.uri)) == expected
    with CheckpointStore.open(storage.uri, FINGERPRINT) as store:
        assert store.done_count == 9 and store.done_end == 9
        assert all(store.is_done(index) for index in range(9)) and not store.is_done(9)
        for index in [3, 4, 5, 7]:
            store.check_input(index, input_digest(("item", index)))
        with pytest.raises(CheckpointMismatchError, match="input 4 differs"):
            store.check_input(4, input_digest(("item", 3)))
        with pytest.raises(ValueError, match="input 7 has a result"):
            store.add_run(*_run([7]))
        store.mark_complete(9)
    assert list(read_checkpoint(storage.uri)) == [f"r{index}" for index in range(9)]


@pytest.mark.timeout(120)
def test_a_checkpoint_of_another_layout_version_is_refused_saying_what_to_do(storage):
    _write(storage.uri, [0, 1])
    location = CheckpointLocation(storage.uri)
    for version, whose, advice in [(1, "an older", "read it with the rhmapper that wrote it"),
                                   (3, "a newer", "upgrade rhmapper")]:
        location.write_manifest({**new_manifest(FINGERPRINT, total=2), "version": version})
        said = (f"checkpoint {storage.uri} was written by {whose} rhmapper (layout version "
                f"{version}, this one reads 2): {advice}")
        for refused in [lambda: CheckpointStore.open(storage.uri, FINGERPRINT),
                        lambda: read_checkpoint(storage.uri),
                        lambda: read_checkpoint(storage.uri, partial=True),
                        lambda: indexed_results(storage.uri)]:
            with pytest.raises(CheckpointMismatchError) as raised:
                refused()
            assert str(raised.value).startswith(said)
        with location.filesystem.open_input_stream(f"{location.path}/manifest.json") as stream:
            manifest = json.loads(stream.read())
        assert manifest["version"] == version, "refused: the manifest is left as it was"
        assert storage.shard_count() == 1, "refused: nothing deleted"
    location.write_manifest(new_manifest(FINGERPRINT, total=2))
    assert list(indexed_results(storage.uri)) == [(0, 0), (1, 1)]


@pytest.mark.timeout(120)
def test_many_runs_arriving_shuffled_in_several_shards_come_back_in_order(tmp_path):
    """2,000 runs of 50 results of 1 KiB (100 MiB), added in a shuffled order in 8 shards: half
    of them ranges, half every other index of 100 (runs that interleave two by two)."""
    uri = str(tmp_path)
    runs: list[Sequence[int]] = []
    for start in range(0, 100_000, 100):
        if start % 200:
            runs += [range(start, start + 50), range(start + 50, start + 100)]
        else:
            runs += [list(range(start, start + 100, 2)), list(range(start + 1, start + 100, 2))]
    random.Random(6).shuffle(runs)

    def value(index: int) -> bytes:
        return index.to_bytes(4, "little") * 256

    digest = input_digest("same")
    with CheckpointStore.open(uri, FINGERPRINT, flush_bytes=64 * MIB, flush_seconds=600) as store:
        for number, indexes in enumerate(runs, 1):
            store.add_run(indexes, digest * len(indexes),
                          pickle.dumps([value(index) for index in indexes], protocol=5))
            if number % 250 == 0:
                store.flush()
        assert store.done_count == 100_000
        store.mark_complete(100_000)
    assert len(CheckpointLocation(uri).shards()) == 8
    read = 0
    wrong = []
    for index, got in enumerate(read_checkpoint(uri)):
        read += 1
        if got != value(index):
            wrong.append(index)
    assert read == 100_000 and wrong == []
    assert [index for index, _ in read_checkpoint(uri, partial=True)] == list(range(100_000))


@pytest.mark.timeout(120)
def test_stable_pickles_are_plain_pickles_of_plain_data_and_name_classes_and_functions():
    """Plain data: its plain pickle by protocol 4 (a value over 64 KiB too, pickled in frames of
    its own).
    Classes and functions made at run time: by module and name, so an instance sent by value to
    another process (as cloudpickle sends it to a replica) digests the same there."""
    plain = [1, -2**70, 2.5, "é", b"\x00\xff", None, True, (1, [2, {"k": (3.0,)}]), {3, 1, 2},
             frozenset({5}), list(range(1000)), b"x" * (100 * 1024), ["y" * 70_000, b"z"],
             {"big": bytearray(b"w" * 70_000)}]
    for item in plain:
        assert stable_pickle(item) == pickle.dumps(item, protocol=4), item
        assert input_digest(item) == hashlib.blake2b(pickle.dumps(item, protocol=4),
                                                     digest_size=16).digest()
    assert input_digests(plain, plain=True) == input_digests(plain) == b"".join(
        map(input_digest, plain))

    def make_point_class() -> type:
        class Point:
            def __init__(self, x: int, label: str) -> None:
                self.x, self.label = x, label
        return Point

    point, other_point = make_point_class(), make_point_class()  # one name: two class objects
    pickled = stable_pickle(point(1, "a"))
    assert b"tests.test_checkpoint_store" in pickled and b"Point" in pickled
    assert b"_make_skeleton_class" in cloudpickle.dumps(point(1, "a"))  # by value, with an id:
    assert re.search(rb"[0-9a-f]{32}", cloudpickle.dumps(point(1, "a")))
    assert b"_make_skeleton_class" not in pickled and not re.search(rb"[0-9a-f]{32}", pickled)
    assert input_digest(point(1, "a")) == input_digest(point(1, "a")) == input_digest(
        other_point(1, "a"))
    assert input_digest(point(2, "a")) != input_digest(point(1, "a")) != input_digest(
        point(1, "b"))
    increment, double = (lambda x: x + 1), (lambda x: x * 2)
    assert input_digest(increment) != input_digest(double)
    assert input_digest(increment) == input_digest((lambda: (lambda x: x + 1))())

    # Two lambdas share one interned name here, not where cloudpickle rebuilt them.
    items = [point(1, "a"), (point(2, "b"), [increment, double]), increment]
    script = ("import sys, cloudpickle; from rhmapper.digests import input_digest; "
              "print(*(input_digest(item).hex() for item in "
              "cloudpickle.loads(sys.stdin.buffer.read())))")
    there = subprocess.run([sys.executable, "-c", script], cwd=REPO_DIR, timeout=60,
                           input=cloudpickle.dumps(items), capture_output=True,
                           check=True).stdout.decode().split()
    assert there == [input_digest(item).hex() for item in items]


def test_an_array_digests_the_same_whether_or_not_it_is_read_only():
    """A replica receives a numpy array as a read-only view of the driver's writable one
    (protocol 5 would pickle the two apart)."""
    import numpy as np

    writable = np.arange(1000, dtype=np.float32).reshape(10, 100)
    read_only = writable.copy()
    read_only.flags.writeable = False
    assert pickle.dumps(writable, protocol=5) != pickle.dumps(read_only, protocol=5)
    assert input_digest(writable) == input_digest(read_only)
    assert input_digest({"x": writable}) == input_digest({"x": read_only})
    changed = writable.copy()
    changed[3, 7] += 1
    assert input_digest(changed) != input_digest(writable)


def test_arrow_data_digests_the_same_whether_its_buffers_are_writable_or_not():
    """A writable Arrow buffer reduces to a bytearray, a read-only one (what a replica gets from
    the object store) to bytes."""
    import pyarrow as pa

    data = b"".join(index.to_bytes(8, "little") for index in range(100))
    writable = pa.Array.from_buffers(pa.int64(), 100, [None, pa.py_buffer(bytearray(data))])
    read_only = pa.Array.from_buffers(pa.int64(), 100, [None, pa.py_buffer(data)])
    assert writable.buffers()[1].is_mutable and not read_only.buffers()[1].is_mutable
    assert pickle.dumps(writable, protocol=4) != pickle.dumps(read_only, protocol=4)
    assert input_digest(writable) == input_digest(read_only)
    assert input_digest(pa.table({"x": writable})) == input_digest(pa.table({"x": read_only}))
    assert input_digest(read_only) != input_digest(pa.array(range(1, 101), pa.int64()))


def test_an_input_holding_a_type_pickled_through_copyreg_digests_the_same_in_every_process():
    """A compiled pattern pickles through ``copyreg``'s table, not its ``__reduce_ex__``; a
    class of ``__main__`` beside it stays named, not pickled by value with a process's id."""
    script = ("import dataclasses, re, sys; from rhmapper.digests import input_digest\n"
              "@dataclasses.dataclass\nclass Rule:\n    name: str\n    pattern: re.Pattern\n"
              "print(input_digest([Rule('x', re.compile('x+')), sys, re.compile('y')]).hex())")
    digests = {subprocess.run([sys.executable, "-c", script], cwd=REPO_DIR, timeout=60,
                              capture_output=True, text=True, check=True).stdout.strip()
               for _ in range(2)}
    assert len(digests) == 1 and len(digests.pop()) == 32


def test_a_writer_that_stops_for_any_reason_fails_the_next_flush_instead_of_hanging(tmp_path):
    with pytest.raises(ValueError, match="flush_seconds is a number of seconds above 0"):
        CheckpointStore.open(str(tmp_path), {"target": "f"}, flush_seconds=float("inf"))
    store = CheckpointStore.open(str(tmp_path), {"target": "f"}, flush_seconds=600)

    def broken_due() -> bool:
        raise OverflowError("a bug in the writer's wait, not in a write")

    store._due = broken_due  # what the writer asks each time it wakes
    store.add(0, input_digest(0), "zero")  # wakes it
    with pytest.raises(CheckpointWriteError, match="1 results were not saved"):
        store.flush()
    with pytest.raises(CheckpointWriteError):
        store.close()


def test_a_run_whose_results_do_not_match_its_inputs_is_named_as_corrupt(tmp_path):
    uri = str(tmp_path)
    with CheckpointStore.open(uri, {"target": "f"}) as store:
        store.add_run(range(3), input_digests([0, 1, 2]), pickle.dumps(["a", "b"]))
        store.mark_complete(3)
    with pytest.raises(CheckpointCorruptError, match="holds 2 results for 3 inputs"):
        list(read_checkpoint(uri))


def test_a_large_run_gets_a_record_batch_of_its_own_after_small_ones(tmp_path):
    """A reader holds a batch per shard: a large run is not copied into its small neighbours'."""
    import pyarrow.ipc

    uri = str(tmp_path)
    large = b"L" * (300 * 1024)
    with CheckpointStore.open(uri, {"target": "f"}, flush_seconds=600) as store:
        store.add_run([0, 1], input_digests([0, 1]), pickle.dumps([b"s", b"t"]))
        store.add_run([2], input_digest(2), pickle.dumps([large]))
        store.add_run([3], input_digest(3), pickle.dumps([b"u"]))
    [shard] = CheckpointLocation(uri).shards()
    reader = pyarrow.ipc.open_file(shard.path)
    assert [reader.get_batch(number).column(0).to_pylist()
            for number in range(reader.num_record_batches)] == [[[0, 1]], [[2]], [[3]]]
    assert list(indexed_results(uri)) == [(0, b"s"), (1, b"t"), (2, large), (3, b"u")]
