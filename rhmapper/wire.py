"""What travels between the scheduler and a replica: what a call runs, the request one call
carries (`CallRequest`, with its `Guard`), its reply, an item's failure, a replica's death, and
the per-item packing that lets one bad value cost one item. Pure Python: no Ray.

A replica packs each value of a call separately (`pack_values`), so a value that cannot be pickled
fails its own item there, and a value the driver cannot unpickle (its class exists only in the
replica's ``py_modules`` or ``reqs``) fails its own item on the driver (`BatchReply.unpacked`).
Plain data (numbers, strings, bytes, ``None`` in lists, tuples, dicts and sets) travels in one
C pickle (`plain_pickle`), items and values alike: no per-item scan on either side.
"""

from __future__ import annotations

import functools
import io
import operator
import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle

WHOLE = "whole"
"""`BatchReply.packed` when the values travel in one pickle."""
_RAY_HANDLE_MARKERS = (b"ObjectRef", b"ActorHandle", b"ray._raylet")
"""Names that the pickle of a Ray reference holds: a pickle without any of them holds no Ray
reference (the cheap test). One with them may (or it merely holds the text, as
``("ObjectRef", 1)`` does): the objects met while pickling the value again decide
(`_holds_reference`)."""


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
    batched: bool = False
    """The target takes a whole batch (see ``rhmapper.batching``)."""
    digests: bool = False
    """The replicas send back the digests of each call's inputs (a checkpointed map's; see
    ``rhmapper.digests``)."""


@dataclass(slots=True)
class Guard:
    """When a replica starts no more items of a call (see `rhmapper.batch_runner.CallGuard`).

    ``board`` and ``key`` are the map's end signal (the board actor's name and the map's key,
    see ``rhmapper.signals``; ``None`` and ``None`` for none); ``deadline`` is a wall-clock
    deadline in seconds since the epoch (``None``: none); ``sent_at`` is when the driver sent
    the call (``None``: it had no call ahead of it on the replica, so it waited in no queue).

    Examples:
        >>> Guard(None, None, deadline=12.5, sent_at=2.0).deadline
        12.5
    """

    board: str | None
    key: Any
    deadline: float | None = None
    sent_at: float | None = None


