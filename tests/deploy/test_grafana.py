"""deploy/grafana/qserve.json: a well-formed dashboard whose every query reads metrics (and labels) that a
live `qserve serve` exposes on /metrics, covering what an operator watches."""

from __future__ import annotations

import json
import re

import pytest
from conftest import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "qserve.json"
# Labels Prometheus adds at scrape time (ServiceMonitor), besides the ones qserve exports.
SCRAPE_LABELS = {"pod", "namespace", "instance", "job", "service", "container", "endpoint"}
FUNCTIONS = {"rate", "irate", "increase", "sum", "max", "min", "avg", "count", "histogram_quantile",
             "label_values", "clamp_min", "topk"}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (enough PromQL for dashboard queries)."""
    stripped = re.sub(r"\blabel_values\(([^,)]*),\s*\w+\)", r"label_values(\1)", expr)  # (metric, label)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", stripped):
        name, call = match.group(1), match.group(2)
        if call:
            assert name in FUNCTIONS, f"unknown PromQL function {name} in {expr}"
        elif name not in KEYWORDS:
            names.add(name)
    return names


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    labels |= set(re.findall(r"\{\{(\w+)\}\}", expr))
    labels |= set(re.findall(r"\blabel_values\([^,)]*,\s*(\w+)\)", expr))
    labels |= set(re.findall(r"(\w+)\s*=~?", "".join(re.findall(r"\{([^}]*)\}", expr))))
    return labels


def exposition(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s", line)
        out.setdefault(match.group(1), set()).update(re.findall(r"(\w+)=\"", match.group(2) or ""))
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title or variable, PromQL) of every query: panel targets and templating variables."""
    found = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"${var['name']}", var["query"]["query"]))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_metric_name_reader_finds_names_and_rejects_unknown_functions():
    expr = 'histogram_quantile(0.9, sum by (le, pod) (rate(a:b_bucket{model_name=~"$m"}[$__rate_interval])))'
    assert metric_names(expr) == {"a:b_bucket"}
    assert metric_names("sum(rate(x_total[5m])) / sum(rate(y_total[5m]))") == {"x_total", "y_total"}
    assert grouping_labels(expr) == {"le", "pod", "model_name"}
    assert metric_names("label_values(up, job)") == {"up"} and grouping_labels("label_values(up, job)") == {"job"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("frobnicate(x)")


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["uid"] == "qserve" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_covers_what_an_operator_watches(dashboard):
    read = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    wanted = {
        "request rate": "vllm:request_success_total",
        "TTFT": "vllm:time_to_first_token_seconds_bucket",
        "TPOT": "vllm:inter_token_latency_seconds_bucket",
        "e2e latency": "vllm:e2e_request_latency_seconds_bucket",
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "KV cache use": "vllm:kv_cache_usage_perc",
        "prefix-cache hit rate": "vllm:prefix_cache_hits_total",
        "preemptions": "vllm:num_preemptions_total",
        "tokens/s": "vllm:generation_tokens_total",
    }
    missing = {what: name for what, name in wanted.items() if name not in read}
    assert not missing
    quantile_exprs = [e for _, e in queries(dashboard) if "histogram_quantile" in e]
    assert {"0.5", "0.9", "0.99"} <= {re.search(r"histogram_quantile\(([\d.]+)", e).group(1) for e in quantile_exprs}


def test_every_query_reads_metrics_and_labels_a_live_server_exposes(dashboard, live_metrics):
    exposed = exposition(live_metrics)
    labels = set().union(*exposed.values()) | SCRAPE_LABELS
    for where, expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric read by {expr}"
        for name in names:
            assert name in exposed, f"{where}: {name} is not on a live qserve server's /metrics"
        unknown = grouping_labels(expr) - labels - {"__name__"}
        assert not unknown, f"{where}: labels {unknown} are on no exposed series"
