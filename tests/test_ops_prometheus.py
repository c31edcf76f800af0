"""Monitoring proven against Debian's real Prometheus: the dashboard's queries and the alert rules.

Without a live service (seconds): ``promtool`` accepts ``deploy/prometheus/prometheus.yml`` and its rule file, and
``promtool test rules deploy/prometheus/alerts_test.yml`` fires and resolves every alert on synthetic series.

With one (the local two-node Ray on 127.0.0.1 that ``test_ops_serve.py`` uses after this module,
``tests.ops_helpers.SharedOpsCluster``: the head runs the dashboard, which writes the service-discovery file, and
the cluster runs ``deploy/serve_config.yaml``, started fresh for this module; and Prometheus started with
``prometheus.yml``, overridden only in intervals and paths), after two rounds of requests of every kind (a fused
one, a dropped modality and a 422 among them) and a short live stream each:

1. Prometheus finds its targets through this Ray session's service-discovery file, all on loopback, and scrapes
   the head node's metrics;
2. every query of every dashboard panel, variables substituted, returns a finite value, non-zero except where
   a healthy idle service reads 0 (errors, queues), and the mean batch size is at least 1;
3. every recorded signal behind the alerts returns a finite value, every rule evaluates without error, and the
   healthy service fires none of the alerts that do not depend on this machine's speed;
4. last, video-only traffic moves the video series of the per-modality latency panel and leaves text's flat.

Skipped, with the reason, when Prometheus is not installed (``apt-get install -y prometheus``; tests/run_all.sh
does it when it can).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.ops_helpers import (
    DASHBOARD,
    FIXTURES,
    PROMETHEUS_DIR,
    Prometheus,
    SharedOpsCluster,
    dashboard_queries,
    dashboard_variables,
    finite_values,
    grafana_substitute,
    prometheus_test_config,
    send_all_kinds,
    send_stream,
    wait_for,
)

NO_PROMETHEUS = (
    "Debian's Prometheus is not installed: `apt-get install -y prometheus` (tests/run_all.sh does it as root)"
)
INTERVAL_S = SharedOpsCluster.METRICS_INTERVAL_S  # scrape, rule evaluation and Ray's metrics export (production 10 s)
ROUNDS = 2  # the first round creates the series, the second moves them: rate() and quantiles need both
SETTLE_S = 60  # how long the exported counts may take to reach Prometheus
ALERTS = PROMETHEUS_DIR / "alerts.yml"
# Alerts a healthy service must not even have pending; the latency one depends on this shared machine's speed.
QUIET_ALERTS = (
    "EmotionEndpointErrorRatioHigh",
    "EmotionModalityDroppedOften",
    "EmotionEncoderNoHealthyReplica",
    "EmotionAutoscalerPinnedAtMax",
)
# Queries that read 0 on a healthy, idle service (no 5xx, no exception in a replica, nothing queued): every other
# one must show a non-zero value, so a rate over a counter that never moves fails too.
ZERO_WHEN_HEALTHY = {
    ("Error rate (share of requests)", "A"),
    ("Requests per deployment (Serve replicas)", "B"),
    ("Queued requests at handles", "A"),
    ("Queued requests at handles", "B"),
    ("Open live streams", "A"),
    ("Transcripts per second, and dropped ones by reason", "B"),
    ("Ingress replicas reading Serve's router state", "B"),
}  # every live stream has ended; no transcript dropped; no ingress replica on the fallback
LATENCY_PANEL = "Encoder latency per modality (p50/p95/p99)"
THROUGHPUT_PANEL = "Encoder throughput per modality"
VIDEO_REQUESTS = 3


def _promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip(NO_PROMETHEUS)
    return subprocess.run([binary, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_config_and_the_rules() -> None:
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The production file names Ray's service-discovery path, which need not exist here: only that is tolerated.
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout + config.stderr
    assert yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["rule_files"] == ["alerts.yml"]


def test_promtool_unit_tests_fire_and_resolve_every_alert() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has a case where it fires and a later one where it has resolved.
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in {r["alert"] for r in _rules() if "alert" in r}:
        mine = sorted((c for c in cases if c["alertname"] == name), key=lambda c: _minutes(c["eval_time"]))
        fired = [i for i, c in enumerate(mine) if c["exp_alerts"]]
        assert fired and any(not c["exp_alerts"] for c in mine[fired[0] + 1 :]), f"{name}: no fire-then-resolve case"


def _rules() -> list[dict]:
    """Every rule of alerts.yml (recording and alerting)."""
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def _minutes(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(value) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


# --- the live service and Prometheus ---------------------------------------------------------------------------


@dataclass
class Live:
    """The running application, the Prometheus scraping it, and the traffic it was sent."""

    base_url: str
    app_name: str
    sd_file: Path
    node_target: str
    prometheus: Prometheus
    encoded: Counter[str]  # inputs each encoder answered, from the responses


def _encoded(answers: dict[str, httpx.Response]) -> Counter[str]:
    """Inputs answered per encoder (one observation each of its latency histogram)."""
    bodies = [r.json() for r in answers.values() if r.status_code == 200]
    return Counter(m for body in bodies for m in body.get("modalities", {}))


def _encoder_counts(live: Live, at: float | None = None) -> Counter[str]:
    """Per modality, the encoder latency histogram's count as Prometheus has it."""
    series = live.prometheus.query(
        f'sum by (modality) (ray_emotion_encoder_latency_ms_count{{application="{live.app_name}"}})', at
    )
    return Counter({s["metric"]["modality"]: round(float(s["value"][1])) for s in series})


