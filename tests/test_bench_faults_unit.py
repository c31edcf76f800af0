"""``bench.faults`` and ``bench.cluster`` without Ray: the gap and loss accounting, the docs table, the spread
config and the process bookkeeping that finds Ray processes left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import cluster, faults
from bench.soak import Record


def _record(kind: str, end: float, status: int | None) -> Record:
    return Record(kind, "/api/predict", end - 0.5, end, status)


def test_longest_gap_counts_answers_only_and_the_edges() -> None:
    records = [_record("text", 1.0, 200), _record("text", 2.0, None), _record("text", 6.0, 422)]
    assert faults.gap_span(records, 0.0, 7.0) == (1.0, 6.0)  # the unanswered request at 2.0 is no answer
    assert faults.longest_gap(records, 0.0, 7.0) == 5.0
    assert faults.longest_gap([], 0.0, 3.0) == 3.0
    assert faults.longest_gap(records, 0.0, 1.5) == 1.0  # before a fault at 1.5: only what ended by then


def test_summary_counts_no_answer_and_5xx_as_lost_and_keeps_the_probe_apart() -> None:
    load = faults.Load.__new__(faults.Load)
    load.run, load.t0, load.clients, load.probe = faults.Run(), 0.0, 2, True
    for record in [
        _record("text", 1.0, 200),
        _record("blank_text", 1.5, 422),
        _record(faults.PROBE, 2.0, 503),
        _record("audio", 3.0, None),
    ]:
        load.run.add(record)
    summary = faults.summarize(load, 4.0, 2.0, 3.5)
    assert summary["lost"] == 2 and {r["kind"] for r in summary["lost_requests"]} == {faults.PROBE, "audio"}
    assert summary["requests"] == 4 and summary["mixed_requests"] == 3
    assert summary["capacity_back_s"] == 1.5
    assert summary["longest_gap_before_fault_s"] == 1.0


def test_docs_table_is_rewritten_between_its_markers(tmp_path: Path) -> None:
    doc = tmp_path / "ops.md"
    doc.write_text(f"before\n{faults.TABLE_START}\nold\n{faults.TABLE_END}\nafter\n")
    scenario = {
        "clients": 4,
        "probe": True,
        "requests": 10,
        "mixed_requests": 3,
        "lost": 0,
        "longest_gap_s": 4.64,
        "longest_gap_before_fault_s": 0.2,
        "capacity_back_s": None,
    }
    assert faults.update_docs({"scenarios": {"worker_node_loss": scenario}}, doc)
    text = doc.read_text()
    assert "old" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "| `worker_node_loss` | 4 + text probe | 10 (3) | 0 | 4.6 s | 0.2 s | - |" in text
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not faults.update_docs({"scenarios": {"worker_node_loss": scenario}}, plain)
    assert plain.read_text() == "no markers\n"


def test_spread_config_puts_each_deployment_once_per_node_behind_one_proxy() -> None:
    config = cluster.spread_config(8123)
    app = config["applications"][0]
    assert config["proxy_location"] == "HeadOnly"
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert app["name"] == cluster.APP_NAME
    assert {d["name"] for d in app["deployments"]} == {
        "TextEncoder",
        "AudioEncoder",
        "VideoEncoder",
        "Transcriber",
        "FusionIngress",
    }
    assert all(
        d["max_replicas_per_node"] == 1 and d["autoscaling_config"]["min_replicas"] == 2 for d in app["deployments"]
    )
    changed = cluster.changed_version(config)
    assert changed["applications"][0]["args"] != app["args"]  # a new code version: every replica replaced
    assert changed["applications"][0]["deployments"] == app["deployments"]


def test_process_tree_and_alive_follow_a_child_and_its_end() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tree = cluster.process_tree(os.getpid())
        assert child.pid in tree
        assert cluster.alive({child.pid: tree[child.pid]}) == {child.pid: tree[child.pid]}
        assert cluster.alive({child.pid: "0"}) == {}  # another start time: a later process reusing the pid
    finally:
        child.kill()
        child.wait()
    assert cluster.alive({child.pid: tree[child.pid]}) == {}
