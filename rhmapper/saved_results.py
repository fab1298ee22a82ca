"""The results of a checkpointed spawned map, as its host hands them out: read from the
checkpoint, a bounded batch at a time, from any position (`SavedResults`). The host keeps none
of the values in memory, only the exceptions of items that failed (they are not saved: a rerun
runs them again)."""

from __future__ import annotations

import itertools
import threading
from typing import Any, Iterator

from rhmapper.checkpoint_read import indexed_results
from rhmapper.errors import CheckpointIncompleteError
from rhmapper.sizing import mean_item_bytes

READ_BYTES = 8 * 2**20
"""A read hands out about this many bytes of results at most (at least one result)."""
READ_COUNT = 4096
"""... and this many results at most."""


class SavedResults:
    """The results of a spawned map with ``checkpoint=uri`` and ``total`` inputs.

    Examples:
        >>> import tempfile
        >>> from rhmapper.checkpoint_store import CheckpointStore
        >>> folder = tempfile.TemporaryDirectory()
        >>> with CheckpointStore.open(folder.name, {"target": "f"}) as store:
        ...     store.add(0, bytes(16), "a"); store.add(2, bytes(16), "c")
        >>> saved = SavedResults(folder.name, total=3)
        >>> saved.note([(1, ValueError("b failed")), (2, "c")])  # the map's pairs, as they come
        >>> saved.read(0)
        ['a', ValueError('b failed'), 'c']
        >>> saved.read(2)
        ['c']
    """

    def __init__(self, uri: str, total: int) -> None:
        self.uri, self.total = uri, total
        self._failures: dict[int, BaseException] = {}
        self._lock = threading.Lock()
        self._cursor: tuple[int, Iterator[Any]] | None = None
        """The position the last read stopped at, and the results from there."""

    def note(self, pairs: list[tuple[int, Any]]) -> None:
        """Results of the map as ``(index, value)`` pairs: the failures among them are kept."""
        for index, value in pairs:
            if isinstance(value, BaseException):
                self._failures[index] = value

    def read(self, start: int) -> list:
        """The results from position ``start`` on, up to `READ_BYTES` / `READ_COUNT` of them."""
        with self._lock:
            if self._cursor is None or self._cursor[0] != start:
                self._cursor = (start, itertools.islice(self._all(), start, None))
            _, values = self._cursor
            batch = list(itertools.islice(values, 16))
            if batch:
                wanted = min(READ_COUNT, max(16, int(READ_BYTES / mean_item_bytes(batch))))
                batch.extend(itertools.islice(values, wanted - len(batch)))
            self._cursor = (start + len(batch), values)
            return batch

    def _all(self) -> Iterator[Any]:
        saved = indexed_results(self.uri)
        pending = next(saved, None)
        for index in range(self.total):
            while pending is not None and pending[0] < index:
                pending = next(saved, None)
            if pending is not None and pending[0] == index:
                yield pending[1]
            elif index in self._failures:
                yield self._failures[index]
            else:
                raise CheckpointIncompleteError(
                    f"the result of input {index} is neither in checkpoint {self.uri} nor a "
                    "failure of the map: run the map again with this checkpoint")
