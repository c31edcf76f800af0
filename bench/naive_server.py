"""The naive baseline: the same models behind one single-process FastAPI app, no batching, no deployments.

This is the seed's design, kept small and honest: every request runs ``prepare`` and a batch-of-one
``encode`` for each modality it carries, in FastAPI's worker threadpool (plain ``def`` endpoints, as
FastAPI recommends for blocking code), then ``FusionPipeline.fuse`` when two or more modalities answered
(one modality answers with its encoder's own prediction, as the service does). Endpoints and the response shape
match the Serve application's REST API so the load generator treats both the same way.

Run: ``python -m bench.naive_server --port 8100`` (``BENCH_DEVICE=cuda`` to use a GPU).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from pydantic import BaseModel

from models.inference import (
    AudioPipeline,
    EmptyTextError,
    EncoderResult,
    FusionPipeline,
    TextPipeline,
    VideoPipeline,
    combine,
)
from models.labels import EMOTIONS
from models.media import MediaError, NoAudioStreamError


class TextRequest(BaseModel):
    """Body of ``POST /api/predict``."""

    text: str


class NaiveModels:
    """All four pipelines in this one process."""

    def __init__(self, device: str = "cpu") -> None:
        self.text = TextPipeline(device=device)
        self.audio = AudioPipeline(device=device)
        self.video = VideoPipeline(device=device)
        self.fusion = FusionPipeline(device=device)
        self.version = "+".join(p.version for p in (self.text, self.audio, self.video, self.fusion))

    def predict(
        self,
        text: str | None = None,
        audio: bytes | None = None,
        video: bytes | None = None,
        audio_from_video: bool = False,
    ) -> dict[str, Any]:
        """Run every given modality one after another with batch size 1, then fuse."""
        start = time.perf_counter()
        jobs: list[tuple[str, Any, Any]] = []
        if text is not None:
            jobs.append(("text", self.text, text))
        if audio is not None:
            jobs.append(("audio", self.audio, audio))
        if video is not None:
            jobs.append(("video", self.video, video))
            if audio is None and audio_from_video:
                jobs.append(("audio", self.audio, video))
        results: dict[str, EncoderResult] = {}
        modalities: dict[str, dict[str, Any]] = {}
        dropped: dict[str, str] = {}
        for name, pipeline, payload in jobs:
            t0 = time.perf_counter()
            try:
                result = pipeline.encode([pipeline.prepare(payload)])[0]
            except EmptyTextError as exc:
                raise HTTPException(422, str(exc)) from exc
            except NoAudioStreamError as exc:
                if name == "audio" and audio is None:  # a video without an audio track: audio is just absent
                    dropped[name] = str(exc)
                    continue
                raise HTTPException(400, str(exc)) from exc
            except MediaError as exc:
                if len(jobs) > 1:
                    dropped[name] = str(exc)
                    continue
                raise HTTPException(400, str(exc)) from exc
            results[name] = result
            modalities[name] = {
                "emotion": result.emotion,
                "confidence": result.confidence,
                "probabilities": _probs(result.probabilities),
                "latency_ms": round((time.perf_counter() - t0) * 1000.0, 2),
                "batch_size": 1,
                **result.info,
            }
        if not results:
            raise HTTPException(400, {"message": "no modality could be used", "dropped": dropped})
        combined = combine(results, self.fusion)
        probs, contributions = combined.probabilities, combined.contributions
        best = int(probs.argmax())
        return {
            "emotion": EMOTIONS[best],
            "confidence": float(probs[best]),
            "probabilities": _probs(probs),
            "contributions": contributions,
            "modalities": modalities,
            "dropped": dropped,
            "model_version": self.version,
            "latency_ms": round((time.perf_counter() - start) * 1000.0, 2),
        }


def _probs(values: Any) -> dict[str, float]:
    return {name: float(v) for name, v in zip(EMOTIONS, values, strict=True)}


def create_app(device: str | None = None) -> FastAPI:
    """The naive FastAPI app; models load once at import of the app, in this process."""
    models = NaiveModels(device or os.environ.get("BENCH_DEVICE", "cpu"))
    app = FastAPI(title="Naive emotion server (benchmark baseline)")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": {"text": True, "audio": True, "video": True, "fusion": True}}

    @app.post("/api/predict")
    def predict_text(body: TextRequest) -> dict[str, Any]:
        return models.predict(text=body.text)

    @app.post("/predict/audio")
    def predict_audio(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        return models.predict(audio=file.file.read())

    @app.post("/predict/video")
    def predict_video(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        return models.predict(video=file.file.read(), audio_from_video=True)

    @app.post("/predict")
    def predict_fused(
        text: Annotated[str | None, Form()] = None,
        audio: Annotated[UploadFile | None, File()] = None,
        video: Annotated[UploadFile | None, File()] = None,
    ) -> dict[str, Any]:
        if text is None and audio is None and video is None:
            raise HTTPException(422, "send at least one of text, audio, video")
        return models.predict(
            text=text,
            audio=audio.file.read() if audio is not None else None,
            video=video.file.read() if video is not None else None,
            audio_from_video=True,
        )

    return app


def main() -> None:
    """Serve the naive app with one uvicorn worker."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: $BENCH_DEVICE or cpu)")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(
        create_app(args.device), host=args.host, port=args.port, workers=1, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
