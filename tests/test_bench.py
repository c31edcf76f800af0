"""Fast tests of the benchmark harness logic: maths, config rewriting, report writing. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.inputs import TEXTS, MediaInputs
from bench.load import ENDPOINTS, check_loopback, inspect_answer, missing_modalities, request_factory
from bench.machine import cpu_delta_by_label, summarize_gpu_samples
from bench.report import (
    README_TABLE_END,
    README_TABLE_START,
    build_rows,
    ceilings_by_endpoint,
    evaluate_targets,
    readme_block,
    update_readme,
    write_reports,
)
from bench.run import parse_args, sweep_points
from bench.servers import deep_merge, serve_config_for_bench
from bench.stats import LoadResult, best_ceiling, composite_ceiling, percentile, ratio


@pytest.mark.parametrize("q", [0, 1, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = list(np.random.default_rng(0).exponential(10.0, size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert np.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_load_result_summary() -> None:
    r = LoadResult("serve", "text", 8, [10.0, 20.0, 30.0, 40.0], errors=1, elapsed_s=2.0, status_counts={"200": 4})
    s = r.summary()
    assert s["requests_ok"] == 4 and s["errors"] == 1
    assert s["throughput_rps"] == 2.0
    assert s["p50_ms"] == 25.0
    empty = LoadResult("naive", "audio", 1, [], errors=3, elapsed_s=1.0).summary()
    assert empty["throughput_rps"] == 0.0 and empty["p99_ms"] is None


def test_composite_ceiling_and_ratio() -> None:
    # 1/100 + 1/50 s per request -> 33.3 requests/s
    assert composite_ceiling({"text": 100.0, "audio": 50.0}, ["text", "audio"]) == pytest.approx(100 / 3)
    assert composite_ceiling({"text": 100.0}, ["text", "video"]) is None
    assert ratio(30.0, 10.0) == 3.0
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None


def _ceiling_rows() -> list[dict]:
    rows = []
    for modality, base in (("text", 100.0), ("audio", 20.0), ("video", 10.0)):
        for bs, factor in ((1, 1.0), (8, 3.0), (32, 2.5)):
            rows.append(
                {
                    "modality": modality,
                    "batch_size": bs,
                    "forward_items_per_s": base * factor * 2,
                    "e2e_items_per_s": base * factor,
                    "forward_ms_per_batch": 1.0,
                    "prepare_ms_per_item": None,
                }
            )
    rows.append(
        {
            "modality": "fusion",
            "batch_size": 1,
            "forward_items_per_s": 1e9,
            "e2e_items_per_s": 1e9,
            "forward_ms_per_batch": 0.0,
            "prepare_ms_per_item": None,
        }
    )
    return rows


def _fake_results() -> list[LoadResult]:
    out = []
    for target, thr in (("serve", 270.0), ("naive", 60.0)):
        for c in (1, 8, 32):
            n = 100
            out.append(
                LoadResult(
                    target, "text", c, [5.0 + c] * n, errors=0, elapsed_s=n / thr, extra={"path": "/api/predict"}
                )
            )
    return out


def test_rows_ratios_and_targets() -> None:
    rows_c = _ceiling_rows()
    assert best_ceiling(rows_c, "text") == 300.0
    ceilings = ceilings_by_endpoint(rows_c)
    assert ceilings["text"] == pytest.approx(300.0, rel=1e-3)
    assert ceilings["video"] == pytest.approx(1 / (1 / 30 + 1 / 60), rel=1e-3)  # video + its audio track
    rows = build_rows(_fake_results(), ceilings)
    serve32 = next(r for r in rows if r["target"] == "serve" and r["concurrency"] == 32)
    assert serve32["vs_ceiling"] == pytest.approx(0.9, abs=1e-3)
    assert serve32["vs_naive"] == pytest.approx(4.5, abs=1e-3)
    assert rows[0]["target"] == "serve"  # Serve rows first
    targets = evaluate_targets(rows)
    assert targets["text_32_vs_ceiling_met"] is True and targets["text_32_vs_naive_met"] is True
    assert evaluate_targets([])["text_32_vs_naive_met"] is None


def test_write_reports_and_readme(tmp_path: Path) -> None:
    results = _fake_results()
    ceilings = ceilings_by_endpoint(_ceiling_rows())
    results[0].extra["answers_missing_modalities"] = {"audio": 2}
    results[2].extra["server_cpu_breakdown_ms_per_request"] = {"ray::ProxyActor": 3.5, "ray::ServeController": 0.4}
    rows = build_rows(results, ceilings)
    report = {
        "meta": {
            "command": "python -m bench.run --quick",
            "finished_at": "now",
            "device": "cpu",
            "serve_config": "deploy/serve_config.yaml",
            "inputs": {},
            "notes": ["a note"],
            "machine": {"cpu_count": 2, "cpu_model": "x", "gpu": [], "commit": "abc123", "memory_gib": 1.0},
        },
        "ceiling": {"rows": _ceiling_rows(), "torch_threads": 2, "device": "cpu"},
        "ceiling_by_endpoint": ceilings,
        "results": rows,
        "targets": evaluate_targets(rows),
    }
    paths = write_reports(report, tmp_path, results)
    data = json.loads(paths["json"].read_text())
    assert len(data["results"]) == 6 and len(data["raw_latencies_ms"]) == 6
    md = paths["md"].read_text()
    assert (
        "| serve | `/api/predict` | 32 |" in md
        and "abc123" in md
        and "2 cores" in md
        and "a note" in md
        and "2 without audio" in md
    )
    assert "ray::ProxyActor 3.5" in md
    assert paths["png"].stat().st_size > 1000
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n<!-- section:bench -->\n{README_TABLE_START}\nold\n{README_TABLE_END}\n<!-- /section:bench -->\n"
    )
    assert update_readme(readme, readme_block(report))
    text = readme.read_text()
    assert "old" not in text and "| naive | `/api/predict` | 1 |" in text and text.endswith("<!-- /section:bench -->\n")
    (tmp_path / "bare.md").write_text("no markers\n")
    assert not update_readme(tmp_path / "bare.md", "x")


def test_serve_config_rewrite() -> None:
    config = {
        "http_options": {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 60},
        "applications": [
            {
                "name": "emotion",
                "import_path": "serve.app:build_app",
                "args": {"encoders": {"text": {"max_batch_size": 16, "max_ongoing_requests": 32}}},
                "deployments": [{"name": "TextEncoder", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}],
            }
        ],
    }
    out = serve_config_for_bench(
        config,
        12345,
        {
            "args": {"encoders": {"text": {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}}},
            "deployments": {
                "TextEncoder": {"autoscaling_config": {"max_replicas": 1}},
                "AudioEncoder": {"num_replicas": 1},
            },
        },
    )
    assert out["http_options"] == {"host": "127.0.0.1", "port": 12345, "request_timeout_s": 60}
    app = out["applications"][0]
    assert app["args"]["encoders"]["text"] == {
        "max_batch_size": 32,
        "max_ongoing_requests": 32,
        "batch_wait_timeout_s": 0.01,
    }
    assert app["deployments"][0]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}
    assert app["deployments"][1] == {"name": "AudioEncoder", "num_replicas": 1}
    assert config["http_options"]["port"] == 8000  # the original is untouched
    assert deep_merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_sweep_points_keep_batch_within_ongoing() -> None:
    args = parse_args(
        ["--sweep-batching", "--sweep-batch-sizes", "8,64", "--sweep-waits", "0.005,0.02", "--sweep-replicas", "1,2"]
    )
    config = {"applications": [{"args": {"encoders": {"text": {"max_ongoing_requests": 32}}}}]}
    points = sweep_points(args, config)
    assert len(points) == 8
    for p in points:
        assert p["max_batch_size"] <= p["max_ongoing_requests"]
        assert p["overrides"]["deployments"]["TextEncoder"]["autoscaling_config"]["max_replicas"] == p["replicas"]
    assert {p["max_ongoing_requests"] for p in points} == {32, 64}


def test_quick_defaults_and_loopback_only() -> None:
    quick = parse_args(["--quick"])
    assert quick.requests < parse_args([]).requests and quick.concurrency == [1, 8, 32]
    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError):
        check_loopback("http://example.com:8000")


def test_request_shapes() -> None:
    media = MediaInputs(b"RIFF", "tests/fixtures/speech.wav", b"mp4", "tests/fixtures/face.mp4", "test")
    assert request_factory(ENDPOINTS["text"], media)(1) == {"json": {"text": TEXTS[1]}}
    audio = request_factory(ENDPOINTS["audio"], media)(0)
    assert audio["files"][0] == ("file", ("speech.wav", b"RIFF", "audio/wav"))
    fused = request_factory(ENDPOINTS["fused"], media)(0)
    assert fused["data"] == {"text": TEXTS[0]} and [f[0] for f in fused["files"]] == ["audio", "video"]


def test_gpu_sample_parsing() -> None:
    assert summarize_gpu_samples([]) is None
    s = summarize_gpu_samples(["50, 1000", "100, 2000", "garbage", "[N/A], 5"])
    assert s == {"gpu_util_mean_pct": 75.0, "gpu_util_max_pct": 100.0, "gpu_mem_max_mib": 2000.0, "gpu_samples": 2}


def test_missing_modalities() -> None:
    full = httpx.Response(200, json={"modalities": {"text": {}, "audio": {}, "video": {}}})
    partial = httpx.Response(200, json={"modalities": {"video": {}}, "dropped": {"audio": "timeout"}})
    assert missing_modalities(full, ENDPOINTS["fused"]) == []
    assert missing_modalities(partial, ENDPOINTS["video"]) == ["audio"]
    assert missing_modalities(httpx.Response(200, text="not json"), ENDPOINTS["text"]) == ["unparseable"]


def test_inspect_answer_batch_sizes() -> None:
    answer = httpx.Response(200, json={"modalities": {"video": {"batch_size": 4}, "audio": {"batch_size": 1}}})
    assert inspect_answer(answer, ENDPOINTS["video"]) == ([], {"video": 4, "audio": 1})


def test_cpu_delta_survives_replaced_processes() -> None:
    before = {1: ("serve", 10.0), 2: ("ray::ServeReplica:app:TextEncoder", 50.0), 3: ("ray::ProxyActor", 5.0)}
    after = {
        1: ("serve", 10.5),
        4: ("ray::ServeReplica:app:TextEncoder", 2.0),
        3: ("ray::ProxyActor", 6.0),
        5: ("ray::ServeReplica:app:TextEncoder", 1.0),
    }
    assert cpu_delta_by_label(before, after) == pytest.approx(
        {"serve": 0.5, "ray::ServeReplica:app:TextEncoder": 3.0, "ray::ProxyActor": 1.0}
    )
