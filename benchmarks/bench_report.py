"""The markdown report of benchmarks/bench.py: the set-up, one table per workload, the
targets, the errors. Pure formatting of the result records bench.py collects."""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, List, Optional

import ray

from bench_contenders import ACTOR_CPUS, NUM_ACTORS, RAY_CPUS
from bench_workloads import Workload

Results = Dict[tuple, Dict[str, Any]]  # (workload, contender) -> result record


def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return "—"
    return f"{r:,.0f}"


def short_error(err: str, n: int = 90) -> str:
    err = err.replace("|", "/").replace("\n", " ")
    return err if len(err) <= n else err[: n - 1] + "…"


def setup_line(args) -> str:
    return (f"Ray {ray.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} host cores, ray.init(num_cpus={RAY_CPUS}), "
            f"{NUM_ACTORS} actors x num_cpus={ACTOR_CPUS}, median of {args.repeats} run(s), "
            f"optimum split: {args.optimum_split}, {args.chunks_per_slot} chunk(s) per actor slot.")


def workload_table(name: str, wl: Workload, by: Results, args,
                   loads: Optional[Dict[str, tuple]]) -> List[str]:
    """The section of one workload: its description, load averages, one row a contender.

    The ratio column divides by the workload's baseline (the optimum; for vector, the
    hand-written ActorPool over chunks)."""
    out: List[str] = []
    opt = by.get((name, wl.baseline), {}).get("median")
    out.append(f"### {name}: {wl.description}")
    out.append("")
    if loads and name in loads:
        out.append(f"(1-minute load average {loads[name][0]:.1f} before, "
                   f"{loads[name][1]:.1f} after this workload)")
        out.append("")
    out.append(f"| contender | median s | items/s | ratio to {wl.baseline} |")
    out.append("|---|---:|---:|---:|")
    for cname in args.contenders:
        r = by.get((name, cname))
        if r is None:
            continue
        if r.get("error") and not r["times"]:
            out.append(f"| {cname} | error | — | {short_error(r['error'])} |")
            continue
        med = r.get("median")
        ratio = f"{med / opt:.2f}" if (opt and med is not None) else "—"
        if r.get("error"):
            ratio += f" (then: {short_error(r['error'], 60)})"
        out.append(f"| {cname} | {fmt_s(med)} | {fmt_rate(r.get('items_per_s'))} | {ratio} |")
    out.append("")
    return out


def targets_table(by: Results) -> List[str]:
    """The issue's targets: measured ratio, goal, PASS / FAIL / n/a."""
    def ratio(w, c):
        a = by.get((w, c), {}).get("median")
        o = by.get((w, "optimum"), {}).get("median")
        return a / o if (a is not None and o) else None

    targets = [
        ("tiny: rhmapper / optimum", ratio("tiny", "rhmapper"), "<=", 2.0),
        ("sleep: rhmapper / optimum", ratio("sleep", "rhmapper"), "<=", 1.05),
        ("cpu: rhmapper / optimum", ratio("cpu", "rhmapper"), "<=", 1.1),
        ("skew: rhmapper / optimum", ratio("skew", "rhmapper"), "<=", 0.6),
    ]
    ap = by.get(("tiny", "actorpool"), {}).get("median")
    for contender, goal in (("rhmapper_compiled_b1", 1.5), ("rhmapper_b1", None)):
        b1 = by.get(("tiny", contender), {}).get("median")
        targets.append((f"tiny: {contender} throughput / actorpool throughput",
                        (ap / b1) if (b1 and ap is not None) else None, ">=", goal))
    with_timeout, plain = ratio("tiny", "rhmapper_timeout"), ratio("tiny", "rhmapper")
    targets.append(("tiny: rhmapper with timeout= / without",
                    with_timeout / plain if (with_timeout and plain) else None, "<=", 2.0))
    targets.extend(vector_targets(by))
    for workload in ("tiny", "sleep", "cpu"):  # issue 23: what the Ray metrics cost
        with_metrics = by.get((workload, "rhmapper"), {}).get("median")
        without = by.get((workload, "rhmapper_no_metrics"), {}).get("median")
        targets.append((f"{workload}: rhmapper (metrics on) / rhmapper_no_metrics",
                        with_metrics / without if (with_metrics and without) else None,
                        "<=", 1.02))
    out = ["### Targets", "", "| target | measured | goal | result |", "|---|---:|---:|---|"]
    for label, val, op, goal in targets:
        if goal is None:  # reported beside a target, not one itself
            if val is not None:
                out.append(f"| {label} | {val:.2f} | — | (for comparison) |")
            continue
        if val is None:
            verdict, shown = "n/a (not measured)", "—"
        else:
            ok = val <= goal if op == "<=" else val >= goal
            verdict, shown = ("PASS" if ok else "FAIL"), f"{val:.2f}"
        out.append(f"| {label} | {shown} | {op} {goal} | {verdict} |")
    out.append("")
    return out


def throughput_ratio(by: Results, workload: str, a: str, b: str) -> Optional[float]:
    """Contender a's throughput over contender b's on one workload (b's time / a's)."""
    ta = by.get((workload, a), {}).get("median")
    tb = by.get((workload, b), {}).get("median")
    return tb / ta if (ta and tb is not None) else None


def vector_targets(by: Results) -> List[tuple]:
    """Issue 20's targets for batched model inference, as throughput ratios in one run,
    with the hand-chunked rhmapper beside them for comparison."""
    rows = [(f"vector: rhmapper_batched throughput / {other} throughput",
             throughput_ratio(by, "vector", "rhmapper_batched", other), ">=", goal)
            for other, goal in (("actorpool_chunks", 0.95), ("ray_data", 3.0),
                                ("rhmapper_b1", 5.0))]
    rows.append(("vector: rhmapper_chunks throughput / actorpool_chunks throughput",
                 throughput_ratio(by, "vector", "rhmapper_chunks", "actorpool_chunks"),
                 ">=", None))
    return rows


def errors_section(results: List[Dict[str, Any]]) -> List[str]:
    errors = [r for r in results if r.get("error")]
    if not errors:
        return []
    return (["### Errors", ""] + [f"- {r['workload']}/{r['contender']}: {r['error']}" for r in errors]
            + [""])


def report(workloads: Dict[str, Workload], results: List[Dict[str, Any]], args,
           loads: Optional[Dict[str, tuple]] = None) -> str:
    by = {(r["workload"], r["contender"]): r for r in results}
    out: List[str] = [setup_line(args), ""]
    for name, wl in workloads.items():
        out.extend(workload_table(name, wl, by, args, loads))
    out.extend(targets_table(by))
    out.extend(errors_section(results))
    return "\n".join(out)
