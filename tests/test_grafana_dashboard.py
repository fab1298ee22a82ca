"""docs/grafana_dashboard.json charts rhmapper's Ray metrics, all of them and only them, through
the dashboard's Prometheus data source variable, each query filtered by the ``mapper`` variable.

No Ray: the metrics are read from rhmapper/metrics.py's source (importing it would define Ray
metrics), so renaming, adding or removing one there without updating the dashboard fails here.
Prometheus names them ``ray_<name>``, with ``_total`` for counters, ``_bucket``/``_count`` for
histograms (their ``_sum`` is not exact in Ray, so the dashboard does not use it) and no suffix for
gauges.
"""

from __future__ import annotations

import json
import os
import re

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD_PATH = os.path.join(REPO_DIR, "docs", "grafana_dashboard.json")
METRICS_PATH = os.path.join(REPO_DIR, "rhmapper", "metrics.py")

DATASOURCE = "${datasource}"
MAPPER_FILTER = 'mapper=~"$mapper"'
SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_count"), "Gauge": ("",)}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}

_CONSTRUCTOR = re.compile(r"(?<![\w.])(Counter|Gauge|Histogram)\(")  # not collections.Counter
_DEFINITION = re.compile(r'(?<![\w.])(Counter|Gauge|Histogram)\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^{}]*)\}")
_RHMAPPER_NAME = re.compile(r"\bray_rhmapper_[A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{?(\w+)")


def defined_metrics(source: str) -> dict[str, str]:
    """The metrics that ``source`` (metrics.py's text) defines: {name: kind}, the name as given
    to ``Counter(``/``Gauge(``/``Histogram(`` as their first argument."""
    definitions = _DEFINITION.findall(source)
    assert len(definitions) == len(_CONSTRUCTOR.findall(source)), (
        "a metric of metrics.py is not defined with a string literal as its first argument")
    metrics: dict[str, str] = {}
    for kind, name in definitions:
        assert name not in metrics, f"metric {name} defined twice"
        metrics[name] = kind
    return metrics


def exported_names(metrics: dict[str, str]) -> dict[str, str]:
    """Each Prometheus series name the dashboard may query: {series name: metric name}."""
    return {f"ray_{name}{suffix}": name
            for name, kind in metrics.items() for suffix in SUFFIXES[kind]}


def datasource_uid(datasource) -> str | None:
    """The data source a panel, target or variable names (a name or a {type, uid} reference)."""
    return datasource.get("uid") if isinstance(datasource, dict) else datasource


def targets(dashboard: dict) -> list[tuple[str, dict]]:
    """(panel title, target) of every panel's every target, panels in rows included."""
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    return [(panel["title"], target) for panel in panels for target in panel.get("targets", [])]


def variables(dashboard: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def expression_problems(dashboard: dict, metrics: dict[str, str]) -> list[str]:
    """What is wrong with the dashboard's queries, given the ``metrics`` defined."""
    allowed = exported_names(metrics)
    charted: set[str] = set()
    problems = []
    for title, target in targets(dashboard):
        expr = target["expr"]
        selectors = _SELECTOR.findall(expr)
        if not selectors:
            problems.append(f"{title}: no metric selector in {expr!r}")
        for name, matchers in selectors:
            if name not in allowed:
                problems.append(f"{title}: {name} is not a series of a metric of metrics.py "
                                f"with its kind's suffix")
            else:
                charted.add(allowed[name])
            if MAPPER_FILTER not in matchers:
                problems.append(f"{title}: {name}{{{matchers}}} does not filter {MAPPER_FILTER}")
        bare = set(_RHMAPPER_NAME.findall(expr)) - {name for name, _ in selectors}
        if bare:
            problems.append(f"{title}: {sorted(bare)} queried without a label filter")
        if "sum by (" not in expr and "sum without (" not in expr:
            problems.append(f"{title}: {expr!r} does not sum away the labels of Ray's processes")
        if "_bucket{" in expr and not ("histogram_quantile(" in expr
                                       and re.search(r"by \([^)]*\ble\b", expr)):
            problems.append(f"{title}: buckets not read by histogram_quantile by le")
    for name in sorted(set(metrics) - charted):
        problems.append(f"metric {name} ({metrics[name]}) is charted by no panel")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD_PATH, encoding="utf-8") as file:
        return json.load(file)


@pytest.fixture(scope="module")
def metrics_source() -> str:
    with open(METRICS_PATH, encoding="utf-8") as file:
        return file.read()


def test_metrics_are_read_from_metrics_py(metrics_source):
    metrics = defined_metrics(metrics_source)
    assert set(metrics.values()) == set(SUFFIXES)
    assert metrics["rhmapper_items_done"] == "Counter"
    assert metrics["rhmapper_item_seconds"] == "Histogram"
    assert metrics["rhmapper_backlog_items"] == "Gauge"


def test_dashboard_is_rhmappers(dashboard):
    assert dashboard["title"] == "rhmapper" and dashboard["uid"] == "rhmapper"
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])


def test_datasource_variable(dashboard):
    datasource = variables(dashboard)["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert datasource_uid(variable["datasource"]) == DATASOURCE, variable["name"]


def test_mapper_variable(dashboard, metrics_source):
    mapper = variables(dashboard)["mapper"]
    assert mapper["type"] == "query" and mapper["multi"] and mapper["includeAll"]
    query = mapper["query"]["query"]
    assert query == mapper["definition"]
    assert re.fullmatch(r"label_values\(ray_rhmapper_items_done_total(\{.*\})?, mapper\)", query)
    names = exported_names(defined_metrics(metrics_source))
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            for name in _RHMAPPER_NAME.findall(variable["query"]["query"]):
                assert name in names, f"variable {variable['name']} queries {name}"


def test_every_query_uses_the_datasource_variable(dashboard):
    for panel in dashboard["panels"]:
        assert datasource_uid(panel["datasource"]) == DATASOURCE, panel["title"]
    for title, target in targets(dashboard):
        assert datasource_uid(target.get("datasource", DATASOURCE)) == DATASOURCE, title


def test_queries_chart_exactly_the_metrics_of_metrics_py(dashboard, metrics_source):
    assert expression_problems(dashboard, defined_metrics(metrics_source)) == []


def test_queries_use_only_the_dashboards_variables(dashboard):
    known = set(variables(dashboard)) | GRAFANA_VARIABLES
    for title, target in targets(dashboard):
        assert set(_VARIABLE.findall(target["expr"])) <= known, title


@pytest.mark.parametrize("renamed", ["rhmapper_items_done", "rhmapper_call_seconds",
                                     "rhmapper_backlog_items"])
def test_a_metric_renamed_in_metrics_py_fails(dashboard, metrics_source, renamed):
    source = metrics_source.replace(f'"{renamed}"', f'"{renamed}_renamed"')
    problems = expression_problems(dashboard, defined_metrics(source))
    assert f"metric {renamed}_renamed" in "\n".join(problems)
    assert any(f"ray_{renamed}" in problem for problem in problems)