@dataclass(slots=True)
class CallRequest:
    """What one call asks of a replica: its method (``"fn"`` for a function replica), its
    items, whether each item is a tuple of positional arguments (else the single argument), the
    map's constant keyword arguments (each name's ``ObjectRef``, see `CallSpec`), its
    `Guard` (``None``: the replica runs every item), whether the target takes the whole
    batch in one call (``batched``, see ``rhmapper.batching``) and whether the reply carries
    the items' digests (``digests``, see `BatchReply`).

    It travels as `to_wire`'s list of plain values, which Ray packs without pickling a class
    (items of plain data in one C pickle, other items as Ray serializes them), in one argument because Ray
    serialises each argument of a call separately; the replica reads it with `from_wire`. It is
    built for every call: a plain slotted dataclass, several times cheaper to make than a frozen
    one, treated as a value all the same (`sent_now` makes a new one).

    Examples:
        >>> request = CallRequest("fn", [1, 2], guard=Guard("board", "map-1", 30.0, 10.0))
        >>> wire = request.to_wire()
        >>> wire[0], wire[2:]
        ('fn', [False, None, ['board', 'map-1', 30.0, 10.0], False, False])
        >>> CallRequest.from_wire(wire) == request
        True
        >>> CallRequest.from_wire(["fn", [(1, 2)], True, None, None, False, False]).star
        True
    """

    method: str
    items: list
    star: bool = False
    kwargs: dict | None = None
    guard: Guard | None = None
    batched: bool = False
    digests: bool = False
    plain: bool = field(default=False, compare=False)
    """Whether the items are known to be plain data, holding no ``ObjectRef`` (they came as a
    `plain_pickle`)."""

    def to_wire(self) -> list:
        """This request as ``[method, items, star, kwargs, guard, batched, digests]``, the guard as
        ``[board, key, deadline, sent_at]`` or ``None`` (see `from_wire`). Items of plain data
        travel as their `plain_pickle` (so the replica knows, without looking at each, that they
        hold no ``ObjectRef``); other items as they are, for Ray to serialize.

        Examples:
            >>> CallRequest("warm_up", [("a", 1)], star=True).to_wire()[2:]
            [True, None, None, False, False]
            >>> type(CallRequest("fn", [("a", 1)]).to_wire()[1]), CallRequest("fn", [len]).to_wire()[1]
            (<class 'bytes'>, [<built-in function len>])
        """
        guard = self.guard
        items = plain_pickle(self.items)
        return [self.method, self.items if items is None else items, self.star, self.kwargs,
                None if guard is None else [guard.board, guard.key, guard.deadline, guard.sent_at],
                self.batched, self.digests]

    @classmethod
    def from_wire(cls, wire: list | tuple) -> "CallRequest":
        """The request `to_wire` made.

        Examples:
            >>> CallRequest.from_wire(["fn", [3], False, None, [None, None, None, 1.5], False,
            ...                        False]).guard
            Guard(board=None, key=None, deadline=None, sent_at=1.5)
        """
        method, items, star, kwargs, guard, batched, digests = wire
        plain = isinstance(items, bytes)
        if plain:
            items = pickle.loads(items)
        return cls(method, items, star, kwargs, None if guard is None else Guard(*guard), batched,
                   digests, plain)

    def sent_now(self, now: float) -> "CallRequest":
        """This request as sent at ``now`` (``time.time()``) rather than when the driver made it:
        its guard's deadline moves on by as long as the call waited in the driver. A compiled
        graph's thread sends a call only once the graph is compiled, and compiling counts against
        no call's ``timeout=`` (see ``rhmapper.compiled``). When it was sent stays as it is: a
        call that waited in the driver behind its replica's running call asks, before it starts,
        whether its map ended meanwhile (see `rhmapper.batch_runner.CallGuard`), as a call
        queued in the actor does.

        Examples:
            >>> request = CallRequest("fn", [1], guard=Guard(None, None, 10.0, 4.0))
            >>> request.sent_now(5.5).guard
            Guard(board=None, key=None, deadline=11.5, sent_at=4.0)
            >>> CallRequest("fn", [1]).sent_now(5.5).guard is None
            True
        """
        guard = self.guard
        if guard is None or guard.deadline is None or guard.sent_at is None:
            return self
        deadline = guard.deadline + max(0.0, now - guard.sent_at)
        return CallRequest(self.method, self.items, self.star, self.kwargs,
                           Guard(guard.board, guard.key, deadline, guard.sent_at), self.batched,
                           self.digests, self.plain)


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


_by_value: Any = cloudpickle
"""The pickler of what the C pickler cannot pickle by reference (see `use_by_value_pickler`)."""


def use_by_value_pickler(pickler: Any) -> Any:
    """Pickle by value with ``pickler`` (a copy of cloudpickle: a module with its ``dumps``) in
    this process from now on; return the one used until now.

    cloudpickle keeps the identity of a class it pickles by value (one defined in the driver's
    ``__main__``, say) through a registry of its own: the class travels with an id, and the copy
    that unpickles it gives back the class it already holds under that id. Ray serializes with
    its own copy of cloudpickle, so the Ray edge hands that copy here (`rhmapper.batch_runner`
    does, on import): an exception or value sent back from a replica is then an instance of the
    driver's own class, not of a class of the same name. Without Ray, this is the
    ``cloudpickle`` package.

    Examples:
        >>> import cloudpickle
        >>> previous = use_by_value_pickler(cloudpickle)
        >>> pickle.loads(dumps(lambda: 3))()
        3
        >>> use_by_value_pickler(previous) is cloudpickle
        True
    """
    global _by_value
    previous, _by_value = _by_value, pickler
    return previous


def dumps(value: Any) -> bytes:
    """Pickle ``value``: the fast C pickler, else by value (lambdas, classes of ``__main__`` or
    made at run time) with the pickler of `use_by_value_pickler`.

    Examples:
        >>> pickle.loads(dumps(lambda: 3))()
        3
    """
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # by reference failed (a lambda, a class made at run time): by value
        return _by_value.dumps(value, protocol=5)


