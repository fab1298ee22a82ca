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
        return (f"(py-spy could not read process {pid}: {why}; "
                "it needs ptrace rights: run as the same user, or with CAP_SYS_PTRACE in a "
                "container)")
    return calls_threads(done.stdout)


_dump_stack_task = ray.remote(num_cpus=0, max_retries=0)(dump_stack)


def stacks_of(processes: set[tuple[str | None, int]]) -> dict[tuple[str | None, int], str]:
    """`dump_stack` of each ``(node_id, pid)``, taken on its node, all at once.

    Examples:
        >>> import os, ray
        >>> here = (ray.get_runtime_context().get_node_id(), 2**22 + 7)
        >>> stacks_of({here})[here]
        '(py-spy could not read process 4194311: ...)'
    """
    refs = {}
    for node_id, pid in processes:
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else None
        refs[(node_id, pid)] = _dump_stack_task.options(scheduling_strategy=strategy).remote(pid)
    stacks = {}
    for process, ref in refs.items():
        try:
            stacks[process] = ray.get(ref, timeout=PY_SPY_SECONDS + 30)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as error:
            stacks[process] = f"(the stack of process {process[1]} could not be taken: {error})"
    return stacks
