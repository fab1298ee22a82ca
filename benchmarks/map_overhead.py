"""The fixed cost of a map: `tiny` (100,000 x ``x + 1``) on rhmapper against the hand-written
optimum, the two interleaved round by round in one process, so that drift of a busy host hits
both alike (`bench.py` runs each contender's repeats in a block, where a 20 ms map swings with
the host's state). Reports the median wall time and the median CPU time of the driver process
(all its threads, Ray's included), each as a ratio to the optimum's.

Usage::

    python benchmarks/map_overhead.py                 # 40 rounds
    python benchmarks/map_overhead.py --rounds 10 --items 10000

The optimum is `bench.py`'s: 4 actors of ``num_cpus=0.5``, the input split in 8 strided chunks
(two per actor, all sent at once), ``[fn(x) for x in chunk]`` in the actor, results put back in
place. rhmapper maps with a mapper of 4 replicas made once; every timed map is a later map of the
mapper (the first map of a method sizes its calls with one-item calls first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

import rhmapper as rm

NUM_ACTORS, ACTOR_CPUS, CHUNKS = 4, 0.5, 8


def increment(x: int) -> int:
    return x + 1


@ray.remote(num_cpus=ACTOR_CPUS)
class ChunkWorker:
    def chunk(self, xs: list) -> list:
        return [increment(x) for x in xs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--items", type=int, default=100_000)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    items = list(range(args.items))
    expected = [x + 1 for x in items]
    workers = [ChunkWorker.remote() for _ in range(NUM_ACTORS)]
    mapper = rm.mapper(increment, replicas=NUM_ACTORS,
                       env=rm.Env(name="map_overhead", compute={"CPU": ACTOR_CPUS}))
    mapper.wait_ready()

    def optimum() -> list:
        refs = [workers[i % NUM_ACTORS].chunk.remote(items[i::CHUNKS]) for i in range(CHUNKS)]
        out = [None] * len(items)
        for i, part in enumerate(ray.get(refs)):
            out[i::CHUNKS] = part
        return out

    def rhmapper_map() -> list:
        return mapper.map(items, progress=False)

    contenders = {"optimum": optimum, "rhmapper": rhmapper_map}
    for run in contenders.values():  # warm: actors, the end board, the measured item time
        for _ in range(3):
            assert run() == expected
    clocks = {"wall": time.perf_counter, "driver CPU": time.process_time}
    times = {(name, clock): [] for name in contenders for clock in clocks}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            started = {clock_name: clock() for clock_name, clock in clocks.items()}
            run()
            for clock_name, clock in clocks.items():
                times[name, clock_name].append(clock() - started[clock_name])
    mapper.shutdown()
    ray.shutdown()
    print(f"tiny: {args.items:,} x `x + 1`, {args.rounds} interleaved rounds, medians")
    print("| contender | wall ms | / optimum | driver CPU ms | / optimum |")
    print("|---|---|---|---|---|")
    for name in contenders:
        row = [name]
        for clock_name in clocks:
            median = statistics.median(times[name, clock_name])
            row += [f"{median * 1000:.1f}",
                    f"{median / statistics.median(times['optimum', clock_name]):.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