class _NotPlain(Exception):
    """Raised by `_PlainPickler` at the first object that is not plain data."""


class _PlainPickler(pickle.Pickler):
    """The C pickler, stopped by the first object it cannot write by itself: it asks
    ``reducer_override`` about every object but ``None``, booleans and exact ints, floats,
    strings, bytes, bytearrays, lists, tuples, dicts, sets and frozensets."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain


def plain_pickle(value: Any) -> bytes | None:
    """The pickle of ``value`` if it is plain data (see `_PlainPickler`), made in C in one
    pass; ``None`` at once at the first object that is not. A plain pickle holds no class, so
    it unpickles anywhere, and no Ray reference.

    Examples:
        >>> pickle.loads(plain_pickle([1, "a", (2.5, None), {"k": b"v"}]))
        [1, 'a', (2.5, None), {'k': b'v'}]
        >>> plain_pickle([1, 2, 3j]) is None  # a complex number is an object of a class
        True
    """
    buffer = io.BytesIO()
    try:
        _PlainPickler(buffer, protocol=5).dump(value)
    except (_NotPlain, RecursionError):  # RecursionError: too deep for the C pickler
        return None
    return buffer.getvalue()


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

    ``packed`` says how the values travel (see `pack_values`): ``False`` as they are, ``True``
    one pickle per value, `WHOLE` all in one pickle (``values`` is ``[count, blob]``);
    `unpacked` turns them back, keeping that one pickle as ``values_pickle`` (a checkpoint saves
    it as it is). ``not_started`` is the position from which the replica started no more items, and
    why (``"cancelled"``: the map ended; ``"timeout"``: past the call's deadline). ``digests``
    are the digests of the call's items, one after another, when the request asked for them
    (``rhmapper.digests.input_digests``).

    Examples:
        >>> reply = BatchReply(values=[2, None], failures={1: None}, seconds=0.1)
        >>> len(reply.values)
        2
    """

    values: list
    failures: dict[int, RemoteFailure] | None
    seconds: float | None
    packed: bool | str = False
    not_started: tuple[int, str] | None = None
    digests: bytes | None = None
    values_pickle: bytes | None = field(default=None, compare=False)

    def to_wire(self) -> list:
        """This reply as a plain list, which Ray packs without pickling a class (see
        `from_wire`)."""
        return [self.values, self.failures, self.seconds, self.packed, self.not_started,
                self.digests]

    @classmethod
    def from_wire(cls, fields: list) -> "BatchReply":
        """The reply `to_wire` made.

        Examples:
            >>> BatchReply.from_wire(BatchReply([1], None, 0.5).to_wire()).seconds
            0.5
        """
        values, failures, seconds, packed, not_started, digests = fields
        return cls(values, failures, seconds, packed, not_started and tuple(not_started), digests)

    def unpacked(self) -> "BatchReply":
        """This reply with its values unpickled; a value that cannot be unpickled here fails
        its own item.

        Examples:
            >>> values, failures, packed = pack_values([(1, 2)], {}, lambda obj: False)
            >>> BatchReply(values, failures, None, packed).unpacked().values
            [(1, 2)]
        """
        if not self.packed:
            return self
        failures = dict(self.failures or {})
        values_pickle = None
        if self.packed == WHOLE:
            count, values_pickle = self.values
            unreadable: dict[int, RemoteFailure] = {}
            values = _unpack(0, values_pickle, unreadable)
            if values is None:  # every value is of the one type that could not be unpickled
                values, values_pickle = [None] * count, None
                failures = {**dict.fromkeys(range(count), unreadable[0]), **failures}
        else:
            values = [_unpack(position, value, failures)
                      for position, value in enumerate(self.values)]
        return BatchReply(values, failures or None, self.seconds, False, self.not_started,
                          self.digests, values_pickle)


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


def types_of(values: list) -> set[type]:
    """The types of ``values``, in one pass in C (a cheaper one when all share the first's type,
    the usual case).

    Examples:
        >>> sorted(kind.__name__ for kind in types_of([1, 2, "x"]))
        ['int', 'str']
    """
    if values:
        first = type(values[0])
        if operator.countOf(map(type, values), first) == len(values):
            return {first}
    return set(map(type, values))