def _settle(live: Live) -> None:
    """Wait until Prometheus has scraped every encoder observation the responses account for."""
    wait_for(
        lambda: _encoder_counts(live) == live.encoded,
        SETTLE_S,
        1,
        f"Prometheus to hold the encoder counts {dict(live.encoded)}",
    )


def _sd_targets(sd_file: Path) -> set[str]:
    try:
        return {t for group in yaml.safe_load(sd_file.read_text()) for t in group["targets"]}
    except (OSError, yaml.YAMLError, TypeError):
        return set()


@pytest.fixture(scope="module")
def live(ops_cluster: SharedOpsCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The application on the shared cluster, Prometheus scraping it, and two rounds of traffic."""
    if shutil.which("prometheus") is None:
        pytest.skip(NO_PROMETHEUS)
    # Fresh: the counts compared below are this module's traffic only, on the config as shipped.
    ops = ops_cluster.get(__name__, fresh=True)
    # Ray rewrites the file every 5 s; the node's exporter is listed once the node has registered it.
    wait_for(lambda: ops.head_target in _sd_targets(ops.sd_file), 60, 1, f"{ops.head_target} in {ops.sd_file}")
    config = prometheus_test_config(ops.sd_file, f"{INTERVAL_S}s")
    prometheus = Prometheus(config, tmp_path_factory.mktemp("prometheus"))
    try:
        svc = Live(ops.base_url, ops.app_name, ops.sd_file, ops.head_target, prometheus, Counter())
        for _ in range(ROUNDS):
            answers = send_all_kinds(ops.base_url)
            assert [k for k, r in answers.items() if r.status_code != 200] == ["empty_text"], answers
            svc.encoded += _encoded(answers)
            stream = send_stream(ops.base_url)  # a short live stream: the stream panels get data too
            svc.encoded += Counter(m for update in stream.updates for m in update["modalities"])
            _settle(svc)
        yield svc
    finally:
        prometheus.stop()


def _variables(live: Live, window_s: float) -> dict[str, str]:
    """Values for the dashboard's variables as Grafana would send them, with every option selected.

    ``$application`` comes from the variable's own ``label_values`` query; ``$modality`` from its custom
    options; ``$__rate_interval`` and ``$__range`` span ``window_s`` (a panel zoomed to the traffic).
    """
    variables = dashboard_variables()
    definition = variables["application"]["definition"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition).groups()
    applications = live.prometheus.api(f"label/{label}/values", **{"match[]": metric})
    assert live.app_name in applications, (definition, applications)
    window = f"{max(int(window_s), 4 * INTERVAL_S)}s"
    return {
        "application": "|".join(applications),
        "modality": "|".join(variables["modality"]["query"].split(",")),
        "__rate_interval": window,
        "__range": window,
    }


def test_prometheus_finds_the_service_through_rays_service_discovery_file(live: Live) -> None:
    def targets() -> list[dict]:
        active = live.prometheus.api("targets", state="active")["activeTargets"]
        return (
            active if any(t["labels"]["instance"] == live.node_target and t["health"] == "up" for t in active) else []
        )

    active = wait_for(targets, 30, 1, f"{live.node_target} scraped")
    assert {t["labels"]["instance"] for t in active} == _sd_targets(live.sd_file)
    for target in active:
        assert target["labels"]["job"] == "ray", target["labels"]
        assert target["discoveredLabels"]["__meta_filepath"] == str(live.sd_file)
        assert target["labels"]["instance"].startswith("127.0.0.1:"), target["labels"]
    up = live.prometheus.query(f'up{{job="ray", instance="{live.node_target}"}}')
    assert finite_values(up) == [1.0]


def _dashboard_results(live: Live) -> dict[tuple[str, str], tuple[str, list[float]]]:
    """(panel, refId) -> (the query as sent, its finite values), over everything Prometheus has scraped so far."""
    at = time.time()
    values = _variables(live, at - live.prometheus.started + INTERVAL_S)
    results = {}
    for q in dashboard_queries(DASHBOARD):
        expr = grafana_substitute(q.expr, values)
        results[(q.panel, q.ref)] = (expr, finite_values(live.prometheus.query(expr, at)))
    return results


def _without_data(results: dict[tuple[str, str], tuple[str, list[float]]]) -> list[str]:
    """Queries with no finite value, or only zeros where traffic should show."""
    return [
        f"{panel} [{ref}]: {expr} -> {finite}"
        for (panel, ref), (expr, finite) in results.items()
        if not finite or ((panel, ref) not in ZERO_WHEN_HEALTHY and not any(finite))
    ]


def test_every_dashboard_query_returns_data(live: Live) -> None:
    results = _dashboard_results(live)
    assert len(results) >= 25 and ZERO_WHEN_HEALTHY <= set(results)
    # A wrong query (label, metric, `le`, a counter that never moves) stays empty; a few intervals absorb lag.
    deadline = time.monotonic() + 5 * INTERVAL_S
    while _without_data(results) and time.monotonic() < deadline:
        time.sleep(INTERVAL_S)
        results = _dashboard_results(live)
    assert not _without_data(results), "dashboard queries without data:\n" + "\n".join(_without_data(results))
    # Values that must make sense, not only exist: a mean batch holds at least one input.
    _, means = results[("Batch size per encoder (mean and p95)", "A")]
    assert min(means) >= 1.0, means


def test_alert_signals_have_data_and_the_healthy_service_fires_none(live: Live) -> None:
    rules = _rules()
    records = [r["record"] for r in rules if "record" in r]
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert set(QUIET_ALERTS) <= alerts

    def evaluated() -> list[dict]:
        found = [r for g in live.prometheus.api("rules")["groups"] for r in g["rules"]]
        return found if found and all(r["health"] != "unknown" for r in found) else []

    found = wait_for(evaluated, 30, 1, "every rule evaluated")
    assert sorted(r["name"] for r in found) == sorted(r.get("record") or r["alert"] for r in rules)
    assert all(r["health"] == "ok" for r in found), [(r["name"], r.get("lastError")) for r in found]

    def signals_without_data() -> list[str]:
        return [name for name in records if not finite_values(live.prometheus.query(name))]

    try:
        wait_for(lambda: not signals_without_data(), 5 * INTERVAL_S, INTERVAL_S, "every recorded signal")
    except AssertionError:
        pytest.fail(f"recorded signals without a finite value: {signals_without_data()}")
    replicas = live.prometheus.query(
        f'application_deployment:serve_replicas_healthy:sum{{application="{live.app_name}"}}'
    )
    assert {s["metric"]["deployment"] for s in replicas} >= {"TextEncoder", "AudioEncoder", "VideoEncoder"}
    assert all(float(s["value"][1]) >= 1 for s in replicas), replicas
    active = [a for a in live.prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] in QUIET_ALERTS]
    assert not active, active


def test_video_traffic_moves_the_video_latency_series_only(live: Live) -> None:
    _settle(live)
    t_a = time.time()
    before = _encoder_counts(live, t_a)
    time.sleep(2 * INTERVAL_S)  # samples before the video traffic inside the window that ends after it
    face = (FIXTURES / "face.mp4").read_bytes()
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        answers = {
            f"video{i}": http.post("/predict/video", files={"file": ("face.mp4", face, "video/mp4")})
            for i in range(VIDEO_REQUESTS)
        }
    assert all(r.status_code == 200 for r in answers.values()), answers
    live.encoded += _encoded(answers)
    _settle(live)
    # Evaluate at t_b, over the window (t_b - int(t_b - t_a), t_b]: after t_a, and at least Grafana's minimum.
    t_b = max(time.time(), t_a + 4 * INTERVAL_S + 1)
    time.sleep(max(0.0, t_b - time.time()))
    after = _encoder_counts(live, t_b)
    assert after["text"] == before["text"] > 0, (before, after)
    assert after["video"] == before["video"] + VIDEO_REQUESTS, (before, after)

    # The panels as Grafana draws them over a window that holds only the video traffic.
    values = _variables(live, t_b - t_a)
    for query in (q for q in dashboard_queries() if q.panel == LATENCY_PANEL):
        result = live.prometheus.query(grafana_substitute(query.expr, values), t_b)
        series = {s["metric"]["modality"]: s for s in result}
        assert finite_values([series["video"]]), (query.ref, series)  # the video line is drawn from the new traffic
        assert "text" not in series or not finite_values([series["text"]]), (query.ref, series)  # text: no new point
    (throughput,) = [q for q in dashboard_queries() if q.panel == THROUGHPUT_PANEL]
    rates = {
        s["metric"]["modality"]: float(s["value"][1])
        for s in live.prometheus.query(grafana_substitute(throughput.expr, values), t_b)
    }
    assert rates["video"] > 0 and rates.get("text", 0.0) == 0.0, rates
