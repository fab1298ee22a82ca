"""A durable map's results on storage: `CheckpointStore` opens a checkpoint (its manifest and the
set of inputs already done), takes results as they finish and writes them in shards from a
thread of its own.

```text
results thread ── add_run(indexes, digests, pickled values) ─► pending runs ─► writer thread
                                                           │ every flush_bytes or flush_seconds
                                                           ▼
                        <uri>/shards/<first index>-<uuid8>.arrow (whole or absent)
```

The layout on storage is `rhmapper.checkpoint_layout`'s; reading results back,
`rhmapper.checkpoint_read`'s.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from rhmapper.checkpoint_layout import (
    RESULT_BYTES,
    CheckpointLocation,
    PendingRuns,
    check_run,
    gapless,
    new_manifest,
)
from rhmapper.digests import DIGEST_SIZE, digest_at, input_digest, input_digests
from rhmapper.errors import CheckpointMismatchError, CheckpointWriteError
from rhmapper.wire import dumps, plain_pickle

_log = logging.getLogger(__name__)

FLUSH_BYTES = 1024 * 1024
"""A shard is written once this many bytes of results wait and the writer is free: while
results come faster than it writes, each shard holds what came during the last write, so what
waits when the map ends (written before its verb returns) is little."""
BEHIND_BYTES = 32 * 1024 * 1024
"""Adding results waits while this many bytes of them wait to be written, or are being."""
FLUSH_SECONDS = 5.0
"""... or once its oldest result has waited this long at most: `FLUSH_SHARE` of the time the
store has been open, between `FLUSH_SECONDS_MIN` and this (unless ``flush_seconds`` is given)."""
FLUSH_SHARE = 1 / 50
"""A crash loses at most this share of a map's time so far (a resume redoes at most that)."""
FLUSH_SECONDS_MIN = 0.25
CHECK_STRETCH = 65536
"""Inputs whose digests `CheckpointStore.check_inputs` makes and compares at once."""


