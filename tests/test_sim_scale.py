"""Smoke test of the simulated-scale benchmark: the real scheduler on a virtual-clock pool of
many replicas (no Ray). Speed is measured in benchmarks/sim_scale.py, not asserted here."""

from __future__ import annotations

import pytest

from benchmarks.sim_scale import simulate


@pytest.mark.parametrize("replicas, concurrency, items, batch_size",
                         [(10, 1, 500, 1), (100, 4, 2000, 1), (1000, 4, 20_000, 1),
                          (100, 1, 5000, 10)])
def test_simulated_pool_runs_every_item_once(replicas, concurrency, items, batch_size):
    result = simulate(replicas, concurrency, call_seconds=0.01, max_seconds=float("inf"),
                      max_items=items, batch_size=batch_size)
    assert result.items == items, "simulate checks each came back once, as itself"
    assert result.calls == items // batch_size, "each item was sent in one call only"
    assert 0.0 < result.utilisation <= 1.0
