"""The mapper on the cluster against the mapper on a Ray Client driver.

Starts its own Ray head on loopback (with a Ray Client server; ``tests/ray_head.py``, stopped by
pid at the end) and runs one driver process over ``ray://`` that times, on the same 2 replicas
(``CPU: 0.5``), median of ``--repeats``, alternating:

- ``b1``: ``--items`` small items (``x * x``), ``batch_size=1``: one call per item,
- ``tiny``: ``--tiny-items`` items, auto batches,

with ``rm.mapper(..., on_cluster=False)`` (the dispatch loop on the client: every call crosses
the client connection) and ``on_cluster=True`` (the loop in a host actor on the head: inputs and
results cross it in bulk). For reference, the same driver also runs on the head itself (a
GCS address, not ``ray://``). Run: ``python benchmarks/on_cluster.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.ray_head import start_head  # noqa: E402  (the repository's test head helper)

DRIVER = """
    import json, statistics, sys, time
    import rhmapper as rm

    items, tiny_items, repeats = map(int, sys.argv[1:4])

    def square(x):
        return x * x

    mappers = {where: rm.mapper(square, replicas=2, env=rm.Env(compute={"CPU": 0.5}),
                                on_cluster=(where == "on_cluster"))
               for where in ("on_client", "on_cluster")}
    for m in mappers.values():
        m.wait_ready(timeout=120)
        m.map(range(16), batch_size=1)
    times = {}
    for _ in range(repeats):
        for where, m in mappers.items():
            for workload, count, options in (("b1", items, {"batch_size": 1}),
                                             ("tiny", tiny_items, {})):
                started = time.perf_counter()
                values = m.map(range(count), **options)
                times.setdefault(f"{workload} {where}", []).append(time.perf_counter() - started)
                assert values == [x * x for x in range(count)], "wrong results"
    for m in mappers.values():
        m.shutdown()
    print(json.dumps({key: statistics.median(value) for key, value in times.items()}))
"""


def run_driver(env: dict[str, str], address: str, args: argparse.Namespace) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(args.items), str(args.tiny_items),
         str(args.repeats)], env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True,
        timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stdout + done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--tiny-items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    head = start_head(num_cpus=4, extra_env={"GRPC_ENABLE_FORK_SUPPORT": "false"})
    try:
        over_client = run_driver(head.env, head.client_address, args)
        on_head = run_driver(head.env, head.gcs_address, args)
    finally:
        head.stop()
    print(f"{args.items} items batch_size=1 (b1) and {args.tiny_items} tiny items (auto), "
          f"2 replicas, median of {args.repeats}")
    print(f"{'driver':<12}{'mapper':<12}{'b1 s':>9}{'tiny s':>9}")
    for driver, times in (("ray://", over_client), ("head", on_head)):
        for where in ("on_client", "on_cluster"):
            print(f"{driver:<12}{where:<12}{times[f'b1 {where}']:>9.3f}{times[f'tiny {where}']:>9.3f}")
    b1 = over_client["b1 on_client"] / over_client["b1 on_cluster"]
    tiny = over_client["tiny on_cluster"] / over_client["tiny on_client"]
    print(f"over ray://: b1 on_cluster is {b1:.2f}x faster (goal >= 3); "
          f"tiny on_cluster takes {tiny:.2f}x the client mapper's time (goal <= 1)")


if __name__ == "__main__":
    main()