class DoneSet:
    """Which inputs have a result, and their digests: a byte and `DIGEST_SIZE` bytes per input
    (17 MB per million inputs), so a look-up is O(1) and nothing is a Python object per input.

    Examples:
        >>> done = DoneSet()
        >>> done.add(3, b"d" * 16), done.add(3, b"e" * 16), len(done), done.end
        (True, False, 1, 4)
        >>> 3 in done, 2 in done, 10**9 in done, done.digest(3)
        (True, False, False, b'dddddddddddddddd')
        >>> done.add_many(range(4, 6), b"f" * 32), done.add_many(range(5, 7), b"g" * 32)
        (None, 5)
    """

    def __init__(self) -> None:
        self._flags = bytearray()
        self._digests = bytearray()
        self._count = 0
        self.end = 0
        """One past the highest index done (0 when none is)."""

    def add(self, index: int, digest: bytes) -> bool:
        """Record ``index`` as done with its input's ``digest``; False (and nothing changes) if
        it was done already."""
        return self.add_many([index], digest) is None

    def add_many(self, indexes: Sequence[int], digests: bytes) -> int | None:
        """Record each of ``indexes`` (ascending) as done with its digest (``digests``: one
        after another); the first index that was done already, if any (then nothing changes).
        A range costs no Python code per index."""
        if not indexes:
            return None
        flags, end = self._flags, indexes[-1] + 1
        if end > len(flags):
            grown = max(2 * len(flags), end)
            flags.extend(bytes(grown - len(flags)))
            self._digests.extend(bytes(grown * DIGEST_SIZE - len(self._digests)))
        if isinstance(indexes, range) and indexes.step == 1:
            repeated = flags.find(1, indexes.start, indexes.stop)
            if repeated >= 0:
                return repeated
            flags[indexes.start:indexes.stop] = bytes([1]) * len(indexes)
            self._digests[indexes.start * DIGEST_SIZE:indexes.stop * DIGEST_SIZE] = digests
        else:
            for position, index in enumerate(indexes):
                if flags[index]:  # done before, or earlier in this call: undo this call's flags
                    for flagged in indexes[:position]:
                        flags[flagged] = 0
                    return index
                flags[index] = 1
            stored = self._digests
            for position, index in enumerate(indexes):
                stored[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = digest_at(digests,
                                                                                  position)
        self._count += len(indexes)
        self.end = max(self.end, end)
        return None

    def __contains__(self, index: int) -> bool:
        return index < len(self._flags) and self._flags[index] == 1

    def __len__(self) -> int:
        return self._count

    def digest(self, index: int) -> bytes:
        """The digest of a done input."""
        return self.digests(index, index + 1)

    def digests(self, start: int, stop: int) -> bytes:
        """The digests of the done inputs ``start .. stop - 1``, one after another."""
        return bytes(self._digests[start * DIGEST_SIZE:stop * DIGEST_SIZE])

    def stretches(self, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, stop, done)`` of the stretches of inputs ``0 .. end - 1`` that are all
        done or all not done, in order (found in C, not input by input).

        Examples:
            >>> done = DoneSet(); done.add_many(range(2, 5), bytes(48))
            >>> list(done.stretches(7))
            [(0, 2, False), (2, 5, True), (5, 7, False)]
        """
        flags, start = self._flags, 0
        known = min(end, len(flags))  # past the flags, nothing is done
        while start < end:
            done = start < known and flags[start] == 1
            stop = flags.find(0 if done else 1, start, known) if start < known else -1
            if stop < 0:
                stop = known if done else end
            yield start, stop, done
            start = stop


class CheckpointStore:
    """One map's checkpoint, open for writing: what is done, and results added as they finish.

    Open it with `CheckpointStore.open`. `add_run` queues the results of a call as they came
    from the replica (no work per result); `add` pickles one result first. A
    thread of the store's own writes the queued results in a shard once ``flush_bytes`` of them
    wait or the oldest has waited ``flush_seconds`` (by default 1/50 of the time the store has
    been open, between 0.25 s and 5 s), whether or not more come. A failed write is
    raised, as `CheckpointWriteError`, from the next `add`, `flush` or `close`; shards written
    before it stay. `close` (or leaving a ``with`` block) writes what waits and stops the thread.

    Examples:
        >>> import tempfile
        >>> from rhmapper.digests import input_digest
        >>> folder = tempfile.TemporaryDirectory(); uri = folder.name
        >>> with CheckpointStore.open(uri, {"target": "square"}) as store:
        ...     for index, item in enumerate([1, 2, 3]):
        ...         store.add(index, input_digest(item), item * item)
        >>> store = CheckpointStore.open(uri, {"target": "square"})
        >>> store.done_count, store.done_end, store.is_done(2), store.is_done(3)
        (3, 3, True, False)
        >>> store.check_input(0, input_digest(1))  # the same input: nothing to say
        >>> store.check_input(0, input_digest(5))
        Traceback (most recent call last):
        ...
        rhmapper.errors.CheckpointMismatchError: input 0 differs from the input whose result ...
        >>> store.mark_complete(3); store.close()
    """

    def __init__(self, location: CheckpointLocation, manifest: dict, done: DoneSet,
                 flush_bytes: int, flush_seconds: float | None) -> None:
        self._location = location
        self._manifest = manifest
        self._done = done
        self._flush_bytes = flush_bytes
        self._behind_bytes = max(BEHIND_BYTES, 2 * flush_bytes)
        self._flush_seconds = flush_seconds
        self._opened_at = time.monotonic()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        """Runs were added, written or failed, or a flush or close was asked for."""
        self._pending = PendingRuns()
        self._pending_bytes = 0
        self._oldest = 0.0
        """`time.monotonic()` when the oldest pending run was added."""
        self._writing_bytes = 0
        self._added = 0
        self._written = 0
        self._flush_upto = 0
        """`flush` wants the results added before this count written at once."""
        self._closing = False
        self._failure: Exception | None = None
        self._thread = threading.Thread(target=self._write_shards, daemon=True,
                                        name="rhmapper-checkpoint-writer")
        self._thread.start()

    @classmethod
    def open(cls, uri: str, fingerprint: dict[str, str], *, overwrite: bool = False,
             total: int | None = None, flush_bytes: int = FLUSH_BYTES,
             flush_seconds: float | None = None) -> CheckpointStore:
        """Open the checkpoint at ``uri`` for a map whose ``fingerprint`` (what makes its results
        what they are: target, constant kwargs, options) is given, creating it if there is none.

        A checkpoint of another fingerprint raises `CheckpointMismatchError` naming the first
        difference, unless ``overwrite`` is True: then its files are deleted first. ``total`` is
        the number of inputs when known, kept so that reading an unfinished checkpoint says how
        many results are missing. Reads every shard, one at a time, to know which inputs are
        done; marks the checkpoint not complete until `mark_complete`.

        Examples:
            >>> import tempfile
            >>> folder = tempfile.TemporaryDirectory(); uri = folder.name
            >>> CheckpointStore.open(uri, {"target": "f", "kwargs": "{}"}).close()
            >>> CheckpointStore.open(uri, {"target": "g", "kwargs": "{}"})
            Traceback (most recent call last):
            ...
            rhmapper.errors.CheckpointMismatchError: ... its fingerprint's 'target' is 'f' ...
            >>> CheckpointStore.open(uri, {"target": "g"}, overwrite=True).done_count
            0
        """
        _check_fingerprint(fingerprint)
        if flush_seconds is not None and not 0 < flush_seconds < math.inf:
            raise ValueError(f"flush_seconds is a number of seconds above 0, or None for 1/50 "
                             f"of the time the map has run, not {flush_seconds!r}")
        location = CheckpointLocation(uri)
        manifest = location.read_manifest(any_version=overwrite)  # overwrite: any goes
        if manifest is None:
            _check_not_foreign(location, overwrite)
        elif manifest["fingerprint"] != fingerprint and not overwrite:
            raise CheckpointMismatchError(_fingerprint_difference(
                uri, manifest["fingerprint"], fingerprint))
        if overwrite:
            location.delete()
            manifest = None
        done = done_set_of(location)
        if manifest is None:
            manifest = new_manifest(fingerprint, total)
        else:  # running again: not complete until this run says so
            manifest = {**manifest, "total": manifest.get("total") if total is None else total,
                        "complete_count": None}
            manifest.pop("completed_at", None)
        location.write_manifest(manifest)
        return cls(location, manifest, done, flush_bytes, flush_seconds)

    @property
    def uri(self) -> str:
        """Where the checkpoint is, as it was given to `open`."""
        return self._location.uri

    @property
    def done_count(self) -> int:
        """How many inputs have a result: written, or added and waiting to be."""
        return len(self._done)

    @property
    def done_end(self) -> int:
        """One past the highest input index with a result (0 when none has one)."""
        return self._done.end

    def is_done(self, index: int) -> bool:
        """Whether input ``index`` has a result (written, or added and waiting to be)."""
        return index in self._done

    def check_input(self, index: int, digest: bytes) -> None:
        """Raise `CheckpointMismatchError` if input ``index`` is done and its ``digest`` is not
        the one of the input whose result the checkpoint holds."""
        if index in self._done and self._done.digest(index) != digest:
            raise CheckpointMismatchError(
                f"input {index} differs from the input whose result checkpoint {self.uri} holds "
                f"(digest {digest.hex()}, the checkpoint's {self._done.digest(index).hex()}): "
                "to resume a map, give it the same inputs in the same order; else use another "
                "checkpoint URI, or pass overwrite=True to start afresh")

    def stretches(self, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(start, stop, done)``: inputs ``0 .. end - 1`` in stretches all with a result or all
        without (see `DoneSet.stretches`)."""
        return self._done.stretches(end)

    def check_inputs(self, items: list, start: int, stop: int) -> None:
        """`check_input` for ``items[start:stop]``, inputs that are all done: their digests made
        and compared `CHECK_STRETCH` at a time (in C for plain data)."""
        for first in range(start, stop, CHECK_STRETCH):
            part = items[first:min(first + CHECK_STRETCH, stop)]
            digests = input_digests(part, plain=plain_pickle(part) is not None)
            if digests != self._done.digests(first, first + len(part)):
                for position, item in enumerate(part):  # which one: the first that differs
                    self.check_input(first + position, input_digest(item))

    def add(self, index: int, digest: bytes, value: Any) -> None:
        """Queue the result ``value`` of input ``index`` (whose digest is ``digest``) to be
        written (see `add_run`)."""
        self.add_run([index], digest, dumps([value]))

    def add_run(self, indexes: Sequence[int], digests: bytes, values: bytes) -> None:
        """Queue the results of inputs ``indexes`` (ascending: those of one call) to be
        written: ``digests``, the inputs' digests one after another, and ``values``, the
        pickled list of their results. Waits while more than `BEHIND_BYTES` (or twice
        ``flush_bytes``, if more) of results wait to be written or are being written."""
        check_run(indexes, digests)
        if not indexes:
            return
        with self._lock:
            self._raise_failure()
            if self._closing:
                raise ValueError(f"checkpoint {self.uri} is closed: open it again to add results")
            repeated = self._done.add_many(indexes, digests)
            if repeated is not None:
                raise ValueError(f"input {repeated} has a result in checkpoint {self.uri} "
                                 "already: add each input's result once (check is_done before "
                                 "running it)")
            self._pending.add(indexes, digests, values)
            if not self._pending_bytes:
                self._oldest = time.monotonic()
                self._changed.notify_all()  # the writer now waits for this run's flush_seconds
            self._added += len(indexes)
            self._pending_bytes += len(values) + RESULT_BYTES * len(indexes)
            if self._pending_bytes >= self._flush_bytes:
                self._changed.notify_all()
            if self._pending_bytes + self._writing_bytes > self._behind_bytes:
                while (self._pending_bytes + self._writing_bytes > self._behind_bytes
                       and self._failure is None):
                    self._changed.wait()
                self._raise_failure()

    def flush(self) -> None:
        """Return once every result added so far is written."""
        with self._lock:
            self._flush_upto = self._added
            self._changed.notify_all()
            while self._written < self._flush_upto and self._failure is None:
                self._changed.wait()
            self._raise_failure()

    def mark_complete(self, count: int) -> None:
        """Record, in the manifest, that the map finished: inputs ``0 .. count - 1`` all have a
        result (written first, if some still wait)."""
        self.flush()
        if len(self._done) != count or self._done.end > count:
            raise ValueError(
                f"checkpoint {self.uri} holds {len(self._done)} results, of inputs up to "
                f"{self._done.end - 1}: not the results of inputs 0 .. {count - 1}; mark it "
                "complete once every input has its result")
        self._manifest = {**self._manifest, "complete_count": count, "completed_at":
                          datetime.datetime.now(datetime.timezone.utc).isoformat()}
        self._location.write_manifest(self._manifest)

    def close(self) -> None:
        """Write what waits and stop the writer; again, nothing. Raises `CheckpointWriteError` if
        a write failed."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        with self._lock:
            self._raise_failure()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.close()
        except CheckpointWriteError:
            if not isinstance(error, CheckpointWriteError):
                raise
            # else the same failure is on its way out already

    def _raise_failure(self) -> None:
        """Raise the writer's failure (call with the lock held)."""
        if self._failure is not None:
            raise CheckpointWriteError(
                f"writing results to checkpoint {self.uri} failed ({self._failure}): "
                f"{self._added - self._written} results were not saved; those written before "
                "stay. Once the storage is back, run the map again with the same checkpoint to "
                "compute the missing results."
            ) from self._failure

    def _write_shards(self) -> None:
        """The writer thread: write the pending runs as a shard when due, until closed or a
        write fails. Whatever else ends it is raised from the next add, flush or close too,
        rather than leaving them waiting for a writer that is gone."""
        try:
            while self._write_next_shard():
                pass
        except BaseException as error:  # noqa: B036 - handed to the threads that wait on it
            _log.exception("rhmapper: the writer of checkpoint %s stopped", self.uri)
            with self._lock:
                self._failure = error
                self._changed.notify_all()

    def _write_next_shard(self) -> bool:
        """Wait until pending runs are due and write them; False once closed with nothing left,
        or after a write failed. (The runs are freed on return, not kept while the next wait.)"""
        with self._lock:
            while not self._due():
                if self._closing and not self._pending_bytes:
                    return False
                self._changed.wait(self._oldest + self._interval() - time.monotonic()
                                   if self._pending_bytes else None)
            runs, self._pending = self._pending, PendingRuns()
            self._writing_bytes, self._pending_bytes = self._pending_bytes, 0
        count = len(runs)
        try:
            self._location.write_shard(runs)  # empties runs
        except Exception as error:  # raised from the next add, flush or close
            _log.warning("rhmapper: writing a shard of checkpoint %s failed", self.uri,
                         exc_info=True)
            with self._lock:
                self._failure = error
                self._changed.notify_all()
            return False
        with self._lock:
            self._written += count
            self._writing_bytes = 0
            self._changed.notify_all()
        return True

    def _due(self) -> bool:
        """Whether the pending runs are to be written now (call with the lock held)."""
        return self._pending_bytes > 0 and (
            self._closing or self._pending_bytes >= self._flush_bytes
            or self._flush_upto > self._written
            or time.monotonic() - self._oldest >= self._interval())

    def _interval(self) -> float:
        """How long the oldest pending run may wait: ``flush_seconds`` if given, else
        `FLUSH_SHARE` of the time open, between `FLUSH_SECONDS_MIN` and `FLUSH_SECONDS`."""
        if self._flush_seconds is not None:
            return self._flush_seconds
        share = FLUSH_SHARE * (time.monotonic() - self._opened_at)
        return min(FLUSH_SECONDS, max(FLUSH_SECONDS_MIN, share))


def done_set_of(location: CheckpointLocation) -> DoneSet:
    """The inputs that have a result in the checkpoint at ``location``, with their digests (its
    shards' indexes and digests read, not their values; an index two runs saved counts once).

    Examples:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> with CheckpointStore.open(folder.name, {"target": "f"}) as store:
        ...     store.add(4, bytes(16), "four")
        >>> done = done_set_of(CheckpointLocation(folder.name))
        >>> len(done), 4 in done
        (1, True)
    """
    done = DoneSet()
    for shard in location.shards():
        for batch in location.read_shard(shard, values=False):
            for indexes, digests in zip(batch.column(0).to_pylist(),
                                        batch.column(1).to_pylist()):
                indexes = gapless(indexes)  # a range is added in C
                if done.add_many(indexes, digests) is not None:  # two runs wrote some
                    for position, index in enumerate(indexes):
                        done.add(index, digest_at(digests, position))
    return done


def _check_fingerprint(fingerprint: dict[str, str]) -> None:
    if not isinstance(fingerprint, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in fingerprint.items()):
        raise TypeError(f"a checkpoint's fingerprint is a dict of str to str, not {fingerprint!r}")


def _check_not_foreign(location: CheckpointLocation, overwrite: bool) -> None:
    """Refuse a location with no manifest that holds files: another program's, which rhmapper
    does not touch, or shards whose manifest was deleted, which only ``overwrite`` discards."""
    names = location.names()
    foreign = [name for name in names if name != "shards"]
    if foreign:
        raise CheckpointMismatchError(
            f"{location.uri} holds files that are not a checkpoint's (such as {foreign[0]!r}) "
            "and no manifest.json: rhmapper neither writes there nor deletes them. Use a new or "
            "empty location for checkpoint=.")
    if names and not overwrite:
        raise CheckpointMismatchError(
            f"{location.uri} holds shards of results but no manifest.json, so nothing says which "
            "map wrote them: pass overwrite=True to discard them, or use another location.")


def _fingerprint_difference(uri: str, stored: dict[str, str], given: dict[str, str]) -> str:
    """The message naming the first key whose value differs between two fingerprints."""
    key = next(key for key in [*given, *stored] if stored.get(key) != given.get(key))

    def value(fingerprint: dict[str, str]) -> str:
        return repr(fingerprint[key]) if key in fingerprint else "absent"

    return (f"checkpoint {uri} was written by another map: its fingerprint's {key!r} is "
            f"{value(stored)} there and {value(given)} here. To "
            "resume it, run the same target with the same constant kwargs and options; else use "
            "another checkpoint URI, or pass overwrite=True to discard its results")
