"""One item per call over Ray's transports on this machine: what an ordinary actor call costs,
against a Ray Compiled Graph (``experimental_compile``) over the same actors.

The question it answers: can a one-item-per-call mapper beat ``ActorPool`` by 1.5x here (issue
11.3)? Contenders, in one process on one local Ray, over the same ``--actors`` actors (default
4, each asking for ``CPU: 2 / actors``, 0.5 by default),
``x + 1`` on ``--items`` items, each timed ``--repeats`` times (median), interleaved:

- ``actorpool``: ``list(ray.util.ActorPool(actors).map(lambda a, v: a.f.remote(v), items))``.
- ``rhmapper_b1``: ``m.map(items, batch_size=1)`` with the same actors as replicas.
- ``rhmapper_compiled_b1``: ``m.map(items, batch_size=1)`` on as many auto replicas of
  ``rm.mapper(..., compiled_graphs=True)``: rhmapper's scheduler over a compiled graph each.
- ``compiled``: one compiled graph per actor (``actor.f.bind(InputNode())``), two executions in
  flight on each, results read in order. Compiling happens before the clock starts (like
  creating the actors); the graphs are torn down after each run.

Also printed: the seconds from creating a mapper of as many auto replicas to the results of
a first map of one item per replica (``batch_size=1``), with and without ``compiled_graphs``
(each replica's graph is compiled for its first call).

Run: ``python benchmarks/transports.py`` (``--actors 24``: more actors, each asking for a
share of the 4 CPUs).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import ray
from ray.dag import InputNode
from ray.util import ActorPool

import rhmapper as rm
from many_replicas import Worker, tiny

IN_FLIGHT = 2
"""Executions in flight per compiled graph (``_max_inflight_executions``)."""


def compiled_graphs(actors: list, items: list[int]) -> tuple[list, float]:
    """The results, and the seconds they took (compiling and tearing down excluded)."""
    graphs = []
    for actor in actors:
        with InputNode() as item:
            node = actor.f.bind(item)
        graphs.append(node.experimental_compile(_max_inflight_executions=IN_FLIGHT))
    try:
        started = time.perf_counter()
        results: list = [None] * len(items)
        pending = [collections.deque() for _ in graphs]
        feed = iter(enumerate(items))
        while True:
            for graph, sent in zip(graphs, pending):
                while len(sent) < IN_FLIGHT and (next_item := next(feed, None)) is not None:
                    index, item = next_item
                    sent.append((index, graph.execute(item)))
            if not any(pending):
                break
            for sent in pending:
                if sent:
                    index, ref = sent.popleft()
                    results[index] = ray.get(ref)
        return results, time.perf_counter() - started
    finally:
        for graph in graphs:
            graph.teardown()


def timed(run) -> tuple[list, float]:
    started = time.perf_counter()
    values = run()
    return values, time.perf_counter() - started


def first_map_seconds(compiled: bool, actors: int) -> tuple[rm.Mapper, float]:
    """A mapper of ``actors`` auto replicas, and the seconds until a first map of one item per
    replica returned (every replica started, and compiled its graph if ``compiled``)."""
    started = time.perf_counter()
    m = rm.mapper(tiny, replicas=actors, env=rm.Env(compute={"CPU": 2 / actors}),
                  compiled_graphs=compiled)
    m.wait_ready(timeout=300)
    m.map(range(actors), batch_size=1)
    return m, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--actors", type=int, default=4)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    actors = [ray.remote(num_cpus=2 / args.actors)(Worker).remote(tiny)
              for _ in range(args.actors)]
    ray.get([actor.f.remote(0) for actor in actors])
    m = rm.mapper(Worker, method="f", replicas=actors, env=rm.Env(name="transports"))
    m.wait_ready(timeout=300)
    for actor in actors:  # room for the auto replicas' CPUs while they start
        ray.kill(actor)
    ordinary, ordinary_first = first_map_seconds(compiled=False, actors=args.actors)
    ordinary.shutdown()
    compiled, compiled_first = first_map_seconds(compiled=True, actors=args.actors)
    actors = [ray.remote(num_cpus=2 / args.actors)(Worker).remote(tiny)
              for _ in range(args.actors)]
    ray.get([actor.f.remote(0) for actor in actors])
    m.shutdown()
    m = rm.mapper(Worker, method="f", replicas=actors, env=rm.Env(name="transports"))
    m.wait_ready(timeout=300)
    items = list(range(args.items))
    expected = [tiny(x) for x in items]
    contenders = {
        "actorpool": lambda: timed(
            lambda: list(ActorPool(actors).map(lambda a, v: a.f.remote(v), items))),
        "rhmapper_b1": lambda: timed(lambda: m.map(items, batch_size=1)),
        "compiled": lambda: compiled_graphs(actors, items),
        "rhmapper_compiled_b1": lambda: timed(lambda: compiled.map(items, batch_size=1)),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            values, seconds = run()
            if values != expected:
                raise AssertionError(f"{name} returned wrong results")
            times[name].append(seconds)
    m.shutdown()
    compiled.shutdown()
    reference = statistics.median(times["actorpool"])
    print(f"\n{args.items} items of x + 1, {args.actors} actors x CPU {2 / args.actors:.3g}, "
          f"median of {args.repeats}")
    print(f"{'contender':<22}{'seconds':>9}{'calls/s':>10}{'throughput / actorpool':>24}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<22}{median:>9.3f}{args.items / median:>10.0f}{reference / median:>24.2f}",
              flush=True)
    print(f"\nA first map over {args.actors} new auto replicas returned after "
          f"{ordinary_first:.2f} s; with compiled_graphs=True {compiled_first:.2f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
