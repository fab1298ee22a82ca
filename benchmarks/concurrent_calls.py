"""Many threads, one item each: ``Mapper.call`` from 100 threads on a batched mapper against the
same mapper unbatched (issue 20, part 2). The model costs 2 ms per call plus a little per item,
like a framework's dispatch; 2 replicas at ``num_cpus=0.5``. Both mappers are made once; each
round runs every thread's calls, the two interleaved, and the report gives the median
throughput of each and their ratio.

Usage::

    python benchmarks/concurrent_calls.py                # 100 threads x 5 calls, 5 rounds
    python benchmarks/concurrent_calls.py --threads 50 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import ray

import rhmapper as rm


class DispatchBound:
    """A model whose call costs 2 ms whatever the batch, plus 20 us per item."""

    def predict(self, xs: list) -> list:
        time.sleep(0.002 + 0.00002 * len(xs))
        return [x + 1 for x in xs]

    def predict_one(self, x: int) -> int:
        return self.predict([x])[0]


def calls_per_second(mapper: rm.Mapper, threads: int, calls: int) -> float:
    """Throughput of ``threads`` threads each making ``calls`` calls of ``mapper``; every result
    is checked."""
    wrong: list = []

    def caller(first: int) -> None:
        for x in range(first, first + calls):
            if mapper.call(x) != x + 1:
                wrong.append(x)

    workers = [threading.Thread(target=caller, args=(n * calls,)) for n in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)
    elapsed = time.perf_counter() - started
    assert not wrong and not any(worker.is_alive() for worker in workers), wrong[:5]
    return threads * calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--calls", type=int, default=5, help="calls per thread per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    env = rm.Env(compute={"CPU": 0.5})
    mappers = {
        "unbatched": rm.mapper(DispatchBound, method="predict_one", replicas=2, env=env),
        "batched": rm.mapper(DispatchBound, method="predict", replicas=2, env=env,
                             batched=rm.Batched(max_size=64, max_wait_ms=10)),
    }
    rates: dict[str, list[float]] = {name: [] for name in mappers}
    for mapper in mappers.values():
        mapper.wait_ready()
        calls_per_second(mapper, 4, 2)  # warm
    for _ in range(args.rounds):
        for name, mapper in mappers.items():
            rates[name].append(calls_per_second(mapper, args.threads, args.calls))
    for mapper in mappers.values():
        mapper.shutdown()
    ray.shutdown()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{args.threads} threads x {args.calls} calls, {args.rounds} interleaved rounds, medians")
    for name, rate in medians.items():
        print(f"{name}: {rate:,.0f} calls/s")
    print(f"batched / unbatched: {medians['batched'] / medians['unbatched']:.1f}x")


if __name__ == "__main__":
    main()
