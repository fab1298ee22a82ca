"""The core imports no Ray: the scheduler, its wire types, retries and Env run a map on the
in-process fake pool with Ray made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO_DIR

WITHOUT_RAY = """
    import sys
    sys.modules["ray"] = None  # any `import ray` now raises ImportError

    import rhmapper
    from rhmapper.checks import check_count
    from rhmapper.env import Env
    from rhmapper.names import NAMESPACE, parse_replica_name
    from rhmapper.retries import Retries
    from rhmapper.plan import MapPlan
    from rhmapper.scheduler import MapRun
    from rhmapper import call_sizing, input_feed, plan, remote_errors, results  # its rooms
    from rhmapper.batching import Batched, BatchedCall
    from rhmapper.lanes import SharedRuns
    from rhmapper.autoscaling import Autoscale, ScalingPolicy
    from rhmapper.wire import CallRequest, CallSpec, Guard, ReplicaDied
    from rhmapper import checkpoint_layout, checkpoint_read, checkpoint_store, digests  # durable
    from rhmapper import durable, saved_results
    from rhmapper import async_driver, async_run, pacing, map_inputs, broadcasts  # asyncio
    from tests.fakes import FakePool, ReplicaKiller

    def flaky(x):
        if x == 7:
            raise ReplicaKiller("item 7 kills its replica")
        return x * 2

    plan = MapPlan(CallSpec("fn"), collect=True, total=200, window=None,
                   retries=Retries(max_retries=1), return_exceptions=True)
    run = MapRun(FakePool(3, fn=flaky), plan, iter(range(200)))
    for _ in run.chunks():
        pass
    assert [value for index, value in enumerate(run.results) if index != 7] == [
        2 * x for x in range(200) if x != 7]
    assert type(run.results[7]).__name__ == "ReplicaLostError"
    assert Env(name="e", compute={"CPU": 1}).actor_options()["num_cpus"] == 1
    assert parse_replica_name("e_replica_2") == ("e", 2) and NAMESPACE == "rhmapper"
    assert check_count("window", 3) == 3
    request = CallRequest("fn", [1], guard=Guard("board", "key", 2.0, 1.0))
    assert CallRequest.from_wire(request.to_wire()) == request
    assert "mapper" not in rhmapper.__all__ and "Env" in rhmapper.__all__
    assert rhmapper.Batched is Batched and BatchedCall(3, "fn").next_span() == (0, 3)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:  # a durable map's storage, on a local dir
        with checkpoint_store.CheckpointStore.open(folder, {"target": "fn"}) as store:
            store.add(0, digests.input_digest(3), 6)
            store.mark_complete(1)
        assert list(checkpoint_read.read_checkpoint(folder)) == [6]
    print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""


def test_core_runs_a_map_without_ray():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(WITHOUT_RAY)], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['ray']", "only the blocked `ray` entry, no Ray module loaded"
