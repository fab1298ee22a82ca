"""Reading a checkpoint's results back in input order, with bounded memory.

The runs (a call's results each, see `rhmapper.checkpoint_layout`) are merged on their indexes:
a shard is opened only when the merge reaches its first index, a run is unpickled only when the
merge reaches its first index, and an open shard holds one record batch (about 256 KiB, or one
larger run) in memory. An ordered map's runs barely overlap, so few are open at a time however
many there are.
"""

from __future__ import annotations

import bisect
import heapq
import math
import pickle
from collections.abc import Iterator
from typing import Any

from rhmapper.checkpoint_layout import CheckpointLocation, Shard, gapless
from rhmapper.checkpoint_store import done_set_of
from rhmapper.errors import (
    CheckpointCorruptError,
    CheckpointIncompleteError,
    CheckpointNotFoundError,
)


def read_checkpoint(uri: str, partial: bool = False) -> Iterator[Any]:
    """The results of the map checkpointed at ``uri``, in input order, a batch of them in memory
    at a time.

    The map must have finished: else `CheckpointIncompleteError` says how many results there are,
    before any is read. With ``partial=True``, ``(index, result)`` pairs of the inputs done so
    far, by index, whether or not the map finished.

    Examples:
        >>> import tempfile
        >>> from rhmapper.checkpoint_store import CheckpointStore
        >>> from rhmapper.digests import input_digest
        >>> folder = tempfile.TemporaryDirectory(); uri = folder.name
        >>> with CheckpointStore.open(uri, {"target": "upper"}, total=3) as store:
        ...     for index in [2, 0]:
        ...         store.add(index, input_digest("abc"[index]), "ABC"[index])
        >>> list(read_checkpoint(uri, partial=True))
        [(0, 'A'), (2, 'C')]
        >>> read_checkpoint(uri)
        Traceback (most recent call last):
        ...
        rhmapper.errors.CheckpointIncompleteError: checkpoint ... holds 2 of 3 results: ...
        >>> with CheckpointStore.open(uri, {"target": "upper"}) as store:
        ...     store.add(1, input_digest("b"), "B"); store.mark_complete(3)
        >>> list(read_checkpoint(uri))
        ['A', 'B', 'C']
    """
    location = CheckpointLocation(uri)
    manifest = _manifest(location)
    if partial:
        return stretch_pairs(_merged(location, location.shards()))
    count = manifest["complete_count"]
    if count is None:
        done = len(done_set_of(location))
        of_total = "" if manifest["total"] is None else f" of {manifest['total']}"
        raise CheckpointIncompleteError(
            f"checkpoint {uri} holds {done}{of_total} results: its map has not finished. Run the "
            f"map again with checkpoint={uri!r} to finish it, or read what is done with "
            f"read_checkpoint({uri!r}, partial=True).")
    return _values_in_order(uri, _merged(location, location.shards()), count)


