"""Async replicas: 200 items of ``await asyncio.sleep(0.05)`` on 2 replicas with concurrency 4.

Contenders, in one process on one local Ray, each timed ``--repeats`` times (median reported):

- ``rhmapper``: ``rm.mapper(async_sleep, replicas=2, concurrency=4).map(items)``; replicas started
  before the clock starts.
- ``direct_c4``: what a Ray user writes by hand over the same slots: two async actors with
  ``max_concurrency=4``, one call per item, round robin, then ``ray.get``.
- ``direct_c1000``: the same with Ray's default for async actors (``max_concurrency=1000``): every
  item awaits at once.

The floor is one item's sleep (every item awaiting at once, no overhead). Ratios are to the floor
and to ``direct_c4``. Run: ``python benchmarks/async_replicas.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import ray

import rhmapper as rm

ITEMS = 200
SLEEP_SECONDS = 0.05
REPLICAS = 2
CONCURRENCY = 4


async def async_sleep(x: int) -> int:
    await asyncio.sleep(SLEEP_SECONDS)
    return 2 * x


@ray.remote(num_cpus=0.5)
class AsyncSleeper:
    async def work(self, x: int) -> int:
        return await async_sleep(x)


def time_rhmapper(items: list[int], repeats: int) -> list[float]:
    with rm.mapper(async_sleep, replicas=REPLICAS, concurrency=CONCURRENCY,
                   env=rm.Env(name="async_bench", compute={"CPU": 0.5})) as m:
        m.wait_ready(timeout=120)
        m.map(range(8))  # the replicas' first call (imports) is not timed
        return [_timed(lambda: m.map(items), items) for _ in range(repeats)]


def time_direct(items: list[int], repeats: int, max_concurrency: int) -> list[float]:
    actors = [AsyncSleeper.options(max_concurrency=max_concurrency).remote()
              for _ in range(REPLICAS)]
    ray.get([actor.work.remote(0) for actor in actors])

    def run() -> list[int]:
        return ray.get([actors[i % REPLICAS].work.remote(x) for i, x in enumerate(items)])

    try:
        return [_timed(run, items) for _ in range(repeats)]
    finally:
        for actor in actors:
            ray.kill(actor)


def _timed(run, items: list[int]) -> float:
    started = time.perf_counter()
    values = run()
    elapsed = time.perf_counter() - started
    if values != [2 * x for x in items]:
        raise AssertionError("wrong results")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    items = list(range(ITEMS))
    results = {
        "rhmapper": time_rhmapper(items, args.repeats),
        "direct_c4": time_direct(items, args.repeats, CONCURRENCY),
        "direct_c1000": time_direct(items, args.repeats, 1000),
    }
    reference = statistics.median(results["direct_c4"])
    print(f"{ITEMS} items of await asyncio.sleep({SLEEP_SECONDS}), {REPLICAS} replicas x "
          f"concurrency {CONCURRENCY}; median of {args.repeats}; floor {SLEEP_SECONDS:.3f}s")
    print(f"{'contender':<14}{'seconds':>9}{'/ floor':>9}{'/ direct_c4':>13}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:<14}{median:>9.3f}{median / SLEEP_SECONDS:>9.2f}{median / reference:>13.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
