"""Durable maps, without Ray: a map with ``checkpoint=URI`` saves each result as it finishes
(`rhmapper.checkpoint_store`) and, run again, sends only the inputs without one, giving back
the saved results with the new ones as if nothing had failed.

```text
input ─► DurableMap.source ─┬─ done: digest checked, not sent
                            └─ to do ─► the map (MapRun) ─► ResultBook ─► on_values ─► store
saved results (by index) ──────────────────┐                    │ values of the run
                                           ▼                    ▼
                                   DurableMap.results: stored and new, in the verb's order
```

The inner map runs over the inputs still to do, numbered 0, 1, ... in their order; `DurableMap`
keeps, per input sent, its index in the user's input (an ``array`` of 8 bytes per input).
"""

from __future__ import annotations

import array
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from rhmapper.checkpoint_layout import gapless
from rhmapper.checkpoint_read import result_stretches, stretch_pairs
from rhmapper.checkpoint_store import CheckpointStore
from rhmapper.digests import input_digest, input_digests
from rhmapper.errors import CheckpointMismatchError
from rhmapper.plan import MapPlan
from rhmapper.wire import dumps

STORED_BATCH = 1024
"""Saved results are handed back in lists of up to this many."""


@dataclass(frozen=True)
class Checkpointing:
    """A map's ``checkpoint=`` option, as it travels with its `MapPlan` (to the host too).

    Examples:
        >>> Checkpointing("/tmp/ckpt", {"target": "builtins.abs"}).overwrite
        False
    """

    uri: str
    fingerprint: dict[str, str]
    """What makes the map's results what they are (see `map_fingerprint`)."""
    overwrite: bool = False
    read_back: bool = True
    """Whether the map hands back the results saved before (a spawned map's are read from the
    checkpoint when asked for instead)."""


def map_fingerprint(target: str, method: str | None, build_args: Any, kwargs: dict | None,
                    star: bool) -> dict[str, str]:
    """The fingerprint of a map: its target's qualified name, the method, digests of the
    arguments its replicas are built with and of its constant ``kwargs``, and whether each
    input is a tuple of arguments. (The code of the target is not part of it: a fixed bug
    resumes; pass ``overwrite=True`` to start afresh.)

    Examples:
        >>> print(map_fingerprint("builtins.pow", None, None, {"mod": 7}, True)["target"])
        builtins.pow
    """
    return {"target": target, "method": method or "", "star": str(star),
            "build_args": input_digest(build_args).hex(),
            "kwargs": input_digest(sorted((kwargs or {}).items())).hex()}


def absolute_if_local(uri: str) -> str:
    """``uri``, a local path made absolute (``~`` expanded) where it is given: the map may be
    run by another process (the mapper's host).

    Examples:
        >>> absolute_if_local("s3://bucket/run"), absolute_if_local("/data/run")
        ('s3://bucket/run', '/data/run')
    """
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


