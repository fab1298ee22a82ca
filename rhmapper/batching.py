"""Batched (vectorized) calls: a mapper whose function takes a whole batch of items
(`Batched`), and how a replica runs one call of it (`BatchedCall`), finding the items that
raise by splitting a failing batch in halves.

A replica runs a batched call as::

    items ──▶ fn(items) ──▶ a sequence of len(items) ──▶ one value per item
                 │ raises
                 ▼
        fn(first half), fn(second half), ... down to single items: each item that raises
        alone fails with its own exception; every other item gets its value

Pure Python: `rhmapper.batch_runner` drives `BatchedCall` on the replica, with or without an
event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rhmapper.checks import check_count


@dataclass(frozen=True)
class Batched:
    """Call the mapped function (or method) once per batch: it receives a list of up to
    ``max_size`` items and returns a sequence of the same length (a list, a tuple or a NumPy
    array), one value per item. For ``starmap`` and maps over several iterables it receives one
    list per argument (columns); constant ``kwargs=`` are passed as they are.

    The calls, maps and ``imap``s of all threads that have the same options (and equal
    constant ``kwargs``) share batches (see `rhmapper.lanes`): once a replica slot is free, an
    item waits at most ``max_wait_ms`` for others to fill its batch. ``rm.mapper(fn,
    batched=True)`` is ``batched=rm.Batched()``.

    Examples:
        >>> import rhmapper as rm
        >>> def norms(vectors):  # one call for the whole batch
        ...     return [sum(x * x for x in v) ** 0.5 for v in vectors]
        >>> with rm.mapper(norms, replicas=2, batched=rm.Batched(max_size=64)) as m:
        ...     m.map([(3, 4), (6, 8)])
        [5.0, 10.0]
    """

    max_size: int = 64
    """Items per call at most."""
    max_wait_ms: float = 10.0
    """How long an item waits for others to fill its batch once a replica slot is free."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_size", check_count("Batched(max_size=...)", self.max_size))
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise ValueError(f"Batched(max_wait_ms=...) must be a number of milliseconds >= 0, "
                             f"got {wait!r}")

    def size_of(self, batch_size: int | str) -> int:
        """A map's items per call: ``max_size`` for ``"auto"``, else the map's ``batch_size``,
        which may not exceed ``max_size``.

        Examples:
            >>> Batched(max_size=64).size_of("auto"), Batched(max_size=64).size_of(8)
            (64, 8)
            >>> Batched(max_size=64).size_of(100)
            Traceback (most recent call last):
            ...
            ValueError: batch_size=100 is more than the mapper's Batched(max_size=64); pass batch_size <= 64, or a larger max_size
        """
        if batch_size == "auto":
            return self.max_size
        if batch_size > self.max_size:
            raise ValueError(
                f"batch_size={batch_size} is more than the mapper's Batched(max_size="
                f"{self.max_size}); pass batch_size <= {self.max_size}, or a larger max_size")
        return int(batch_size)


def batched_of(batched: Any) -> Batched | None:
    """``rm.mapper``'s ``batched=`` argument as a `Batched` (``None``: not batched).

    Examples:
        >>> batched_of(True), batched_of(False)
        (Batched(max_size=64, max_wait_ms=10.0), None)
        >>> batched_of(64)
        Traceback (most recent call last):
        ...
        TypeError: batched must be True, False or rm.Batched(max_size=...), got 64
    """
    if isinstance(batched, Batched):
        return batched
    if batched is True:
        return Batched()
    if batched is False or batched is None:
        return None
    raise TypeError(
        f"batched must be True, False or rm.Batched(max_size=...), got {batched!r}")


class BatchedCall:
    """One batched call on a replica: which spans of the batch to call the function on next
    (`next_span`), and what each call gave (`answered`, `failed`). The whole batch first; a
    span that raises is split in halves until single items, whose exceptions are theirs. Spans
    are called left to right, so the items not yet called are always a suffix: when
    ``stop_reason(position)`` gives a reason before a span starts (its map ended, its time is
    up), the call stops there (`not_started`).

    Examples:
        >>> call = BatchedCall(4, "double_all")
        >>> call.next_span()
        (0, 4)
        >>> call.failed(0, 4, ValueError("item 2 is bad"))  # split: (0, 2) then (2, 4)
        >>> call.next_span(); call.answered(0, 2, [0, 2])
        (0, 2)
        >>> call.next_span(); call.failed(2, 4, ValueError("item 2 is bad"))
        (2, 4)
        >>> call.next_span(); call.failed(2, 3, ValueError("item 2 is bad"))
        (2, 3)
        >>> call.next_span(); call.answered(3, 4, (6,))
        (3, 4)
        >>> call.next_span() is None, call.values, call.errors, call.calls
        (True, [0, 2, None, 6], {2: ValueError('item 2 is bad')}, 5)
    """

    def __init__(self, size: int, name: str,
                 stop_reason: Callable[[int], str | None] = lambda position: None) -> None:
        self.values: list = [None] * size
        self.errors: dict[int, BaseException] = {}
        """The exception of each item that failed, by position."""
        self.calls = 0
        """How many times the function was called."""
        self.not_started: tuple[int, str] | None = None
        """Where the call stopped and why, if ``stop_reason`` stopped it."""
        self._name = name
        self._stop_reason = stop_reason
        self._spans = [(0, size)] if size else []
        """Spans still to call, the next one last."""

    def next_span(self) -> tuple[int, int] | None:
        """The span ``(start, stop)`` to call the function on next (``None``: done, or
        stopped)."""
        if not self._spans:
            return None
        start = self._spans[-1][0]
        reason = self._stop_reason(start)
        if reason is not None:
            self.not_started = (start, reason)
            self._spans.clear()
            return None
        self.calls += 1
        return self._spans.pop()

    def answered(self, start: int, stop: int, result: Any) -> None:
        """The function returned ``result`` for the items of ``start:stop``. A result that is
        not a sequence of one value per item fails every item of the span (the function is
        wrong for every batch: splitting would not help)."""
        size = stop - start
        problem = None
        if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
            problem = f"returned {type(result).__name__}, not a sequence"
        elif len(result) != size:
            problem = f"returned {len(result)} values"
        if problem is None:
            self.values[start:stop] = list(result)
            return
        error = ValueError(
            f"the batched function {self._name} got a batch of {size} items and {problem}; "
            "a batched function returns one value per item (a list, tuple or NumPy array of "
            "the batch's length)")
        for position in range(start, stop):
            self.errors[position] = error

    def failed(self, start: int, stop: int, error: BaseException) -> None:
        """The function raised ``error`` for the items of ``start:stop``: a single item fails
        with it, a larger span is called again in halves."""
        if stop - start == 1:
            self.errors[start] = error
            return
        middle = (start + stop) // 2
        self._spans += [(middle, stop), (start, middle)]
