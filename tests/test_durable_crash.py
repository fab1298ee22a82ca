"""Durable maps survive a driver killed with SIGKILL and a Ray cluster stopped mid-map (issue 22):
run again on a new cluster with the same ``checkpoint=``, a map (and a spawned map, spawned
again by name) sends only what was not saved, and redoes at most the items in flight plus those
finished within one flush interval before the crash; executions are timed inside the replicas.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rhmapper.checkpoint_store import FLUSH_SECONDS
from tests.driver_process import DriverProcess
from tests.ray_head import start_head

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ITEMS = 400
SLACK_SECONDS = 2.0
"""Beyond the flush interval: a shard's write, and clocks read in different processes."""

MAPS = """
    import json, os, sys, time
    import rhmapper as rm

    def logged(x, runs):
        with open(os.path.join(runs, str(x)), "a") as log:  # one line per execution
            log.write(f"{time.time()}\\n")
        time.sleep(0.05)
        return x * 3

    runs, checkpoint, crashing = sys.argv[1], sys.argv[2], sys.argv[3] == "crash"
    env = rm.Env(name="crashing", compute={"CPU": 0.5})
    here = rm.mapper(logged, replicas=2, env=env)
    hosted = rm.mapper(logged, replicas=2, env=env, on_cluster=True)
    spawned = hosted.spawn_map(range(400), name="durable_spawn", batch_size=1,
                               kwargs={"runs": os.path.join(runs, "spawned")},
                               checkpoint=os.path.join(checkpoint, "spawned"))
    values = []
    for count, value in enumerate(here.imap(range(400), batch_size=1, window=32,
                                            kwargs={"runs": os.path.join(runs, "imap")},
                                            checkpoint=os.path.join(checkpoint, "imap")), 1):
        values.append(value)
        if count == 150 and crashing:  # killed here, once the spawned map is well on
            while spawned.status().done < 250:
                time.sleep(0.1)
            print("HALF", flush=True)
            time.sleep(600)
    print(json.dumps({"imap": values, "spawned": spawned.results()}), flush=True)
"""


def runs_of(folder: Path) -> dict[int, list[float]]:
    return {x: [float(line) for line in (folder / str(x)).read_text().split()]
            if (folder / str(x)).exists() else [] for x in range(ITEMS)}


def test_a_killed_driver_and_a_stopped_cluster_lose_at_most_one_flush_interval(tmp_path):
    runs, checkpoint = tmp_path / "runs", tmp_path / "checkpoint"
    for folder in (runs / "imap", runs / "spawned"):
        folder.mkdir(parents=True)
    head = start_head(num_cpus=4)
    try:
        first = DriverProcess(MAPS, head.driver_env(RAY_ADDRESS=head.gcs_address),
                              str(runs), str(checkpoint), "crash")
        try:
            assert first.next_line(timeout=180) == "HALF"
            time.sleep(1.0)
        finally:
            crashed_at = time.time()
            first.kill()  # SIGKILL: the driver writes nothing more
        head.stop()  # the whole cluster: the host of the spawned map, every replica
        head = start_head(num_cpus=4)
        second = DriverProcess(MAPS, head.driver_env(RAY_ADDRESS=head.gcs_address),
                               str(runs), str(checkpoint), "resume")
        results = json.loads(second.finish(timeout=240).splitlines()[-1])
    finally:
        head.stop()
    expected = [3 * x for x in range(ITEMS)]
    assert results == {"imap": expected, "spawned": expected}
    for name in ("imap", "spawned"):
        runs_by_item = runs_of(runs / name)
        assert all(1 <= len(times) <= 2 for times in runs_by_item.values()), (
            name, {x: len(times) for x, times in runs_by_item.items() if not 1 <= len(times) <= 2})
        redone = {x: times[0] for x, times in runs_by_item.items() if len(times) == 2}
        kept = [x for x, times in runs_by_item.items() if len(times) == 1 and times[0] < crashed_at]
        assert len(kept) >= 100, f"{name}: only {len(kept)} items were saved before the crash"
        too_old = {x: round(crashed_at - at, 1) for x, at in redone.items()
                   if at < crashed_at - FLUSH_SECONDS - SLACK_SECONDS}
        assert not too_old, (f"{name}: items finished more than a flush interval before the "
                             f"crash ran again (seconds before it): {too_old}")
