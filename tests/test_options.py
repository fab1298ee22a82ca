"""Every count option follows one rule, checked before any Ray work: a value of the wrong type
is a TypeError, a whole number out of range a ValueError, each naming the option, the value and
what it takes. No Ray is started here (the mapper checks its counts before it joins Ray)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import rhmapper as rm
from rhmapper.options import MapSettings, check_count, check_seconds
from rhmapper.retries import Retries

WRONG_TYPES = ["8", 2.0, 1.5, True, None, [2]]


def build_settings(option):
    return lambda value: MapSettings.of({option: value})


def build_mapper(option):
    return lambda value: rm.Mapper(abs, **{option: value})


COUNT_OPTIONS = {  # option: (build it with a value, smallest value taken)
    "batch_size": (build_settings("batch_size"), 1),
    "window": (build_settings("window"), 1),
    "max_replica_crashes": (build_settings("max_replica_crashes"), 1),
    "retries": (build_settings("retries"), 0),
    "max_retries": (lambda value: Retries(max_retries=value), 0),
    "concurrency": (build_mapper("concurrency"), 1),
    "max_call_bytes": (build_mapper("max_call_bytes"), 1),
}


@pytest.mark.parametrize("option", COUNT_OPTIONS)
@pytest.mark.parametrize("value", WRONG_TYPES, ids=repr)
def test_a_count_of_the_wrong_type_is_a_type_error(option, value):
    build, minimum = COUNT_OPTIONS[option]
    if option == "concurrency" and value is None:
        pytest.skip("concurrency=None is the default: each actor's own max_concurrency")
    with pytest.raises(TypeError, match=rf"^{option} must be a whole number >= {minimum}.*, "
                                        rf"got {re.escape(repr(value))} "
                                        rf"\({type(value).__name__}\)$"):
        build(value)


@pytest.mark.parametrize("option", COUNT_OPTIONS)
def test_a_count_out_of_range_is_a_value_error(option):
    build, minimum = COUNT_OPTIONS[option]
    for value in (minimum - 1, -5):
        with pytest.raises(ValueError, match=rf"{option} must be a whole number >= {minimum}.*, "
                                             rf"got {value}"):
            build(value)


@pytest.mark.parametrize("option", [name for name in COUNT_OPTIONS if name not in (
    "concurrency", "max_call_bytes")])
def test_a_count_in_range_is_taken_and_numpy_integers_become_ints(option):
    build, minimum = COUNT_OPTIONS[option]
    built = build(np.int64(minimum + 2))
    value = built.max_retries if option == "max_retries" else getattr(built, option)
    if option == "retries":
        value = Retries.of(value).max_retries
    assert value == minimum + 2 and type(value) is int


def test_the_messages_say_what_else_an_option_takes():
    with pytest.raises(TypeError, match=r"batch_size must be a whole number >= 1 or 'auto', "
                                        r"got 2\.0 \(float\)"):
        MapSettings(batch_size=2.0)
    with pytest.raises(TypeError, match=r"batch_size must be a whole number >= 1 or 'auto', "
                                        r"got 'Auto' \(str\)"):
        MapSettings(batch_size="Auto")
    with pytest.raises(TypeError, match=r"retries must be a whole number >= 0 or "
                                        r"rm\.Retries\(\.\.\.\), got '3' \(str\)"):
        Retries.of("3")
    with pytest.raises(ValueError, match=r"concurrency must be a whole number >= 1 or None, "
                                         r"got 0"):
        rm.Mapper(abs, concurrency=0)


def test_window_foo_and_window_two_point_oh_are_type_errors_and_zero_a_value_error():
    """The issue's own examples."""
    with pytest.raises(TypeError, match="window"):
        MapSettings.of({"window": "foo"})
    with pytest.raises(TypeError, match="window"):
        MapSettings.of({"window": 2.0})
    with pytest.raises(ValueError, match="window"):
        MapSettings.of({"window": 0})


@pytest.mark.parametrize("value, error", [
    ("5", TypeError), (True, TypeError), ([5], TypeError), (0, ValueError), (-1.5, ValueError),
    (float("nan"), ValueError)], ids=repr)
def test_seconds_options_follow_the_same_rule(value, error):
    with pytest.raises(error, match="timeout must be a number of seconds > 0"):
        MapSettings(timeout=value)
    with pytest.raises(error, match="keep_seconds must be a number of seconds > 0"):
        check_seconds("keep_seconds", value)


def test_check_count_takes_whole_numbers_only():
    assert check_count("n", 3) == 3 and check_count("n", 0, minimum=0) == 0
    assert type(check_count("n", np.int32(4))) is int
    for wrong in (np.float64(2.0), np.bool_(True), b"2", 2 + 0j):
        with pytest.raises(TypeError, match=r"^n must be a whole number >= 1, got "):
            check_count("n", wrong)
