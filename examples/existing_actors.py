"""Map over Ray actors you already have, alone or mixed with rhmapper's own (auto) replicas.

Run it with ``python examples/existing_actors.py``: it starts a local Ray (``ray.init()``; on a
cluster's head node that joins the cluster).

What it shows:
  * ``rm.mapper(Translator, method="translate", replicas=[a1, a2])``: your ``@ray.remote`` actors
    form the pool; the scheduler balances the items over them.
  * ``rm.mapper(rm.module(Translator, "auto"), ..., replicas=[a1, a2])`` then ``add_replicas(2)``:
    auto replicas (built as ``Translator("auto")``) join your actors in one pool.
  * ``shutdown()`` kills only the auto replicas; your actors stay alive and keep their state.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import ray

import rhmapper as rm


@ray.remote(num_cpus=0.25)
class Translator:
    """An actor of your own: it keeps a count of the words it translated."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.count = 0

    def translate(self, word: str) -> tuple[str, str]:
        time.sleep(0.01)  # stands in for real work
        self.count += 1
        return word.upper(), self.tag

    def status(self) -> dict:
        return {"tag": self.tag, "pid": os.getpid(), "count": self.count}


def main() -> None:
    ray.init()
    words = [f"word{i}" for i in range(60)]
    mine = [Translator.remote("mine-1"), Translator.remote("mine-2")]

    # 1. Your actors alone.
    m = rm.mapper(Translator, method="translate", replicas=mine)
    results = m.map(words, batch_size=1)
    assert [upper for upper, _ in results] == [w.upper() for w in words]
    print("your actors alone:", dict(Counter(tag for _, tag in results)))
    m.shutdown()  # the pool forgets your actors; it never kills them

    # 2. Your actors mixed with auto replicas built as Translator("auto").
    env = rm.Env(name="translator", compute={"CPU": 0.25})
    m = rm.mapper(rm.module(Translator, "auto"), method="translate", replicas=mine, env=env)
    m.add_replicas(2)
    m.wait_ready()
    print("pool:", m.replica_names)
    results = m.map(words, batch_size=1)
    assert [upper for upper, _ in results] == [w.upper() for w in words]
    print("mixed pool:", dict(Counter(tag for _, tag in results)))
    m.shutdown()  # kills translator_replica_0/1 only

    status = ray.get([actor.status.remote() for actor in mine])
    print("your actors are still alive, with their state:", status)
    for actor in mine:
        ray.kill(actor)


if __name__ == "__main__":
    main()