def pack_values(values: list, failures: dict[int, RemoteFailure],
                is_reference: Callable[[Any], bool]) -> tuple[list, dict, bool | str]:
    """Values ready to travel, all in one pickle (``packed`` is `WHOLE`) when they are plain
    data (`plain_pickle`) or all of one type and can be pickled; else one pickle per value. A
    value that cannot be pickled becomes its item's failure (in ``failures``).

    A value that holds a Ray reference (an object for which ``is_reference`` is true, met while
    pickling the value: the Ray edge passes the test for an ``ObjectRef`` or actor handle)
    travels as it is, a `RawValue`, for Ray's serializer, which keeps the references alive.

    Returns ``(values, failures, packed)``.

    Examples:
        >>> import threading
        >>> values, failures, packed = pack_values([1, threading.Lock()], {}, lambda obj: False)
        >>> packed, values[1], failures[1].type_name
        (True, None, 'TypeError')
        >>> class ObjectRef:  # stands for Ray's here
        ...     pass
        >>> values, _, _ = pack_values([("ObjectRef", 1), [ObjectRef()]], {},
        ...                            lambda obj: isinstance(obj, ObjectRef))
        >>> pickle.loads(values[0]), type(values[1]).__name__
        (('ObjectRef', 1), 'RawValue')
        >>> pack_values([1, "a", None], {2: None}, lambda obj: False)[2]
        'whole'
    """
    blob = plain_pickle(values)
    if blob is not None:
        return [len(values), blob], failures, WHOLE
    if len(types_of(values)) == 1 and not failures:  # all of one type: one pickle, unless one fails alone
        try:
            blob = dumps(values)
        except Exception:  # a value that cannot be pickled: the loop below names it
            blob = None
        if blob is not None and not any(marker in blob for marker in _RAY_HANDLE_MARKERS):
            return [len(values), blob], failures, WHOLE
    packed: list = []
    for position, value in enumerate(values):
        if position in failures:
            packed.append(None)
            continue
        try:
            blob = dumps(value)
            raw = (any(marker in blob for marker in _RAY_HANDLE_MARKERS)
                   and _holds_reference(value, is_reference))
        except Exception as cause:  # this item's result cannot travel: its own failure
            failures[position] = RemoteFailure.capture(TypeError(
                f"the item's result ({type(value).__qualname__}) cannot be pickled to send it "
                f"back: {cause}. Return picklable values."))
            packed.append(None)
            continue
        packed.append(RawValue(value) if raw else blob)
    return packed, failures, True


class _ReferenceMet(Exception):
    """Raised by the pickler of `_holds_reference` at the first reference it meets."""


class _Discard:
    """A file that keeps nothing written to it."""

    def write(self, data: bytes) -> int:
        return len(data)


@functools.lru_cache(maxsize=None)
def _reference_spotter(pickler: type) -> type:
    """A subclass of the by-value ``pickler`` (cloudpickle's) that raises `_ReferenceMet` when
    it meets an object its ``is_reference`` test is true of; it sees each object it pickles
    before reducing it (``reducer_override``), however deep the object is."""

    class ReferenceSpotter(pickler):  # type: ignore[misc, valid-type]
        def __init__(self, is_reference: Callable[[Any], bool]) -> None:
            super().__init__(_Discard(), protocol=5)
            self.is_reference = is_reference

        def reducer_override(self, obj: Any) -> Any:
            if self.is_reference(obj):
                raise _ReferenceMet
            return super().reducer_override(obj)

    return ReferenceSpotter


def _holds_reference(value: Any, is_reference: Callable[[Any], bool]) -> bool:
    """Whether pickling ``value`` meets an object ``is_reference`` is true of: pickled again by
    value (meeting every object `dumps` met), the output discarded, stopped at the first one
    (so a Ray reference is not pickled once more)."""
    try:
        _reference_spotter(_by_value.Pickler)(is_reference).dump(value)
    except _ReferenceMet:
        return True
    return False
