"""Helpers shared by the operations tests: exported metric names, dashboard queries, Prometheus text parsing.

Ray exports metrics through its metrics agent (OpenTelemetry -> Prometheus) with these naming rules, checked
against a running instance: every name gets a ``ray_`` prefix; counters end in ``_total`` (added unless the name
already ends so); histograms appear as ``_bucket`` (with ``le``), ``_sum`` and ``_count``; gauges keep the name.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "emotion-serve.json"
RAY_PREFIX = "ray_"
SERVE_TAGS = frozenset({"deployment", "replica", "application"})


def exported_series(name: str, kind: str) -> set[str]:
    """Sample names Ray's metrics endpoint shows for a metric defined as ``name`` of ``kind``."""
    base = RAY_PREFIX + name
    if kind == "counter":
        return {base if base.endswith("_total") else base + "_total"}
    if kind == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


def project_series() -> dict[str, str]:
    """Every exported sample name of ``serve/metrics.py``'s metrics -> the metric's defined name."""
    from serve.metrics import METRICS

    return {series: spec.name for spec in METRICS for series in exported_series(spec.name, spec.kind)}


def ray_serve_builtin_series() -> set[str]:
    """Sample names Ray Serve's built-in metrics can export, read from the installed Ray Serve source.

    Every ``"serve_..."`` string literal in ``ray/serve`` is taken as a possible metric name (f-string names
    such as ``serve_num_{protocol_name}_requests`` are expanded for http and grpc); any kind's suffixes are
    allowed. This accepts a few non-metric strings, which is harmless for the question "could this be exported".
    """
    root = Path(ray.__file__).parent / "serve"
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for literal in re.findall(r"""["'](serve_[a-z0-9_{}]+)["']""", path.read_text(errors="ignore")):
            if "{" in literal:
                names.update(re.sub(r"\{[a-z_]+\}", proto, literal) for proto in ("http", "grpc"))
            else:
                names.add(literal)
    series: set[str] = set()
    for name in names:
        for kind in ("counter", "histogram", "gauge"):
            series |= exported_series(name, kind)
    return series


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    doc = json.loads(path.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


_METRIC_RE = re.compile(r"\b(ray_[a-zA-Z0-9_]+)")
_BY_RE = re.compile(r"\bby\s*\(([^)]*)\)")


def metric_names_in(exprs: Iterable[str]) -> set[str]:
    """Metric (sample) names referenced by PromQL expressions."""
    return {m for e in exprs for m in _METRIC_RE.findall(e)}


def grouping_labels_in(expr: str) -> set[str]:
    """Labels named in the ``by (...)`` clauses of one expression."""
    return {label.strip() for group in _BY_RE.findall(expr) for label in group.split(",") if label.strip()}


@dataclass(frozen=True)
class Sample:
    """One line of Prometheus text exposition."""

    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """All samples of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 1.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")