class DurableMap:
    """One run of a map with a checkpoint: which inputs to send, where their results go, and
    the results handed back (see the module docstring); a context manager (leaving it writes
    what waits).

    Examples:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> spec = Checkpointing(folder.name, {"target": "square"})
        >>> def square_all(items, on_values):  # a map that fails after its first two results
        ...     for index, item in enumerate(items):
        ...         if index == 2:
        ...             raise RuntimeError("the driver died")
        ...         on_values([index], [item], [item * item])
        ...         yield [item * item]
        >>> with DurableMap(spec, ordered=True) as durable:
        ...     list(durable.results(square_all(durable.source(iter([1, 2, 3, 4])),
        ...                                     durable.on_values)))
        Traceback (most recent call last):
        ...
        RuntimeError: the driver died
        >>> sent = []
        >>> def square_rest(items, on_values):
        ...     for index, item in enumerate(items):
        ...         sent.append(item)
        ...         on_values([index], [item], [item * item])
        ...         yield [item * item]
        >>> with DurableMap(spec, ordered=True) as durable:  # run again: 1 and 2 are not sent
        ...     list(durable.results(square_rest(durable.source(iter([1, 2, 3, 4])),
        ...                                      durable.on_values)))
        [[1, 4], [9], [16]]
        >>> sent
        [3, 4]
    """

    def __init__(self, checkpointing: Checkpointing, ordered: bool, indexed: bool = False
                 ) -> None:
        self.store = CheckpointStore.open(checkpointing.uri, checkpointing.fingerprint,
                                          overwrite=checkpointing.overwrite)
        self._ordered, self._indexed = ordered, indexed
        self._read_back = checkpointing.read_back
        self.stored_before = self.store.done_count
        """How many inputs had a result saved when the map started."""
        self._stored = (result_stretches(self.store.uri) if self.stored_before and self._read_back
                         else iter(()))
        """The saved results, as ``(indexes, values)`` stretches by index."""
        self._index_of: array.array | None = None
        """The index in the user's input of each input sent, by its index in the inner map
        (``None``: the same, nothing was done before)."""
        self._inputs: int | None = None
        """How many inputs the user's input had, once it is exhausted."""
        self._star = False
        """Whether each input is a tuple of arguments (set by `inner_plan`)."""

    def inner_plan(self, plan: MapPlan) -> MapPlan:
        """The plan of the inner map: no checkpoint, calls whose replies carry their items'
        digests, and the number of inputs without a result if ``plan`` knows its total."""
        total = plan.total
        if total is not None:
            if self.store.done_end > total:
                self._inputs = total
                self._check_length()
            total -= self.stored_before
        self._star = plan.call.star
        return dataclasses.replace(plan, checkpoint=None, total=total,
                                   call=dataclasses.replace(plan.call, digests=True))

    def source(self, items: Iterable) -> Iterator | list:
        """The inputs to send: those without a result (the others' digests are checked); a
        list stays a list (checked at once). A starmap's inputs become tuples, as the replicas
        may receive them: each side digests the same object."""
        if self._star:
            items = list(map(tuple, items)) if isinstance(items, list) else map(tuple, items)
        if isinstance(items, list):
            self._inputs = len(items)
            if not self.stored_before:
                return items
            self._check_length()
            return self._unsaved_of_list(items)
        return self._unsaved_then_checked(items)

    def _unsaved_of_list(self, items: list) -> list:
        """The items of ``items`` without a result, a stretch at a time (the others' digests
        checked a stretch at a time)."""
        store = self.store
        rest: list = []
        index_of = self._index_of = array.array("q")
        for start, stop, done in store.stretches(len(items)):
            if done:
                store.check_inputs(items, start, stop)
            else:
                rest.extend(items[start:stop])
                index_of.extend(range(start, stop))
        return rest

    def _unsaved(self, items: Iterable) -> Iterator:
        store = self.store
        index_of = self._index_of = array.array("q")
        for index, item in enumerate(self._counted(items)):
            if store.is_done(index):
                store.check_input(index, input_digest(item))
            else:
                index_of.append(index)
                yield item

    def _unsaved_then_checked(self, items: Iterable) -> Iterator:
        if self.stored_before:
            yield from self._unsaved(items)
            self._check_length()
        else:
            yield from self._counted(items)

    def _counted(self, items: Iterable) -> Iterator:
        """``items``, counted into ``_inputs`` once they end."""
        inputs = 0
        for inputs, item in enumerate(items, start=1):
            yield item
        self._inputs = inputs

    def _check_length(self) -> None:
        store = self.store
        if store.done_end > self._inputs:
            raise CheckpointMismatchError(
                f"checkpoint {store.uri} holds the result of input {store.done_end - 1}, but the "
                f"input has {self._inputs} items: to resume a map, give it the same inputs; "
                "else use another checkpoint URI, or pass overwrite=True to start afresh")

    def on_values(self, indexes: Sequence[int], items: list, values: list,
                  digests: bytes | None = None, values_pickle: bytes | None = None) -> None:
        """The inner map's ``items`` at ``indexes`` succeeded: save their results as one run,
        with the ``digests`` and the ``values_pickle`` the replica made, or made here when it did
        not (see `rhmapper.results.OnValues`)."""
        if self._index_of is not None:
            index_of = self._index_of
            if isinstance(indexes, range):
                indexes = gapless(index_of[indexes.start:indexes.stop])
            else:
                indexes = [index_of[index] for index in indexes]
        self.store.add_run(indexes, input_digests(items) if digests is None else digests,
                           dumps(values) if values_pickle is None else values_pickle)

    def results(self, chunks: Iterator[list]) -> Iterator[list]:
        """The results of the user's map, from the inner map's ``chunks``: the saved ones and
        the new ones, in input order if ordered, else the saved ones first (unless the
        checkpoint is not read back); of an indexed map, ``(index, value)`` pairs with the
        index in the user's input. Once every input has its result, the checkpoint is marked
        complete."""
        if self._indexed:
            yield from (list(zip(indexes, values)) for indexes, values in self._stored)
            index_of = self._index_of
            yield from (chunks if index_of is None else
                        ([(index_of[index], value) for index, value in chunk] for chunk in chunks))
        elif not self.stored_before or not self._read_back:
            yield from chunks
        elif self._ordered:
            yield from self._ordered_results(chunks)
        else:
            yield from (values for _, values in self._stored)
            yield from chunks
        self._complete()

    def collected(self, fresh: list) -> list:
        """The results of a ``map`` in input order, from the inner map's list ``fresh``."""
        if self._index_of is None:
            results = fresh
        else:
            results = [None] * (len(fresh) + self.stored_before)
            for indexes, values in self._stored:
                if isinstance(gapless(indexes), range):  # in place at once
                    results[indexes[0]:indexes[-1] + 1] = values
                else:
                    for index, value in zip(indexes, values):
                        results[index] = value
            for position, value in enumerate(fresh):
                results[self._index_of[position]] = value
        self._complete()
        return results

    def __enter__(self) -> DurableMap:
        return self

    def __exit__(self, *exception: Any) -> None:
        """Write the results still waiting and stop the store's writer (a write failure is
        raised as `rhmapper.errors.CheckpointWriteError`)."""
        self.store.__exit__(*exception)

    def _complete(self) -> None:
        assert self._inputs is not None, "the inner map ended before its input"
        if self.store.done_count == self._inputs:  # else items failed: a rerun runs them
            self.store.mark_complete(self._inputs)

    def _ordered_results(self, chunks: Iterator[list]) -> Iterator[list]:
        """Saved and new results by index: the saved ones before the first input without a
        result at once, then each new chunk with the saved ones between its values."""
        saved, store = _SavedCursor(stretch_pairs(self._stored)), self.store
        first_missing = 0
        while store.is_done(first_missing):
            first_missing += 1
        yield from _batched(saved.values_before(first_missing))
        position = 0
        for chunk in chunks:
            merged = []
            for value in chunk:
                merged.extend(saved.values_before(self._index_of[position]))
                merged.append(value)
                position += 1
            yield merged
        yield from _batched(saved.values_before(math.inf))


class _SavedCursor:
    """The saved ``(index, value)`` results, in index order, taken up to an index at a time."""

    def __init__(self, saved: Iterator[tuple[int, Any]]) -> None:
        self._saved = saved
        self._next = next(saved, None)

    def values_before(self, end: float) -> Iterator:
        """The values of the saved results before index ``end`` not taken yet."""
        while self._next is not None and self._next[0] < end:
            value = self._next[1]
            self._next = next(self._saved, None)
            yield value


def _batched(values: Iterator, size: int = STORED_BATCH) -> Iterator[list]:
    """``values`` (read from storage, never waiting on work) in lists of up to ``size``."""
    batch: list = []
    for value in values:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
