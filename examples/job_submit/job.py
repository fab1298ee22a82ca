"""A script for ``ray job submit``: it maps over rhmapper replicas on the cluster it is sent to.

    ray job submit --address http://127.0.0.1:8265 --working-dir examples/job_submit -- python job.py

There is no ``ray.init()`` here: ``rm.mapper()`` calls it, and in a job ``RAY_ADDRESS`` names the
cluster. The job's ``--working-dir`` is the working dir of the job's driver AND of every replica,
so ``vocab.txt`` (uploaded with this script) is read by a relative path inside the replicas.
"""

from __future__ import annotations

import argparse
import time

import ray

import rhmapper as rm


def square(x: int) -> int:
    time.sleep(0.01)  # stands in for real work
    return x * x


class Vocabulary:
    """A stateful replica: loads the vocabulary once, then encodes many texts."""

    def __init__(self, path: str) -> None:
        with open(path) as handle:  # relative to the job's working dir, inside the replica
            self.ids = {word.strip(): i for i, word in enumerate(handle) if word.strip()}

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, -1) for word in text.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20, help="how many numbers to square")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per mapper")
    args = parser.parse_args()

    env = rm.Env(name="job_squares", compute={"CPU": 0.5})
    with rm.mapper(square, replicas=args.replicas, env=env) as squares:
        results = squares.map(range(args.items))
    print(f"squares: {results}")

    texts = ["ray map", "replica actor job", "cluster of ray", "unknown words"]
    with rm.mapper(rm.module(Vocabulary, "vocab.txt"), method="encode", replicas=args.replicas,
                   env=rm.Env(name="job_vocab", compute={"CPU": 0.5})) as vocabulary:
        for text, ids in zip(texts, vocabulary.map(texts)):
            print(f"encode({text!r}) = {ids}")

    print(f"job {ray.get_runtime_context().get_job_id()} on {len(ray.nodes())} node(s): done")


if __name__ == "__main__":
    main()
