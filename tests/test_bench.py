"""Fast tests of the benchmark harness logic: maths, config rewriting, report writing. No timing asserts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.inputs import REPO_ROOT, TEXTS, MediaInputs
from bench.load import ENDPOINTS, check_loopback, encode_request, inspect_answer, missing_modalities, request_factory
from bench.machine import cpu_delta_by_label, summarize_gpu_samples
from bench.profile import NATIVE, classify, parse_collapsed, split_cpu
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
from bench.run import main as bench_main
from bench.run import parse_args, serve_overrides
from bench.servers import deep_merge, serve_config_for_bench
from bench.stats import LoadResult, best_ceiling, composite_ceiling, percentile, ratio
from bench.sweep import parse_args as sweep_parse_args
from bench.sweep import sweep_points


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
    assert "old" not in text and text.endswith("<!-- /section:bench -->\n")
    assert "| `/api/predict` | 1 |" in text  # one row per endpoint: Serve next to the naive server
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
    args = sweep_parse_args(["--sweep-batch-sizes", "8,64", "--sweep-waits", "0.005,0.02", "--sweep-replicas", "1,2"])
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
    assert audio["data"] == {"transcribe": "off"}  # the emotion path, as the naive server has it
    fused = request_factory(ENDPOINTS["fused"], media)(0)
    assert fused["data"] == {"text": TEXTS[0], "transcribe": "off"}
    assert [f[0] for f in fused["files"]] == ["audio", "video"]


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
    assert inspect_answer(answer.content, ENDPOINTS["video"]) == ([], {"video": 4, "audio": 1})  # raw body
    assert inspect_answer(b"<html>", ENDPOINTS["video"]) == (["unparseable"], {})


def test_encoded_requests_are_what_the_service_parses() -> None:
    """The load generator sends bodies encoded once: JSON for text, multipart with the right parts for media."""
    media = MediaInputs(b"RIFF1234", "tests/fixtures/speech.wav", b"mp4data", "tests/fixtures/face.mp4", "test")
    body, headers = encode_request(request_factory(ENDPOINTS["text"], media)(2))
    assert headers == {"Content-Type": "application/json"} and json.loads(body) == {"text": TEXTS[2]}
    body, headers = encode_request(request_factory(ENDPOINTS["fused"], media)(0))
    boundary = headers["Content-Type"].split("boundary=")[1]
    assert headers["Content-Type"].startswith("multipart/form-data")
    parts = body.split(b"--" + boundary.encode())[1:-1]
    names = [p.split(b'name="')[1].split(b'"')[0] for p in parts]
    assert names == [b"text", b"transcribe", b"audio", b"video"]
    assert b"RIFF1234" in parts[2] and b"mp4data" in parts[3] and TEXTS[0].encode() in parts[0]


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


def test_bench_run_sweep_batching_hands_over_to_bench_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr("bench.sweep.main", lambda argv: seen.append(argv) or 0)
    assert bench_main(["--sweep-batching", "--quick", "--sweep-waits", "0.01"]) == 0
    assert seen == [["--quick", "--sweep-waits", "0.01"]]
    quick = sweep_parse_args(["--quick"])
    assert quick.sweep_batch_sizes == [8, 32] and quick.sweep_waits == [0.01] and quick.requests == 16


def test_open_access_and_stem_options() -> None:
    args = parse_args(["--open-access", "--stem", "bench_gpu", "--ingress", "proxy"])
    assert args.stem == "bench_gpu" and args.ingress == "proxy"
    access = serve_overrides(args)["args"]["access"]
    assert access["api_keys"]["required"] is False and access["per_client"]["requests_per_minute"] is None
    assert parse_args([]).ingress == "haproxy" and serve_overrides(parse_args([])) == {}


def test_profile_stacks_are_split_by_hop() -> None:
    assert classify("run (asyncio/base_events.py:1);forward (torch/nn/modules/module.py:1)").startswith("forward")
    assert classify("a (uvicorn/protocols/http/httptools_impl.py:1);b (pydantic/main.py:2)").startswith("pydantic")
    assert classify("x (foo.py:1)") == "other Python"
    samples = parse_collapsed("a (uvicorn/server.py:1) 30\nb (torch/x.py:2);c (torch/y.py:3) 10\nbad line\n")
    assert samples == {"HTTP server (uvicorn)": 30, "forward (tokenise + model)": 10}
    # 40 samples at 100 Hz over 100 requests = 4 ms of Python per request, of 10 ms CPU: 6 ms is native
    split = split_cpu(10.0, samples, 100, 1.0, 100)
    assert split["HTTP server (uvicorn)"] == 3.0 and split["forward (tokenise + model)"] == 1.0 and split[NATIVE] == 6.0


GPU_SH = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def _gpu_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(GPU_SH), *args], check=False, capture_output=True, text=True, timeout=60)


def test_gpu_script_dry_run_prints_the_run() -> None:
    r = _gpu_sh("--dry-run")
    assert r.returncode == 0, r.stderr
    assert "pip install -q -r requirements.txt" in r.stdout
    bench = next(line for line in r.stdout.splitlines() if line.startswith("bench: "))
    assert "-m bench.run --device cuda --config deploy/serve_config.gpu.yaml --open-access" in bench
    assert "--concurrency 1,8,32,128" in bench and "--stem bench_gpu --out reports" in bench
    assert "reports/bench_gpu.md" in r.stdout and "time limit: 480s" in r.stdout
    r = _gpu_sh(
        "--dry-run",
        "--no-install",
        "--clients",
        "1,32",
        "--out",
        "/tmp/gpu run",
        "--endpoints",
        "text",
        "--duration",
        "2.5",
        "--time-limit",
        "300",
    )
    assert r.returncode == 0, r.stderr
    assert "install:" not in r.stdout
    assert "--concurrency 1,32 --endpoints text --duration 2.5" in r.stdout and "--out /tmp/gpu run" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--clients", "0,8"],
        ["--clients", "8,"],
        ["--clients"],
        ["--endpoints", "text,images"],
        ["--duration", "fast"],
        ["--time-limit", "8m"],
        ["--bogus"],
    ],
)
def test_gpu_script_rejects_bad_arguments(args: list[str]) -> None:
    r = _gpu_sh("--dry-run", *args)
    assert r.returncode == 2 and "usage: bash bench/gpu.sh" in r.stderr


def test_gpu_script_needs_a_gpu_unless_dry_run(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"  # an nvidia-smi that lists no GPU, first on PATH
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    r = subprocess.run(
        ["bash", str(GPU_SH), "--no-install"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    assert r.returncode == 3 and "no NVIDIA GPU" in r.stderr
    assert _gpu_sh("--help").returncode == 0


def test_launcher_env_adds_haproxy_and_keeps_overrides() -> None:
    from serve.launch import FAST_INGRESS_ENV, launch_env

    env = launch_env(base={"PATH": "/bin", "RAY_SERVE_ENABLE_HA_PROXY": "0"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the caller's setting wins
    assert (
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
        == FAST_INGRESS_ENV["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
    )
    plain = launch_env(plain_proxy=True, base={"PATH": "/bin", "PYTHONPATH": "/x"})
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in plain  # the plain proxy gets none of HAProxy's switches
    assert plain["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serve.proxy_replay:middlewares"
    assert plain["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/x"]  # the proxy can import the replay


def test_targets_cover_batch_and_media_endpoints() -> None:
    rows = [
        {
            "target": "serve",
            "endpoint": "text",
            "concurrency": 32,
            "vs_ceiling": 0.5,
            "vs_naive": 2.0,
            "mean_batch_size": {"text": 9.5},
        },
        {"target": "serve", "endpoint": "video", "concurrency": 32, "vs_naive": 0.98},
        {"target": "serve", "endpoint": "fused", "concurrency": 32, "vs_naive": 1.05},
    ]
    t = evaluate_targets(rows)
    assert t["text_32_vs_ceiling_met"] and t["text_32_vs_naive_met"] and t["text_32_mean_batch_met"]
    assert t["fused_32_vs_naive_met"] is True and t["video_32_vs_naive_met"] is False
    assert t["text_32_vs_ceiling_target"] == 0.4 and t["text_32_vs_naive_target"] == 1.5


def test_profile_and_levers_sections_render() -> None:
    from bench.report import levers_section, profile_section

    entry = {
        "label": "after",
        "note": "shipped",
        "ingress": "haproxy",
        "under_load": {
            "clients": 32,
            "throughput_rps": 250.0,
            "mean_batch_size": {"text": 10.0},
            "server_cpu_ms_per_request": 9.0,
            "by_hop": {"ingress": {"cpu_ms_per_request": 2.0, "split": {"HTTP server (uvicorn)": 0.5}}},
        },
        "single_request": {"p50_wall_ms": 14.0, "hops_ms (medians)": {"forward (tokenise + model)": 9.0}},
    }
    md = "\n".join(profile_section([entry]))
    assert "| **ingress** | **2.00** |" in md and "HTTP server (uvicorn) | 0.50 |" in md
    assert "| forward (tokenise + model) | 9.00 |" in md and "**14.00**" in md
    assert profile_section([]) == [] and levers_section(None) == []
    levers = {"method": "m", "rows": [{"lever": "x", "where": "y", "before": "1", "after": "2", "kept": "yes"}]}
    assert "| x | y | 1 | 2 | yes |" in "\n".join(levers_section(levers))


def test_render_only_rewrites_markdown_from_json(tmp_path: Path) -> None:
    results = _fake_results()
    rows = build_rows(results, ceilings_by_endpoint(_ceiling_rows()))
    report = {
        "meta": {"command": "python -m bench.run", "finished_at": "then", "machine": {"cpu_count": 2}},
        "ceiling": {"rows": _ceiling_rows()},
        "ceiling_by_endpoint": {},
        "results": rows,
        "targets": evaluate_targets(rows),
    }
    write_reports(report, tmp_path, results)
    (tmp_path / "bench.md").write_text("stale")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"entries": [{"label": "after", "single_request": {"p50_wall_ms": 12.5}}]}))
    assert bench_main(["--render-only", "--out", str(tmp_path), "--profile", str(profile)]) == 0
    md = (tmp_path / "bench.md").read_text()
    assert "| serve | `/api/predict` | 32 |" in md and "**12.50**" in md
    assert json.loads((tmp_path / "bench.json").read_text())["profile"][0]["label"] == "after"


def test_run_load_counts_answers_batches_and_errors() -> None:
    """The load generator against a small local server: every 5th answer is a 503, the rest report a batch."""
    from aiohttp import web

    from bench.load import run_load

    media = MediaInputs(b"RIFF", "speech.wav", b"mp4", "face.mp4", "test")
    seen: list[dict] = []

    async def predict(request: web.Request) -> web.Response:
        seen.append(await request.json())
        if len(seen) % 5 == 0:
            return web.json_response({"detail": "busy"}, status=503)
        return web.json_response({"modalities": {"text": {"batch_size": 3}}})

    async def scenario() -> LoadResult:
        app = web.Application()
        app.router.add_post("/api/predict", predict)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await run_load(f"http://127.0.0.1:{port}", ENDPOINTS["text"], media, 4, 40, 30.0, warmup=5)
        finally:
            await runner.cleanup()

    result = asyncio.run(scenario())
    assert len(seen) == 45 and {"text": TEXTS[0]} in seen  # warm-up requests are sent, not recorded
    assert sum(result.status_counts.values()) == 40 and result.errors == result.status_counts["503"] > 0
    assert len(result.latencies_ms) == result.status_counts["200"] == 40 - result.errors
    assert result.extra["mean_batch_size"] == {"text": 3.0} and result.error_samples[0].startswith("503")
