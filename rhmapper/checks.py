"""The checks of rhmapper's count and seconds arguments, one each, so that every option says
the same about a wrong value. Pure Python: no Ray, and no other rhmapper module (`options`,
`retries` and the mapper all check with these).
"""

from __future__ import annotations

import numbers
import operator
from typing import Any


def check_count(option: str, value: Any, minimum: int = 1, or_else: str = "") -> int:
    """``value`` as an ``int``, checked for the count option ``option``: a whole number of at
    least ``minimum``. The one check of every count option of rhmapper.

    As CPython's executors check ``buffersize``: a value of the wrong type (a ``str``, a
    ``float`` even if whole, a ``bool``, ``None``) raises ``TypeError``; a whole number below
    ``minimum`` raises ``ValueError``. Either names the option, what it got and what it takes
    (``or_else``: the option's other accepted values, said in the message). Integers of other
    types (a NumPy ``int64``) are taken, as ``int``.

    Examples:
        >>> check_count("window", 64)
        64
        >>> check_count("window", 2.0)
        Traceback (most recent call last):
        ...
        TypeError: window must be a whole number >= 1, got 2.0 (float)
        >>> check_count("concurrency", 0, or_else="None")
        Traceback (most recent call last):
        ...
        ValueError: concurrency must be a whole number >= 1 or None, got 0
    """
    takes = f"a whole number >= {minimum}" + (f" or {or_else}" if or_else else "")

    def wrong_type() -> TypeError:
        return TypeError(f"{option} must be {takes}, got {value!r} ({type(value).__name__})")

    if isinstance(value, bool):
        raise wrong_type()
    try:
        count = operator.index(value)
    except TypeError:
        raise wrong_type() from None
    if count < minimum:
        raise ValueError(f"{option} must be {takes}, got {value!r}")
    return count


def check_seconds(option: str, value: Any) -> float:
    """``value``, checked for the option ``option``, a number of seconds > 0: another type
    (a ``str``, a ``bool``) raises ``TypeError``, a number <= 0 (or NaN) ``ValueError``.

    Examples:
        >>> check_seconds("timeout", 2.5)
        2.5
        >>> check_seconds("keep_seconds", "1h")
        Traceback (most recent call last):
        ...
        TypeError: keep_seconds must be a number of seconds > 0, got '1h' (str)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{option} must be a number of seconds > 0, got {value!r} "
                        f"({type(value).__name__})")
    if not value > 0:
        raise ValueError(f"{option} must be a number of seconds > 0, got {value!r}")
    return value


def check_concurrency(concurrency: Any) -> int | None:
    """``concurrency`` checked (see `check_count`): ``None`` or a count.

    Examples:
        >>> check_concurrency(None), check_concurrency(4)
        (None, 4)
        >>> check_concurrency(0)
        Traceback (most recent call last):
        ...
        ValueError: concurrency must be a whole number >= 1 or None, got 0
    """
    return None if concurrency is None else check_count("concurrency", concurrency,
                                                        or_else="None")
