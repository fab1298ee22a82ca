"""The examples in the docstrings of the Ray-free modules run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", [
    "rhmapper.checks", "rhmapper.env", "rhmapper.errors", "rhmapper.names", "rhmapper.options",
    "rhmapper.progress", "rhmapper.retries", "rhmapper.scheduler", "rhmapper.sizing",
    "rhmapper.slots", "rhmapper.wire", "rhmapper.pool_state", "rhmapper.pool_calls",
    "rhmapper.pool_records", "rhmapper.pool_events",
    "rhmapper.plan", "rhmapper.input_feed", "rhmapper.call_sizing", "rhmapper.results",
    "rhmapper.remote_errors", "rhmapper.lanes", "rhmapper.pool_idle", "rhmapper.ticker",
    "rhmapper.digests", "rhmapper.checkpoint_layout", "rhmapper.checkpoint_store",
    "rhmapper.checkpoint_read", "rhmapper.durable", "rhmapper.saved_results",
    "rhmapper.latency", "rhmapper.pool_stats", "rhmapper.diagnosis", "rhmapper.slow_calls", "rhmapper.deadlines",
    "rhmapper.pacing", "rhmapper.async_driver", "rhmapper.async_run", "rhmapper.map_inputs",
    "rhmapper.broadcasts",
])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable examples"
    assert result.failed == 0
