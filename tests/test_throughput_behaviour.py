"""What makes rhmapper fast, proven by behaviour (speed itself lives in benchmarks/)."""

from __future__ import annotations

import os
import time

import psutil
import pytest

import rhmapper as rm

pytestmark = pytest.mark.usefixtures("ray_local")

DRIVER_PICKLES = [0]
_REPLICA_UNPICKLES = [0]


def _rebuild_blob(payload):
    _REPLICA_UNPICKLES[0] += 1
    return Blob(payload)


class Blob:
    """A large constant that counts how often it is pickled (driver) and rebuilt (replica)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        DRIVER_PICKLES[0] += 1
        return (_rebuild_blob, (self.payload,))


class BlobUser:
    def size_plus(self, x, blob):
        return len(blob.payload) + x

    def rebuilds(self):
        return _REPLICA_UNPICKLES[0]


def test_constant_kwargs_are_serialised_once_per_map():
    blob = Blob(b"x" * (50 * 2**20))
    with rm.mapper(rm.module(BlobUser), method="size_plus", replicas=2).wait_ready() as m:
        DRIVER_PICKLES[0] = 0
        results = m.map(range(200), kwargs={"blob": blob}, batch_size=1)
        assert results == [50 * 2**20 + x for x in range(200)]
        assert DRIVER_PICKLES[0] == 1, f"the constant was pickled {DRIVER_PICKLES[0]} times"
        rebuilds = m.broadcast("rebuilds")
        assert rebuilds == [1, 1], f"each replica should rebuild it once, got {rebuilds}"


def test_imap_of_a_million_items_keeps_driver_memory_bounded():
    process = psutil.Process(os.getpid())
    with rm.mapper(abs, replicas=2, env=rm.Env(name="absolute")).wait_ready() as m:
        list(m.imap(range(-1000, 0)))  # warm up the pool and Ray's buffers
        before = process.memory_info().rss
        peak = before
        count = 0
        total = 0
        for value in m.imap((-x for x in range(1_000_000)), window=8192):
            count += 1
            total += value
            if count % 50_000 == 0:
                peak = max(peak, process.memory_info().rss)
        peak = max(peak, process.memory_info().rss)
    assert count == 1_000_000 and total == sum(range(1_000_000))
    growth_mb = (peak - before) / 2**20
    assert growth_mb < 100, f"driver RSS grew by {growth_mb:.0f} MB"


class SlowStart:
    """The first replica to start is quick; the others take 6 s to build."""

    def __init__(self, marker_dir):
        try:
            os.close(os.open(os.path.join(marker_dir, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(6)

    def run(self, x):
        return x


def test_each_replica_takes_work_as_soon_as_it_is_ready(tmp_path):
    started = time.monotonic()
    with rm.mapper(rm.module(SlowStart, str(tmp_path)), method="run", replicas=4) as m:
        first = next(iter(m.imap(range(10))))
        first_at = time.monotonic() - started
        m.wait_ready()
        all_ready_at = time.monotonic() - started
    assert first == 0
    assert first_at < all_ready_at - 3, (first_at, all_ready_at)