def indexed_results(uri: str) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` of each input done in the checkpoint at ``uri``, by index, a batch of
    them in memory at a time (what ``read_checkpoint(uri, partial=True)`` gives). The shards are
    those there at the call: shards a store writes later are not read.

    Examples:
        >>> import tempfile
        >>> from rhmapper.checkpoint_store import CheckpointStore
        >>> folder = tempfile.TemporaryDirectory(); uri = folder.name
        >>> with CheckpointStore.open(uri, {"target": "f"}) as store:
        ...     store.add(5, bytes(16), None)
        >>> list(indexed_results(uri))
        [(5, None)]
    """
    return stretch_pairs(result_stretches(uri))


def result_stretches(uri: str) -> Iterator[tuple[list[int], list]]:
    """The results done in the checkpoint at ``uri``, by index, as ``(indexes, values)``
    stretches (lists: parts of one run each), for readers that take them a stretch at a time.

    Examples:
        >>> import tempfile
        >>> import pickle
        >>> from rhmapper.checkpoint_store import CheckpointStore
        >>> folder = tempfile.TemporaryDirectory(); uri = folder.name
        >>> with CheckpointStore.open(uri, {"target": "f"}) as store:
        ...     store.add_run(range(3, 5), bytes(32), pickle.dumps(["three", "four"]))
        >>> list(result_stretches(uri))
        [([3, 4], ['three', 'four'])]
    """
    location = CheckpointLocation(uri)
    _manifest(location)
    return _merged(location, location.shards())


def _manifest(location: CheckpointLocation) -> dict:
    manifest = location.read_manifest()
    if manifest is None:
        raise CheckpointNotFoundError(
            f"no checkpoint at {location.uri}: it has no manifest.json (nothing was written "
            "there, or it was deleted). Check the URI, or run the map with checkpoint= to write "
            "one.")
    return manifest


def _values_in_order(uri: str, stretches: Iterator[tuple[list[int], list]], count: int
                     ) -> Iterator[Any]:
    """The values of ``stretches``, checked to be those of inputs ``0 .. count - 1``, each once."""
    expected = 0
    for indexes, values in stretches:
        if indexes[0] != expected:
            break
        usable = (len(indexes) if isinstance(gapless(indexes), range) else
                  next(position for position, index in enumerate(indexes)
                       if index != expected + position))
        usable = min(usable, count - expected)
        yield from (values if usable == len(values) else values[:usable])
        expected += usable
        if usable < len(indexes):
            break
    if expected != count:
        raise CheckpointIncompleteError(
            f"checkpoint {uri} is marked complete with {count} results, but the result of input "
            f"{expected} is missing: a shard was deleted outside rhmapper. Run the map again "
            "with this checkpoint to compute the missing results.")


def stretch_pairs(stretches: Iterator[tuple[list[int], list]]) -> Iterator[tuple[int, Any]]:
    """The ``(index, value)`` pairs of ``(indexes, values)`` stretches.

    Examples:
        >>> list(stretch_pairs(iter([([0, 1], ["a", "b"]), ([5], ["f"])])))
        [(0, 'a'), (1, 'b'), (5, 'f')]
    """
    for indexes, values in stretches:
        yield from zip(indexes, values)


def _merged(location: CheckpointLocation, shards: list[Shard]
            ) -> Iterator[tuple[list[int], list]]:
    """``(indexes, values)`` stretches of every result of ``shards`` (sorted by first index), by
    index; an index found in two runs (two runs of the map that wrote the same checkpoint at
    once) comes once."""
    waiting: list[tuple[int, int, list[int], bytes, Iterator]] = []
    """The next run of each open shard: (first index, order, indexes, pickled values, the
    shard's other runs)."""
    open_runs: list[tuple[int, int, int, list[int], list]] = []
    """Unpickled runs: (next index, order, position, indexes, values)."""
    opened, order, last = 0, 0, -1

    def wait_for_next(runs: Iterator[tuple[list[int], bytes]]) -> None:
        nonlocal order
        run = next(runs, None)
        if run is not None:
            order += 1
            heapq.heappush(waiting, (run[0][0], order, run[0], run[1], runs))

    while True:
        top = open_runs[0][0] if open_runs else math.inf
        while opened < len(shards) and shards[opened].first_index <= min(
                top, waiting[0][0] if waiting else math.inf):
            wait_for_next(_runs(location, shards[opened]))
            opened += 1
        if waiting and waiting[0][0] <= top:
            first, run_order, indexes, blob, runs = heapq.heappop(waiting)
            values = pickle.loads(blob)
            if len(values) != len(indexes):
                raise CheckpointCorruptError(
                    f"a run of checkpoint {location.uri} holds {len(values)} results for "
                    f"{len(indexes)} inputs (from input {first}): it was changed outside "
                    "rhmapper. Delete the checkpoint and run the map again.")
            heapq.heappush(open_runs, (first, run_order, 0, indexes, values))
            wait_for_next(runs)
            continue
        if not open_runs:
            return
        _, run_order, position, indexes, values = heapq.heappop(open_runs)
        limit = min(open_runs[0][0] if open_runs else math.inf,
                    waiting[0][0] if waiting else math.inf,
                    shards[opened].first_index if opened < len(shards) else math.inf)
        # This run's results up to the next run's first (its first at least), but those
        # another run gave already.
        stop = bisect.bisect_left(indexes, limit, position + 1)
        start = bisect.bisect_right(indexes, last, position, stop)
        if start < stop:
            last = indexes[stop - 1]
            yield indexes[start:stop], values[start:stop]
        if stop < len(indexes):
            heapq.heappush(open_runs, (indexes[stop], run_order, stop, indexes, values))


def _runs(location: CheckpointLocation, shard: Shard) -> Iterator[tuple[list[int], bytes]]:
    """``(indexes, pickled values)`` of a shard's runs, one record batch in memory at a time."""
    for batch in location.read_shard(shard):
        yield from zip(batch.column(0).to_pylist(), batch.column(2).to_pylist())
