"""rhmapper quickstart: map a function and a stateful class over replicas on an embedded local Ray.

Run it with ``python examples/quickstart.py``: with no Ray cluster around, the mapper starts a local
Ray itself.
"""

import time

import rhmapper as rm


def slow_square(x: int) -> int:
    time.sleep(0.05)  # stands in for real work: an API call, a file to parse, ...
    return x * x


class Embedder:
    """A stateful model: costly to build, so each replica builds it once and reuses it."""

    def __init__(self, dim: int) -> None:
        self.weights = [(i * 7919) % 101 / 100 for i in range(dim)]

    def embed(self, text: str) -> list[float]:
        return [round(w * len(text), 2) for w in self.weights]


def main() -> None:
    env = rm.Env(name="squares", compute={"CPU": 0.5})  # replicas: squares_replica_0, _1, ...
    with rm.mapper(slow_square, replicas=4, env=env, concurrency=2) as squares:
        squares.wait_ready()  # not needed to map; here it keeps start-up out of the timing
        started = time.monotonic()
        results = squares.map(range(40))
        elapsed = time.monotonic() - started
        print(f"map: {results[:8]} ... in {elapsed:.2f}s on {squares.num_replicas} replicas "
              f"(one at a time: {40 * 0.05:.1f}s)")
        print("imap, in input order:", list(squares.imap(range(5))))
        print("call, on the least-loaded replica:", squares.call(12))

    with rm.mapper(rm.module(Embedder, dim=3), method="embed", replicas=2,
                   env=rm.Env(name="embedder", compute={"CPU": 0.5})) as embedder:
        for text, vector in zip(["ray", "rhmapper"], embedder.map(["ray", "rhmapper"])):
            print(f"embed({text!r}) = {vector}")


if __name__ == "__main__":
    main()
