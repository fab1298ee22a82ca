"""Digests of a map's inputs: how a checkpoint tells that an input is the one whose result it holds.

A digest is the 16-byte BLAKE2b hash of the input's *stable pickle*: its pickle by protocol 4
(protocol 5 pickles a buffer, such as a numpy array's data, one way if it is read-only and
another if not, and an array a replica receives is a read-only view of the driver's), with every
class and function written by its module and name, never by value, and a bytearray its object
reduces to (a writable Arrow buffer's) written as bytes. Plain data pickles as
``pickle.dumps(value, protocol=4)`` pickles it; an instance of a class defined in the driver's
``__main__`` or inside a function pickles the same in the driver and in a replica that received
it by value (cloudpickle's pickle of such a class holds an id drawn in each process). So the
replicas of a checkpointed map digest the inputs of their calls, off the driver, and a rerun's
driver, digesting the inputs it skips, gets the same digests.

The limit: an object whose pickle is not the same in every process looks changed. A ``set`` or
``frozenset`` of ``str`` (or of objects hashed from strings) is pickled in hash order, which
differs between processes under hash randomisation (``PYTHONHASHSEED``); so does an object whose
``__reduce__`` returns such a set, or a process-specific value (an id, a time, an ``ObjectRef``).
Pass such inputs as sorted lists or tuples, or set ``PYTHONHASHSEED`` to a fixed value in every
run. Two classes of one name in one module (made in two functions, say) are not told apart, nor
two functions of the same name and bytecode that differ only in their constants or closure.
"""

from __future__ import annotations

import copyreg
import functools
import hashlib
import io
import operator
import pickle
import types
from typing import Any

import cloudpickle

DIGEST_SIZE = 16
"""Bytes in a digest."""
_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})
"""Types whose stable pickle is their plain pickle, made without a pickler object."""
PROTOCOL = 4
"""The pickle protocol of stable pickles (see the module docstring)."""
_plain_dumps = functools.partial(pickle.dumps, protocol=PROTOCOL)
_hasher = functools.partial(hashlib.blake2b, digest_size=DIGEST_SIZE)
_digest_of = operator.methodcaller("digest")


class _StablePickler(pickle.Pickler):
    """The C pickler writing classes (but builtins, which pickle by name anyway) and functions
    by name (see the module docstring). It is asked about every object but ``None``, booleans
    and exact ints, floats, strings, bytes, lists, tuples, dicts, sets and frozensets, so plain
    data costs nothing more."""

    def reducer_override(self, obj: Any) -> Any:
        # By __name__: cloudpickle gives a class it rebuilds its __name__ as its __qualname__.
        # A new string each time: whether two names are one object (and so pickled once) is not
        # the same in a process that rebuilt the class or function.
        if isinstance(obj, type):
            if obj.__module__ == "builtins":  # as plain pickle names it (a bytearray's class)
                return NotImplemented
            return getattr, (f"{obj.__module__}:{obj.__name__}",)
        if isinstance(obj, types.FunctionType):
            return getattr, (f"{obj.__module__}:{obj.__name__}:{obj.__code__.co_code.hex()}",)
        if isinstance(obj, types.ModuleType):
            return getattr, (f"module:{obj.__name__}",)
        reducer = copyreg.dispatch_table.get(type(obj))  # a compiled pattern's, say
        reduced = obj.__reduce_ex__(PROTOCOL) if reducer is None else reducer(obj)
        if type(reduced) is not tuple:  # a global's name
            return NotImplemented
        if bytearray in map(type, reduced[1]):
            # A buffer (an Arrow one, say) reduces to a bytearray when writable, to bytes when
            # not, and what a replica receives is read-only.
            arguments = tuple(bytes(arg) if type(arg) is bytearray else arg for arg in reduced[1])
            return (reduced[0], arguments, *reduced[2:])
        return reduced


def stable_pickle(value: Any) -> bytes:
    """``value``'s stable pickle (see the module docstring): only digested, never unpickled.
    What even that cannot pickle (a lock, say) is pickled by cloudpickle, which raises if it
    cannot either.

    Examples:
        >>> plain = [1, "a", (2.5, None), bytearray(b"xy")]
        >>> stable_pickle(plain) == pickle.dumps(plain, protocol=4)
        True
        >>> def local(): pass
        >>> b"local" in stable_pickle(local)
        True
    """
    buffer = io.BytesIO()
    try:
        _StablePickler(buffer, protocol=PROTOCOL).dump(value)
    except (pickle.PicklingError, TypeError, AttributeError):
        return cloudpickle.dumps(value, protocol=PROTOCOL)
    return buffer.getvalue()


def input_digest(item: Any) -> bytes:
    """The 16-byte digest of one input: equal for equal stable pickles, in any process.

    Examples:
        >>> input_digest(("a", 1)) == input_digest(("a", 1))
        True
        >>> input_digest(("a", 1)) == input_digest(("a", 2))
        False
        >>> len(input_digest(lambda x: x))
        16
    """
    pickled = _plain_dumps(item) if type(item) in _SCALARS else stable_pickle(item)
    return _hasher(pickled).digest()


def digest_at(digests: bytes, position: int) -> bytes:
    """The digest at ``position`` of ``digests``, digests one after another.

    Examples:
        >>> digest_at(input_digests(["a", "b"]), 1) == input_digest("b")
        True
    """
    return digests[position * DIGEST_SIZE:(position + 1) * DIGEST_SIZE]


def input_digests(items: list, plain: bool = False) -> bytes:
    """The digests of ``items``, one after another (`DIGEST_SIZE` bytes each); ``plain`` says
    the items are known to be plain data (``rhmapper.wire.plain_pickle``), whose stable pickle is
    their plain one: then no Python code runs per item.

    Examples:
        >>> digests = input_digests([("a", 1), "b"])
        >>> len(digests), digests[16:] == input_digest("b")
        (32, True)
        >>> input_digests([("a", 1), "b"], plain=True) == digests
        True
    """
    if plain:
        return b"".join(map(_digest_of, map(_hasher, map(_plain_dumps, items))))
    return b"".join(map(input_digest, items))
