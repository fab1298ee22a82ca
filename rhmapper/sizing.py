"""How many bytes an input item takes on the wire, roughly and cheaply. Pure Python: no Ray."""

from __future__ import annotations

import sys
from typing import Any

_SAMPLES = 16
"""A batch's size in bytes is estimated from at most this many of its items."""


def approx_bytes(item: Any) -> int:
    """About how many bytes ``item`` pickles to: exact for bytes-like objects, strings and
    arrays (anything with ``nbytes``), summed one level into tuples, lists and dicts, and the
    object's own size otherwise.

    Examples:
        >>> approx_bytes(b"x" * 1000), approx_bytes(("ab", b"cd"))
        (1000, 20)
    """
    if isinstance(item, (bytes, bytearray, str)):
        return len(item)
    nbytes = getattr(item, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(item, (tuple, list)):
        return 8 * len(item) + sum(_shallow_bytes(element) for element in item)
    if isinstance(item, dict):
        return 16 * len(item) + sum(_shallow_bytes(value) for value in item.values())
    return sys.getsizeof(item)


def _shallow_bytes(item: Any) -> int:
    if isinstance(item, (bytes, bytearray, str)):
        return len(item)
    nbytes = getattr(item, "nbytes", None)
    return nbytes if isinstance(nbytes, int) else sys.getsizeof(item)


def mean_item_bytes(items: list) -> float:
    """The mean `approx_bytes` of ``items``, from at most 16 evenly spread samples.

    Examples:
        >>> mean_item_bytes([b"x" * 10, b"y" * 30])
        20.0
    """
    step = max(1, len(items) // _SAMPLES)
    sample = items[::step][:_SAMPLES]
    return sum(map(approx_bytes, sample)) / len(sample)
