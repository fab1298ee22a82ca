"""Smoke test of the simulated-scale benchmark: the real scheduler on a virtual-clock pool of
many replicas (no Ray). Speed is measured in benchmarks/sim_scale.py, not asserted here."""

from __future__ import annotations

import pytest

from benchmarks.sim_scale import simulate


@pytest.mark.parametrize("replicas, concurrency, calls", [(10, 1, 500), (100, 4, 2000)])
def test_simulated_pool_runs_every_call_in_order(replicas, concurrency, calls):
    result = simulate(replicas, concurrency, call_seconds=0.01, max_seconds=60, max_calls=calls)
    assert result.calls == calls
    assert 0.0 < result.utilisation <= 1.0
    assert result.us_per_call > 0
