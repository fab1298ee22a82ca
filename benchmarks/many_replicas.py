"""Many replicas on real Ray: 48 actors at ``CPU: 0.01`` on this machine, the same actors for
every contender.

Contenders, in one process on one local Ray, each timed ``--repeats`` times (median reported),
interleaved (run 1 of each, then run 2, ...):

- ``ray_wait``: a hand-written loop: one call in flight per actor, ``ray.wait`` over all of
  them for the next to finish, ``ray.get`` it, send that actor the next item.
- ``actorpool``: ``list(ray.util.ActorPool(actors).map(lambda a, v: a.f.remote(v), items))``.
- ``rhmapper_b1``: ``m.map(items, batch_size=1)`` with the same 48 actors as replicas
  (``rm.mapper(Worker, method="f", replicas=actors)``): one item per call, the per-call path.
- ``rhmapper``: ``m.map(items)``, auto batches.

Workloads: ``tiny`` (``x + 1``; the per-call cost of the driver and the actors) and ``sleep``
(``time.sleep(0.01)``: can the driver keep 48 replicas busy? the floor is items x 10 ms / 48).
Run: ``python benchmarks/many_replicas.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import ray
from ray.util import ActorPool

import rhmapper as rm

REPLICAS = 48
SLEEP_SECONDS = 0.01


def tiny(x: int) -> int:
    return x + 1


def sleep(x: int) -> int:
    time.sleep(SLEEP_SECONDS)
    return x + 1


class Worker:
    def __init__(self, fn: Callable[[int], int]) -> None:
        self.fn = fn

    def f(self, x: int) -> int:
        return self.fn(x)


RemoteWorker = ray.remote(num_cpus=0.01)(Worker)


def ray_wait_loop(actors: list, items: list[int]) -> list[int]:
    results: list = [None] * len(items)
    pending = {}
    feed = iter(enumerate(items))
    for actor, (index, item) in zip(actors, feed):
        pending[actor.f.remote(item)] = (actor, index)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        actor, index = pending.pop(ref)
        results[index] = ray.get(ref)
        for index, item in feed:
            pending[actor.f.remote(item)] = (actor, index)
            break
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-items", type=int, default=5000)
    parser.add_argument("--sleep-items", type=int, default=4800)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    for name, fn, count in (("tiny", tiny, args.tiny_items), ("sleep", sleep, args.sleep_items)):
        run_workload(name, fn, list(range(count)), args.repeats)
    ray.shutdown()


def run_workload(name: str, fn: Callable[[int], int], items: list[int], repeats: int) -> None:
    actors = [RemoteWorker.remote(fn) for _ in range(REPLICAS)]
    ray.get([actor.f.remote(0) for actor in actors])
    m = rm.mapper(Worker, method="f", replicas=actors, env=rm.Env(name=f"many_{name}"))
    m.wait_ready(timeout=300)
    m.map(range(4 * REPLICAS), batch_size=1)  # every replica has served a call before timing
    contenders = {
        "ray_wait": lambda: ray_wait_loop(actors, items),
        "actorpool": lambda: list(ActorPool(actors).map(lambda a, v: a.f.remote(v), items)),
        "rhmapper_b1": lambda: m.map(items, batch_size=1),
        "rhmapper": lambda: m.map(items),
    }
    times: dict[str, list[float]] = {contender: [] for contender in contenders}
    expected = [fn(x) for x in items] if fn is tiny else [x + 1 for x in items]
    for _ in range(repeats):
        for contender, run in contenders.items():
            started = time.perf_counter()
            values = run()
            times[contender].append(time.perf_counter() - started)
            if values != expected:
                raise AssertionError(f"{contender} returned wrong results")
    m.shutdown()
    for actor in actors:
        ray.kill(actor)
    reference = statistics.median(times["actorpool"])
    floor = len(items) * SLEEP_SECONDS / REPLICAS if fn is sleep else None
    print(f"\n{name}: {len(items)} items, {REPLICAS} actors x CPU 0.01, median of {repeats}"
          + (f", floor {floor:.2f}s" if floor else ""))
    print(f"{'contender':<13}{'seconds':>9}{'items/s':>10}{'/ actorpool':>13}"
          + ("{:>9}".format("/ floor") if floor else ""))
    for contender, samples in times.items():
        median = statistics.median(samples)
        line = (f"{contender:<13}{median:>9.3f}{len(items) / median:>10.0f}"
                f"{median / reference:>13.2f}")
        print(line + (f"{median / floor:>9.2f}" if floor else ""), flush=True)


if __name__ == "__main__":
    main()
