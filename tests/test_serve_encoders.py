"""Encoder deployment classes in-process (their Python class, outside Serve): batching, errors, hot swap.

``@serve.batch`` asks the replica context for ``max_ongoing_requests``; a stand-in context is patched in.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models.checkpoint import DEFAULT_WEIGHTS_DIR
from models.labels import EMOTIONS
from serve.encoders import AudioEncoder, VideoEncoder
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
