"""The LitServe target of the benchmark: its ratios and targets in the report, its sweep's choice, its skip when
litserve is missing, and its LitAPIs' batching and answer shape (fake pipelines, no server). No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.load import ENDPOINTS, inspect_answer
from bench.report import build_rows, evaluate_targets, readme_block, render_markdown, results_table
from bench.stats import LoadResult
from models.inference import EncoderResult, FusionResult, Prepared


def _results(serve_rps: float, lit_rps: float, serve_p50: float, lit_p50: float) -> list[LoadResult]:
    out = []
    for target, rps, p50 in (("serve", serve_rps, serve_p50), ("litserve", lit_rps, lit_p50), ("naive", 50.0, 20.0)):
        for clients in (1, 32):
            n = 100
            out.append(
                LoadResult(
                    target,
                    "text",
                    clients,
                    [p50 * (1 if clients == 1 else 4)] * n,
                    errors=0,
                    elapsed_s=n / (rps if clients == 32 else 1000.0 / p50),
                    extra={"path": "/api/predict"},
                )
            )
    return out


def _meta(notes: list[str] | None = None) -> dict[str, Any]:
    return {
        "command": "python -m bench.run",
        "finished_at": "now",
        "notes": notes or [],
        "machine": {"cpu_count": 2, "cpu_model": "x", "gpu": [], "commit": "abc", "memory_gib": 1.0},
        "servers": {
            "litserve-text": {"config": {"litserve": {"workers": 2, "max_batch_size": 32, "batch_timeout": 0.0}}}
        },
    }


def test_serve_is_compared_with_litserve_per_cell() -> None:
    rows = build_rows(_results(300.0, 250.0, 12.0, 11.0), {})
    assert [r["target"] for r in rows[:2]] == ["serve", "serve"] and rows[2]["target"] == "litserve"
    serve32 = next(r for r in rows if r["target"] == "serve" and r["concurrency"] == 32)
    serve1 = next(r for r in rows if r["target"] == "serve" and r["concurrency"] == 1)
    assert serve32["vs_litserve"] == pytest.approx(1.2, abs=1e-3)
    assert serve1["p50_vs_litserve"] == pytest.approx(12.0 / 11.0, abs=1e-3)
    t = evaluate_targets(rows)
    assert t["text_32_vs_litserve_met"] is True
    assert t["text_1_p50_vs_litserve_met"] is True  # 1.09 <= 1.1
    slower = evaluate_targets(build_rows(_results(240.0, 250.0, 13.0, 11.0), {}))
    assert slower["text_32_vs_litserve_met"] is False and slower["text_1_p50_vs_litserve_met"] is False
    assert evaluate_targets([])["text_32_vs_litserve_met"] is None


def test_litserve_column_in_tables_and_readme() -> None:
    results = _results(300.0, 250.0, 12.0, 11.0)
    rows = build_rows(results, {})
    report = {
        "meta": _meta(["the machine was busy when the run started (1-min load average 9 on 2 cores)"]),
        "ceiling": {},
        "ceiling_by_endpoint": {},
        "results": rows,
        "targets": evaluate_targets(rows),
        "litserve_sweep": {
            "method": "one setting at a time",
            "points": [
                {"settings": {"workers": 2}, "throughput_rps_32": 250.0, "mean_batch_32": 9.0, "p50_ms_1": 11.0},
                {"settings": {"workers": 1}, "throughput_rps_32": 150.0, "mean_batch_32": 20.0, "p50_ms_1": 11.5},
            ],
            "best": {"workers": 2},
        },
    }
    assert "× LitServe" in results_table(rows) and "| litserve | `/api/predict` | 32 |" in results_table(rows)
    md = render_markdown(report)
    assert "LitServe settings in this run: one server per endpoint, 2 worker processes" in md
    assert "| 2 | – | – | – | 250.0 | 9.0 | 11.0 | **yes** |" in md
    assert "| 1 | – | – | – | 150.0 | 20.0 | 11.5 |  |" in md
    block = readme_block(report)
    assert "(busy: shared with other jobs)" in block
    row = next(line for line in block.splitlines() if line.startswith("| `/api/predict` | 32 |"))
    assert row == "| `/api/predict` | 32 | 300.0 | 250.0 | 50.0 | 48.0 | 44.0 |"
    assert "text Serve/LitServe 1.20 (≥ 1.0, met)" in block and "text p50 Serve/LitServe 1.09 (≤ 1.1, met)" in block


def test_sweep_picks_the_fastest_then_the_quickest_alone() -> None:
    from bench.litserve_sweep import pick_best, points

    assert len(points()) == len({json.dumps(p, sort_keys=True) for p in points()})  # no point twice
    keys = {"workers", "max_batch_size", "batch_timeout", "torch_threads", "fast_queue"}
    assert all(set(p) == keys for p in points())
    results = [
        {"settings": {"workers": 2}, "throughput_rps_32": 300.0, "p50_ms_1": 14.0},
        {"settings": {"workers": 1}, "throughput_rps_32": 290.0, "p50_ms_1": 12.0},  # within 5 %, quicker alone
        {"settings": {"workers": 3}, "throughput_rps_32": 200.0, "p50_ms_1": 9.0},  # quickest, but far slower
        {"settings": {"workers": 4}, "error": "did not start"},
    ]
    assert pick_best(results) == {"workers": 1}
    assert pick_best([{"settings": {}, "error": "x"}]) is None


def test_chosen_settings_come_from_the_sweep(tmp_path: Path) -> None:
    from bench.litserve_server import DEFAULT_SETTINGS, chosen_settings, settings_args

    assert chosen_settings(tmp_path / "none.json") == DEFAULT_SETTINGS
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"best": {"workers": 3, "batch_timeout": 0.005, "unknown": 1}}))
    chosen = chosen_settings(sweep)
    assert chosen["workers"] == 3 and chosen["batch_timeout"] == 0.005 and "unknown" not in chosen
    args = settings_args({**chosen, "fast_queue": False, "endpoints": ["text"]})
    assert args[args.index("--workers") + 1] == "3" and args[args.index("--batch-timeout") + 1] == "0.005"
    assert "--no-fast-queue" in args and args[-2:] == ["--endpoints", "text"]


def test_litserve_target_is_skipped_with_a_note_when_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.run

    monkeypatch.setattr(bench.run, "litserve_available", lambda: False)
    assert bench.run.main(["--targets", "litserve", "--endpoints", "text", "--out", str(tmp_path)]) == 0
    notes = json.loads((tmp_path / "bench.json").read_text())["meta"]["notes"]
    assert any("litserve target skipped: litserve is not installed" in n for n in notes)
    assert "litserve target skipped" in (tmp_path / "bench.md").read_text()


class _FakePipeline:
    """Records the batches it encodes; answers a fixed emotion per modality."""

    def __init__(self, best: int) -> None:
        self.best = best
        self.batches: list[int] = []
        self.version = f"fake{best}"

    def prepare(self, payload: Any) -> Prepared:
        return Prepared(payload)

    def encode(self, items: list[Prepared]) -> list[EncoderResult]:
        self.batches.append(len(items))
        probs = np.full(7, 0.05)
        probs[self.best] = 0.7
        return [EncoderResult(np.zeros(4), probs) for _ in items]


class _FakeFusion:
    version = "fusion"

    def fuse(self, embeddings: dict[str, Any], probabilities: dict[str, Any]) -> FusionResult:
        probs = np.mean(list(probabilities.values()), axis=0)
        return FusionResult(probs, {m: 1.0 / len(embeddings) for m in embeddings})


def test_litapi_batches_each_modality_and_answers_like_the_service() -> None:
    pytest.importorskip("litserve")
    from bench.litserve_server import FusedAPI, TextAPI, VideoAPI

    video = VideoAPI(max_batch_size=8, batch_timeout=0.0, device="cpu", torch_threads=1)
    video.pipelines = {"audio": _FakePipeline(1), "video": _FakePipeline(2)}
    video.fusion = _FakeFusion()

    class Upload:
        def __init__(self, data: bytes) -> None:
            import io

            self.file = io.BytesIO(data)

    items = [video.decode_request({"file": Upload(b"mp4")}) for _ in range(3)]
    answers = video.unbatch(video.predict(video.batch(items)))
    assert video.pipelines["video"].batches == [3] and video.pipelines["audio"].batches == [3]
    body = json.dumps(video.encode_response(answers[0])).encode()
    missing, batches = inspect_answer(body, ENDPOINTS["video"])
    assert missing == [] and batches == {"audio": 3, "video": 3}
    assert answers[0]["contributions"] == {"audio": 0.5, "video": 0.5}

    text = TextAPI(max_batch_size=8, batch_timeout=0.0, device="cpu", torch_threads=1)
    text.pipelines = {"text": _FakePipeline(3)}
    (answer,) = text.predict([text.decode_request({"text": "hi"})])
    assert answer["emotion"] == "happy" and answer["contributions"] == {"text": 1.0}

    fused = FusedAPI(max_batch_size=8, batch_timeout=0.0, device="cpu", torch_threads=1)
    fused.pipelines = {"text": _FakePipeline(3), "audio": _FakePipeline(1), "video": _FakePipeline(2)}
    fused.fusion = _FakeFusion()
    mixed = [
        fused.decode_request({"text": "hi", "audio": Upload(b"wav"), "video": Upload(b"mp4")}),
        fused.decode_request({"text": "  ", "video": Upload(b"mp4")}),  # blank text counts as absent
    ]
    out = fused.predict(mixed)
    assert fused.pipelines["video"].batches == [2] and fused.pipelines["text"].batches == [1]
    assert set(out[0]["modalities"]) == {"text", "audio", "video"} and set(out[1]["modalities"]) == {"video"}


def test_sweep_point_keeps_its_best_pass() -> None:
    from bench.litserve_sweep import best_of

    runs = [
        {"settings": {"workers": 2}, "throughput_rps_32": 14.0, "mean_batch_32": 13.0, "p50_ms_1": 12.0},
        {"settings": {"workers": 2}, "throughput_rps_32": 300.0, "mean_batch_32": 11.0, "p50_ms_1": 30.0},
    ]
    point = best_of(runs)
    assert point["throughput_rps_32"] == 300.0 and point["mean_batch_32"] == 11.0 and point["p50_ms_1"] == 12.0
    assert point["passes"] == runs
    failed = best_of([{"settings": {"workers": 9}, "error": "x"}])
    assert failed["error"] == "x" and "throughput_rps_32" not in failed
