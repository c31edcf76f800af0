"""Encoder deployment classes in-process (their Python class, outside Serve): batching, errors, hot swap.

``@serve.batch`` asks the replica context for ``max_ongoing_requests``; a stand-in context is patched in.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models.checkpoint import DEFAULT_WEIGHTS_DIR
from models.inference import EncoderResult, Prepared
from models.labels import EMOTIONS
from serve.encoders import AudioEncoder, TextEncoder, VideoEncoder
from serve.schemas import EncoderAnswer

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.serve

    fake = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: fake)


def check_answer(result: dict[str, Any], modality: str) -> None:
    assert "error" not in result, result
    EncoderAnswer.model_validate(result)  # the typed answer the ingress validates
    assert result["modality"] == modality
    assert len(result["embedding"]) == 256 and np.isfinite(result["embedding"]).all()
    assert list(result["probabilities"]) == list(EMOTIONS)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["emotion"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["latency_ms"] >= result["model_ms"] > 0 and result["decode_ms"] > 0
    assert result["batch_size"] >= 1 and result["model_version"]


def test_audio_encoder_batches_concurrent_requests() -> None:
    async def scenario() -> list[dict[str, Any]]:
        enc = AudioEncoder.func_or_class({"encoder": {"max_batch_size": 4}})
        await enc.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.5})
        speech = (FIXTURES / "speech.wav").read_bytes()
        return await asyncio.gather(*(enc(speech) for _ in range(4)))

    results = asyncio.run(scenario())
    for r in results:
        check_answer(r, "audio")
        assert r["duration_s"] == pytest.approx(5.0, abs=0.05)
    assert max(r["batch_size"] for r in results) >= 2
    first = results[0]["embedding"]
    assert all(np.allclose(r["embedding"], first, atol=1e-4) for r in results)  # padding does not change answers


def test_encode_many_answers_each_item_in_order_from_shared_forwards() -> None:
    async def scenario() -> list[dict[str, Any]]:
        enc = AudioEncoder.func_or_class({"encoder": {"max_batch_size": 4}})
        await enc.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.2})
        speech = (FIXTURES / "speech.wav").read_bytes()
        return await enc.encode_many([speech, b"", speech, speech])  # one call from the ingress, four requests

    results = asyncio.run(scenario())
    assert len(results) == 4 and results[1]["error"]["code"] == "empty_media"  # a bad item fails alone
    for r in (results[0], results[2], results[3]):
        check_answer(r, "audio")
    assert max(r["batch_size"] for r in (results[0], results[2], results[3])) >= 2
    assert asyncio.run(AudioEncoder.func_or_class().encode_many("not a list"))[0]["error"]["code"] == "bad_payload"


def test_bad_input_is_an_error_dict_not_an_exception() -> None:
    async def scenario() -> dict[str, dict[str, Any]]:
        enc = AudioEncoder.func_or_class()
        await enc.reconfigure({})
        return {
            "corrupt": await enc((FIXTURES / "corrupt.mp4").read_bytes()),
            "empty": await enc(b""),
            "no_audio": await enc((FIXTURES / "face_noaudio.mp4").read_bytes()),
            "wrong_type": await enc("some text"),
            "fine": await enc((FIXTURES / "face.mp4").read_bytes()),  # still serves after all that
        }

    out = asyncio.run(scenario())
    assert out["corrupt"]["error"]["code"] == "decode_error" and out["corrupt"]["error"]["status"] == 400
    assert out["empty"]["error"]["code"] == "empty_media"
    assert out["no_audio"]["error"] == {
        "code": "no_audio_stream",
        "message": "the file has no audio track",
        "status": 400,
    }
    assert out["wrong_type"]["error"]["code"] == "bad_payload"
    check_answer(out["fine"], "audio")


def test_video_encoder_still_image() -> None:
    async def scenario() -> dict[str, Any]:
        enc = VideoEncoder.func_or_class({"limits": {"num_frames": 16}})
        await enc.reconfigure(None)
        return await enc((FIXTURES / "face.png").read_bytes())

    result = asyncio.run(scenario())
    check_answer(result, "video")
    assert result["frames"] == 1 and result["face_detected"] is True
    assert result["face_score"] > 0 and result["face_detector"] == "hog"  # the detector's score reaches the answer


def test_hot_swap_keeps_in_flight_requests(tmp_path: Path) -> None:
    new_dir = tmp_path / "audio-v2"
    shutil.copytree(DEFAULT_WEIGHTS_DIR / "audio", new_dir)
    config = json.loads((new_dir / "config.json").read_text())
    config["metadata"]["version"] = "audio-hot-swapped"
    (new_dir / "config.json").write_text(json.dumps(config))
    speech = (FIXTURES / "speech.wav").read_bytes()

    async def scenario() -> tuple[list[dict[str, Any]], Any, Any, dict[str, Any]]:
        enc = AudioEncoder.func_or_class()
        await enc.reconfigure({"batch_wait_timeout_s": 0.01})
        before = enc._pipeline
        stop = asyncio.Event()
        results: list[dict[str, Any]] = []

        async def client() -> None:
            while not stop.is_set():
                results.append(await enc(speech))

        clients = [asyncio.create_task(client()) for _ in range(3)]
        await asyncio.sleep(0.3)
        await enc.reconfigure({"weights_dir": str(new_dir), "batch_wait_timeout_s": 0.01})
        for _ in range(300):  # until some answers come from the new weights (bounded)
            if sum(r.get("model_version") == "audio-hot-swapped" for r in results) >= 3:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*clients)
        return results, before, enc._pipeline, await enc.info()

    results, before, after, info = asyncio.run(scenario())
    assert after is not before
    assert all("error" not in r for r in results), [r for r in results if "error" in r][:2]
    versions = [r["model_version"] for r in results]
    assert versions[-1] == "audio-hot-swapped" and before.version in versions
    assert info["version"] == "audio-hot-swapped" and info["weights_dir"] == str(new_dir)


class SlowTextPipeline:
    """A text pipeline whose forward takes ``forward_s`` (so calls overlap) and records each batch's size."""

    version, device, precision = "text-fake", "cpu", "float32"

    def __init__(self, forward_s: float) -> None:
        self.forward_s = forward_s
        self.batches: list[int] = []

    def prepare(self, payload: str) -> Prepared:
        return Prepared(payload, {"characters": len(payload)})

    def encode(self, items: list[Prepared]) -> list[EncoderResult]:
        time.sleep(self.forward_s)
        self.batches.append(len(items))
        probs = np.full(len(EMOTIONS), 1 / len(EMOTIONS), dtype=np.float32)
        return [EncoderResult(np.ones(256, dtype=np.float32), probs, dict(it.info)) for it in items]


