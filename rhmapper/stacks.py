"""The Python stacks of replica processes, as ``ray stack`` takes them: ``py-spy dump`` (py-spy
ships with ``ray[default]``), run by a zero-CPU Ray task on the node where each process runs, so
that it works for replicas on any node and from a driver over Ray Client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rhmapper.diagnosis import calls_threads

PY_SPY_SECONDS = 10.0
"""The most one ``py-spy dump`` may take."""
TASK_START_SECONDS = 20.0
"""... and the most the tasks running them may wait to start."""


def dump_stack(pid: int) -> str:
    """The threads of process ``pid`` (on this node) that run rhmapper's calls, as ``py-spy
    dump`` shows them (see `rhmapper.diagnosis.calls_threads`); or, in parentheses, why they
    could not be read.

    Examples:
        >>> dump_stack(2**22 + 7)  # no such process
        '(py-spy could not read process 4194311: ...)'
    """
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        return ("(py-spy is not installed where the replica runs: `pip install py-spy` there; "
                "ray[default] brings it)")
    try:
        done = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=PY_SPY_SECONDS)
    except subprocess.TimeoutExpired:
        return f"(py-spy took over {PY_SPY_SECONDS:.0f} s to read process {pid})"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        why = next((line for line in said if line.startswith("Error")), said[0] if said else
                   f"exit code {done.returncode}")
        if "ermission" in why or "ptrace" in why:
            why += ("; py-spy needs ptrace rights: run as the same user, or with "
                    "CAP_SYS_PTRACE in a container")
        return f"(py-spy could not read process {pid}: {why})"
    return calls_threads(done.stdout)


_dump_stack_task = ray.remote(num_cpus=0, max_retries=0)(dump_stack)


def stacks_of(processes: set[tuple[str | None, int]]) -> dict[tuple[str | None, int], str]:
    """`dump_stack` of each ``(node_id, pid)``, taken on its node, all at once, within
    `PY_SPY_SECONDS` plus `TASK_START_SECONDS` in all.

    Examples:
        >>> import os, ray
        >>> here = (ray.get_runtime_context().get_node_id(), 2**22 + 7)
        >>> stacks_of({here})[here]
        '(py-spy could not read process 4194311: ...)'
    """
    stacks, refs = {}, {}
    for node_id, pid in processes:
        if node_id is None:  # not probed: a pid on another node would be another process
            stacks[(node_id, pid)] = f"(the node of process {pid} is not known yet)"
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        refs[_dump_stack_task.options(scheduling_strategy=strategy).remote(pid)] = (node_id, pid)
    if not refs:
        return stacks
    ready, late = ray.wait(list(refs), num_returns=len(refs),
                           timeout=PY_SPY_SECONDS + TASK_START_SECONDS)
    for ref in late:
        ray.cancel(ref)
        stacks[refs[ref]] = (f"(the stack of process {refs[ref][1]} was not taken within "
                             f"{PY_SPY_SECONDS + TASK_START_SECONDS:.0f} s)")
    for ref in ready:
        try:
            stacks[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError as error:
            stacks[refs[ref]] = f"(the stack of process {refs[ref][1]} could not be taken: {error})"
    return stacks
