"""How many bytes an input item takes on the wire, estimated cheaply. Pure Python: no Ray.

Plain items (numbers, strings, bytes, numeric arrays, short tuples and lists of them) are sized
from their lengths. Any other item (an object or dataclass holding its payload in attributes, a
dict, a long list) is sized by what it pickles to: `mean_item_bytes` pickles a few sampled items
of a batch into a byte counter (protocol 5, so an array's buffer is counted, not copied).
"""

from __future__ import annotations

import functools
import pickle
import sys
from typing import Any

_SAMPLES = 16
"""A batch's size in bytes is estimated from at most this many of its items."""
_PICKLED_SAMPLES = 4
"""Of those, at most this many items that are not plain are pickled to measure them."""
_SHORT = 16
"""A tuple or list of at most this many plain elements is plain itself."""
_RAY_HANDLES = frozenset({"ObjectRef", "ObjectRefGenerator", "ActorHandle"})
"""Ray's types that are never pickled to be sized (see `_is_ray_handle`)."""
_RAY_STAND_IN = (bytes, (bytes(100),))
"""What a Ray handle is sized as: about what Ray sends for one (its id and owner's address)."""


def approx_bytes(item: Any) -> int:
    """About how many bytes ``item`` pickles to, without pickling it: exact for bytes-like
    objects, strings and arrays (anything with ``nbytes``), summed one level into tuples, lists
    and dicts and into an object's attributes (``__dict__`` or ``__slots__``), and the object's
    own size otherwise.

    Looking into attributes costs one step per attribute, so an object holding a large array
    (``Sample(image=array)``) is as large as its array; what lies deeper is not seen here.

    Examples:
        >>> approx_bytes(b"x" * 1000), approx_bytes(("ab", b"cd"))
        (1000, 20)
        >>> class Sample:
        ...     def __init__(self, image):
        ...         self.image = image
        >>> approx_bytes(Sample(b"x" * 2**20)) >= 2**20
        True
    """
    size = _leaf_bytes(item)
    if size is not None:
        return size
    if isinstance(item, (tuple, list)):
        return 8 * len(item) + sum(_shallow_bytes(element) for element in item)
    if isinstance(item, dict):
        return 16 * len(item) + sum(_shallow_bytes(value) for value in item.values())
    return sys.getsizeof(item) + sum(_shallow_bytes(value) for value in _attribute_values(item))


def mean_item_bytes(items: list) -> float:
    """The mean size in bytes of ``items``, from at most 16 evenly spread samples: plain items
    by `approx_bytes`, others by what they pickle to (at most 4 of them are pickled; an item
    that cannot be pickled keeps its `approx_bytes`).

    Examples:
        >>> mean_item_bytes([b"x" * 10, b"y" * 30])
        20.0
        >>> import pickle
        >>> record = {"id": 1, "text": "t" * 5000}
        >>> mean_item_bytes([record]) == len(pickle.dumps(record, protocol=5))
        True
    """
    step = max(1, len(items) // _SAMPLES)
    sample = items[::step][:_SAMPLES]
    total = 0
    others = []
    for item in sample:
        size = _plain_bytes(item)
        if size is None:
            others.append(item)
        else:
            total += size
    if others:
        measured = others[::max(1, len(others) // _PICKLED_SAMPLES)][:_PICKLED_SAMPLES]
        sizes = [_pickled_bytes(item) for item in measured]
        sizes = [approx_bytes(item) if size is None else size
                 for item, size in zip(measured, sizes)]
        return (total + len(others) * sum(sizes) / len(sizes)) / len(sample)
    return total / len(sample)


def _leaf_bytes(item: Any) -> int | None:
    """The size of a number, string, bytes-like object or array of numbers; else ``None``."""
    if isinstance(item, (bytes, bytearray, str)):
        return len(item)
    if item is None or isinstance(item, (int, float, complex)):
        return sys.getsizeof(item)
    # On the type, so that an object's __getattr__ is never asked; an array of Python objects
    # (numpy dtype=object) holds pointers, not its payload.
    if getattr(type(item), "nbytes", None) is not None:
        nbytes = item.nbytes
        dtype = getattr(item, "dtype", None)
        if isinstance(nbytes, int) and not getattr(dtype, "hasobject", False):
            return nbytes
    return None


def _shallow_bytes(item: Any) -> int:
    size = _leaf_bytes(item)
    return sys.getsizeof(item) if size is None else size


def _plain_bytes(item: Any) -> int | None:
    """`approx_bytes` of an item that needs no pickling to be sized (a leaf, or a short tuple
    or list of leaves); else ``None``."""
    size = _leaf_bytes(item)
    if size is not None or not isinstance(item, (tuple, list)) or len(item) > _SHORT:
        return size
    total = 8 * len(item)
    for element in item:
        size = _leaf_bytes(element)
        if size is None:
            return None
        total += size
    return total


def _attribute_values(item: Any) -> list:
    """The values of an object's instance attributes (``__dict__`` and ``__slots__``), read
    without calling its ``__getattr__``."""
    values: list = []
    try:
        state = object.__getattribute__(item, "__dict__")
    except AttributeError:  # no __dict__: slots only, or a builtin object
        state = None
    if isinstance(state, dict):
        values.extend(state.values())
    for cls in type(item).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                values.append(object.__getattribute__(item, name))
            except AttributeError:  # a slot never set
                continue
    return values


class _ByteCounter:
    """A file that keeps only how many bytes were written to it, and how many went out of band
    (protocol 5 buffers, such as an array's data: counted, not copied)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size

    def buffer(self, buffer: pickle.PickleBuffer) -> bool:
        self.count += memoryview(buffer).nbytes
        return False  # out of band: the pickler does not copy it


def _is_ray_handle(obj: Any) -> bool:
    """Whether ``obj`` is an ``ObjectRef`` or actor handle (told by its type's module and name,
    with no Ray import). Pickling one outside Ray's serialiser pins its object for the life of
    the process, so it is sized as a stand-in instead."""
    kind = type(obj)
    if not kind.__module__.startswith("ray"):
        return False
    return any(cls.__name__ in _RAY_HANDLES and cls.__module__.split(".")[0] == "ray"
               for cls in kind.__mro__)


class _SizePickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        return _RAY_STAND_IN if _is_ray_handle(obj) else NotImplemented


@functools.cache
def _cloud_size_pickler() -> type:
    """A cloudpickle pickler sized like `_SizePickler`, for what plain pickle refuses (local
    classes, lambdas); imported on first use."""
    import cloudpickle

    class _CloudSizePickler(cloudpickle.CloudPickler):
        def reducer_override(self, obj: Any) -> Any:
            return _RAY_STAND_IN if _is_ray_handle(obj) else super().reducer_override(obj)

    return _CloudSizePickler


def _pickled_bytes(item: Any) -> int | None:
    """How many bytes ``item`` pickles to (protocol 5 buffers included), by plain pickle or
    else cloudpickle; ``None`` if neither can pickle it."""
    for pickler in (_SizePickler, _cloud_size_pickler()):
        counter = _ByteCounter()
        try:
            pickler(counter, protocol=5, buffer_callback=counter.buffer).dump(item)
        except Exception:  # noqa: BLE001 - only a measurement: the send path reports an
            continue       # item that cannot be pickled, with its index (TypeError)
        return counter.count
    return None
