"""The examples in the docstrings of the mapper's verbs run as written, on the session's Ray."""

from __future__ import annotations

import doctest
import importlib

import pytest

import rhmapper as rm


@pytest.mark.timeout(240)
def test_mapper_examples_run(ray_local):
    module = importlib.import_module("rhmapper.mapper")  # `rhmapper.mapper` is the function
    result = doctest.testmod(module, extraglobs={"rm": rm},
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20, "the verbs' examples are missing"
    assert result.failed == 0
