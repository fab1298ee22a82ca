"""What travels between the scheduler and a replica: what a call runs, its reply, an item's
failure, a replica's death, and the per-item packing that lets one bad value cost one item.
Pure Python: no Ray.

A replica packs each value of a call separately (`pack_values`), so a value that cannot be pickled
fails its own item there, and a value the driver cannot unpickle (its class exists only in the
replica's ``py_modules`` or ``reqs``) fails its own item on the driver (`BatchReply.unpacked`).
Plain values (numbers, strings, bytes, ``None``) travel as they are, at no cost.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

_PLAIN_TYPES = frozenset({int, float, complex, bool, str, bytes, type(None)})
_RAY_HANDLE_MARKERS = (b"ObjectRef", b"ActorHandle", b"ray._raylet")
"""Values whose pickle names these hold Ray references, which only Ray's own serializer keeps
alive across processes: they travel unpacked (see `RawValue`)."""


@dataclass(frozen=True)
class CallSpec:
    """What every call of one map runs: the method or function, the item shape, the constants.

    ``kwargs`` are the constant keyword arguments as the replicas receive them (references to
    values put once per map); ``is_async`` says the target is an ``async def``.

    Examples:
        >>> CallSpec("predict", star=True).is_async
        False
    """

    method: str
    star: bool = False
    kwargs: dict | None = None
    is_async: bool = False
    end_signal: Any = None
    """What tells the replicas the map has ended (opaque here; see ``rhmapper.signals``)."""


class ReplicaDied(Exception):
    """Raised by `Pool.fetch` when the replica behind a call died before answering.

    ``permanent`` is False when the replica may come back (it is restarting, or unreachable for
    a while): its calls are run again, and the replica stays in the pool. ``blames_items`` is
    False when the replica went down with its whole cluster: its calls' items are run again
    without counting a crash against them.

    Examples:
        >>> ReplicaDied("restarting", permanent=False).permanent
        False
        >>> ReplicaDied("cluster lost", blames_items=False).blames_items
        False
    """

    def __init__(self, message: str, permanent: bool = True, blames_items: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.blames_items = blames_items


def dumps(value: Any) -> bytes:
    """Pickle ``value``: the fast C pickler, else cloudpickle (lambdas, classes made at run time).

    Examples:
        >>> pickle.loads(dumps(lambda: 3))()
        3
    """
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # by reference failed (a lambda, a class made at run time): by value
        return cloudpickle.dumps(value, protocol=5)


@dataclass
class RemoteFailure:
    """An exception raised by the user's code for one item, with its remote traceback.

    The exception travels pickled, and `error` rebuilds it where it is read: ``None`` when it
    could not be pickled in the replica or rebuilt here (`rebuild_problem` says why).

    Examples:
        >>> failure = RemoteFailure.capture(ValueError("bad"))
        >>> type(failure.error).__name__, failure.type_name
        ('ValueError', 'ValueError')
    """

    type_name: str
    message: str
    remote_traceback: str
    error_blob: bytes | None = None
    rebuild_problem: str | None = None
    _rebuilt: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def capture(cls, error: BaseException) -> "RemoteFailure":
        """Capture ``error`` (inside an ``except`` block, to keep its traceback).

        Examples:
            >>> RemoteFailure.capture(KeyError("k")).message
            "'k'"
        """
        try:
            blob, problem = dumps(error), None
        except Exception as cause:  # any pickling failure means: send the text only
            blob, problem = None, f"pickled in the replica ({cause})"
        return cls(type(error).__qualname__, str(error),
                   "".join(traceback.format_exception(error)), blob, problem)

    @classmethod
    def of(cls, error: BaseException, remote_traceback: str) -> "RemoteFailure":
        """A failure whose exception was already rebuilt here (Ray's own reply of a direct call).

        Examples:
            >>> RemoteFailure.of(KeyError("k"), "Traceback ...").error
            KeyError('k')
        """
        return cls(type(error).__qualname__, str(error), remote_traceback, _rebuilt=[error])

    @property
    def error(self) -> BaseException | None:
        """The exception itself, rebuilt once (the same object on every read)."""
        if not self._rebuilt:
            self._rebuilt.append(self._rebuild())
        return self._rebuilt[0]

    def _rebuild(self) -> BaseException | None:
        if self.error_blob is None:
            return None
        try:
            return pickle.loads(self.error_blob)
        except Exception as cause:  # e.g. its class is not importable here
            self.rebuild_problem = f"rebuilt on the driver ({type(cause).__name__}: {cause})"
            return None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rebuilt": []}


@dataclass(frozen=True)
class RawValue:
    """A value that holds Ray references: it travels as it is, for Ray to serialize.

    Examples:
        >>> RawValue([1]).value
        [1]
    """

    value: Any


@dataclass
class BatchReply:
    """What one call returns: a value per item, the failures by position, and the run time
    (``None`` when unknown).

    ``packed`` says the values are per-item pickles (see `pack_values`); `unpacked` turns them
    back. ``not_started`` is the position from which the replica started no more items, and why
    (``"cancelled"``: the map ended; ``"timeout"``: past the call's deadline).

    Examples:
        >>> reply = BatchReply(values=[2, None], failures={1: None}, seconds=0.1)
        >>> len(reply.values)
        2
    """

    values: list
    failures: dict[int, RemoteFailure] | None
    seconds: float | None
    packed: bool = False
    not_started: tuple[int, str] | None = None

    def to_wire(self) -> list:
        """This reply as a plain list, which Ray packs without pickling a class (see
        `from_wire`)."""
        return [self.values, self.failures, self.seconds, self.packed, self.not_started]

    @classmethod
    def from_wire(cls, fields: list) -> "BatchReply":
        """The reply `to_wire` made.

        Examples:
            >>> BatchReply.from_wire(BatchReply([1], None, 0.5).to_wire()).seconds
            0.5
        """
        values, failures, seconds, packed, not_started = fields
        return cls(values, failures, seconds, packed, not_started and tuple(not_started))

    def unpacked(self) -> "BatchReply":
        """This reply with its values unpickled; a value that cannot be unpickled here fails
        its own item.

        Examples:
            >>> values, failures, packed = pack_values([(1, 2)], {})
            >>> BatchReply(values, failures, None, packed).unpacked().values
            [(1, 2)]
        """
        if not self.packed:
            return self
        failures = dict(self.failures or {})
        values = [_unpack(position, value, failures) for position, value in enumerate(self.values)]
        return BatchReply(values, failures or None, self.seconds, False, self.not_started)


def _unpack(position: int, value: Any, failures: dict[int, RemoteFailure]) -> Any:
    if isinstance(value, RawValue):
        return value.value
    if value is None or position in failures:
        return None
    try:
        return pickle.loads(value)
    except Exception as cause:  # its class exists only where the replica runs
        failures[position] = RemoteFailure(
            "UnreadableResult",
            f"the item's result could not be unpickled on the driver ({type(cause).__name__}: "
            f"{cause}). Its class is probably importable only in the replicas (py_modules, "
            "reqs): install it where the mapper runs, or return plain data.",
            "")
        return None


def pack_values(values: list, failures: dict[int, RemoteFailure]) -> tuple[list, dict, bool]:
    """Values ready to travel: as they are when all are plain, else one pickle per value. A
    value that cannot be pickled becomes its item's failure (in ``failures``).

    Returns ``(values, failures, packed)``.

    Examples:
        >>> import threading
        >>> values, failures, packed = pack_values([1, threading.Lock()], {})
        >>> packed, values[1], failures[1].type_name
        (True, None, 'TypeError')
    """
    if _PLAIN_TYPES.issuperset(map(type, values)):
        return values, failures, False
    packed: list = []
    for position, value in enumerate(values):
        if position in failures:
            packed.append(None)
            continue
        try:
            blob = dumps(value)
        except Exception as cause:  # this item's result cannot travel: its own failure
            failures[position] = RemoteFailure.capture(TypeError(
                f"the item's result ({type(value).__qualname__}) cannot be pickled to send it "
                f"back: {cause}. Return picklable values."))
            packed.append(None)
            continue
        packed.append(RawValue(value) if any(marker in blob for marker in _RAY_HANDLE_MARKERS)
                      else blob)
    return packed, failures, True
