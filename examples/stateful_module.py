"""A stateful class on rhmapper replicas: each replica builds it once, then serves many calls.

Run it with ``python examples/stateful_module.py``: with no Ray cluster around, the mapper starts a
local Ray itself (on a cluster's head node it joins that cluster instead).

What it shows:
  * ``rm.module(Index, 5_000, build_seconds=0.5)``: each replica runs the costly constructor ONCE;
    the replicas build in parallel, and every later call reuses the built object.
  * ``method="search"``: the method ``map`` calls; ``map(..., method="other")`` picks another.
  * ``broadcast("set_boost", 10)``: a call on EVERY replica (to load or change state), results in
    replica order.
"""

from __future__ import annotations

import os
import time

import rhmapper as rm


class Index:
    """A toy search index: slow to build (stands in for loading a model or an index), fast to use."""

    def __init__(self, size: int, build_seconds: float = 0.5) -> None:
        self.built_at = time.time()
        time.sleep(build_seconds)  # the costly part: done once per replica
        self.docs = [f"doc-{i:05d}" for i in range(size)]
        self.boost = 1
        self.queries = 0

    def search(self, key: int) -> tuple[str, int]:
        self.queries += 1
        return self.docs[key % len(self.docs)], key * self.boost

    def set_boost(self, boost: int) -> int:
        self.boost = boost
        return os.getpid()

    def stats(self) -> dict:
        return {"pid": os.getpid(), "queries": self.queries, "boost": self.boost,
                "built_at": self.built_at}


def main() -> None:
    env = rm.Env(name="index", compute={"CPU": 0.5})  # replicas index_replica_0, _1, _2
    with rm.mapper(rm.module(Index, 5_000, build_seconds=0.5), method="search",
                   replicas=3, env=env, concurrency=2) as m:
        m.wait_ready()  # not needed to map: each replica takes work as soon as it is built
        starts = [s["built_at"] for s in m.broadcast("stats")]
        print(f"3 replicas built their Index once each, in parallel: the builds started "
              f"{max(starts) - min(starts):.2f}s apart and took 0.5s each")

        started = time.monotonic()
        hits = m.map(range(300))
        print(f"300 searches in {time.monotonic() - started:.2f}s, no rebuild: {hits[:3]} ...")

        pids = m.broadcast("set_boost", 10)  # change the state of every replica
        print(f"broadcast set_boost(10) reached replica pids {pids}")
        print("after the broadcast:", m.map([1, 2, 3]))

        stats = m.broadcast("stats")
        print("per replica:", [{k: s[k] for k in ("pid", "queries", "boost")} for s in stats])
        assert sum(s["queries"] for s in stats) == 303, stats
        assert [s["built_at"] for s in stats] == starts, "no replica was rebuilt"
        assert len({s["pid"] for s in stats}) == 3 and {s["boost"] for s in stats} == {10}
        print("another method, same replicas:", m.map([7, 8], method="search"))


if __name__ == "__main__":
    main()