def test_an_idle_replica_encodes_a_lone_call_at_once_and_batches_the_rest() -> None:
    """A lone call skips the batch queue and its wait; calls arriving meanwhile, and lists, still batch."""
    wait_s = 0.5

    async def scenario() -> tuple[float, list[dict[str, Any]], list[dict[str, Any]], list[int]]:
        enc = TextEncoder.func_or_class({"encoder": {"max_batch_size": 4, "max_ongoing_requests": 16}})
        pipeline = SlowTextPipeline(forward_s=0.05)
        enc._pipeline, enc._pipeline_key = pipeline, (None, None, None)  # the defaults' key: reconfigure keeps it
        await enc.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": wait_s})
        start = time.perf_counter()
        lone = await enc("alone")
        lone_s = time.perf_counter() - start
        assert lone["batch_size"] == 1
        concurrent = await asyncio.gather(*(enc(f"text {i}") for i in range(5)))
        listed = await enc.encode_many([f"listed {i}" for i in range(4)])
        return lone_s, list(concurrent), listed, pipeline.batches

    lone_s, concurrent, listed, batches = asyncio.run(scenario())
    assert lone_s < wait_s / 2  # did not wait for a batch to fill
    assert [r["batch_size"] for r in concurrent] == [1, 4, 4, 4, 4]  # the first alone, the others in one forward
    assert [r["batch_size"] for r in listed] == [4, 4, 4, 4]  # a list call's items always share a forward
    assert batches == [1, 1, 4, 4]
