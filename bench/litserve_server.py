"""The LitServe target: the same pipelines behind LitServe, with its batching and several workers.

What someone serving these encoders on one machine would pick instead of Ray Serve. ``models/inference.py``'s
pipelines behind one ``litserve.LitServer`` with four ``LitAPI``s, on the service's paths and with its answer shape
(so the load generator treats it like the others):

* ``/api/predict`` (JSON ``{"text"}``): ``TextPipeline``;
* ``/predict/audio`` (multipart ``file``): ``AudioPipeline``;
* ``/predict/video`` (multipart ``file``): ``VideoPipeline`` and ``AudioPipeline`` on the video's audio track, fused;
* ``/predict`` (multipart ``text``, ``audio``, ``video``): the three encoders and ``FusionPipeline``.

Per request, LitServe's HTTP server process (uvicorn + FastAPI) parses the body and puts it on a queue (pickled;
ZeroMQ with ``--fast-queue``); an inference worker process takes up to ``max_batch_size`` requests (waiting at most
``batch_timeout`` s to fill), runs ``decode_request`` on each (``prepare``: ffmpeg decode, face crops), one batched
``encode`` per modality, the fusion per request, and sends each answer back through the queue to the HTTP process.
Each API has its own ``workers`` worker processes (``torch_threads`` torch threads each).

Needs ``pip install litserve`` (``requirements-dev.txt``, a benchmark-only dependency).
Run: ``python -m bench.litserve_server --port 8200 --workers 2 --max-batch-size 32 --batch-timeout 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

try:
    import litserve as ls
except ImportError:  # the benchmark reports the target as skipped (bench.servers.litserve_available)
    ls = None

LitAPI: Any = ls.LitAPI if ls is not None else object

MODALITY_ORDER = ("text", "audio", "video")
SWEEP_REPORT = Path(__file__).resolve().parent.parent / "reports" / "litserve_sweep.json"


class _EmotionAPI(LitAPI):  # type: ignore[misc, valid-type]
    """One endpoint: which modalities its requests carry and how to read them from the request."""

    path = "/predict"
    modalities: tuple[str, ...] = ()

    def __init__(self, max_batch_size: int, batch_timeout: float, device: str, torch_threads: int) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=self.path)
        self.device_name = device
        self.torch_threads = torch_threads
        self.pipelines: dict[str, Any] = {}
        self.fusion: Any = None
        self.version = ""

    def setup(self, device: str) -> None:
        import torch

        from models.inference import AudioPipeline, FusionPipeline, TextPipeline, VideoPipeline

        torch.set_num_threads(self.torch_threads)
        kinds = {"text": TextPipeline, "audio": AudioPipeline, "video": VideoPipeline}
        self.pipelines = {m: kinds[m](device=self.device_name) for m in self.modalities}
        if len(self.modalities) > 1:
            self.fusion = FusionPipeline(device=self.device_name)
        parts = [self.pipelines[m] for m in MODALITY_ORDER if m in self.pipelines]
        self.version = "+".join(p.version for p in [*parts, *([self.fusion] if self.fusion else [])])

    def payloads(self, request: Any) -> dict[str, Any]:
        """``{modality: raw payload}`` of one request."""
        raise NotImplementedError

    # No annotations on decode_request's request or encode_response's return: LitServe reads them as the request
    # and response types of the route (a plain Request: JSON or form, and a JSON answer).
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        """Each modality's ``prepare`` (decode and preprocessing) for one request; unusable ones are dropped."""
        from fastapi import HTTPException

        from models.inference import EmptyTextError
        from models.media import MediaError

        prepared: dict[str, Any] = {}
        dropped: dict[str, str] = {}
        for modality, payload in self.payloads(request).items():
            try:
                prepared[modality] = self.pipelines[modality].prepare(payload)
            except (MediaError, EmptyTextError) as exc:
                dropped[modality] = str(exc)
        if not prepared:
            raise HTTPException(400, {"message": "no modality could be used", "dropped": dropped})
        return {"prepared": prepared, "dropped": dropped}

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def predict(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One batched forward per modality over the requests that carry it, then the fusion per request."""
        encoded: list[dict[str, tuple[Any, float, int]]] = [{} for _ in items]
        for modality in MODALITY_ORDER:
            idx = [i for i, item in enumerate(items) if modality in item["prepared"]]
            if not idx:
                continue
            start = time.perf_counter()
            results = self.pipelines[modality].encode([items[i]["prepared"][modality] for i in idx])
            ms = (time.perf_counter() - start) * 1000.0
            for i, result in zip(idx, results, strict=True):
                encoded[i][modality] = (result, ms, len(idx))
        return [self._answer(done, item["dropped"]) for done, item in zip(encoded, items, strict=True)]

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return output

    def _answer(self, done: dict[str, tuple[Any, float, int]], dropped: dict[str, str]) -> dict[str, Any]:
        from models.inference import combine
        from models.labels import EMOTIONS

        def probs(values: Any) -> dict[str, float]:
            return {name: float(v) for name, v in zip(EMOTIONS, values, strict=True)}

        combined = combine({m: r for m, (r, _, _) in done.items()}, self.fusion)
        final, contributions = combined.probabilities, combined.contributions
        best = int(final.argmax())
        return {
            "emotion": EMOTIONS[best],
            "confidence": float(final[best]),
            "probabilities": probs(final),
            "contributions": contributions,
            "modalities": {
                m: {
                    "emotion": r.emotion,
                    "confidence": float(r.confidence),
                    "probabilities": probs(r.probabilities),
                    "model_ms": round(ms, 2),
                    "batch_size": size,
                }
                for m, (r, ms, size) in done.items()
            },
            "dropped": dropped,
            "model_version": self.version,
        }


def _file_bytes(value: Any) -> bytes | None:
    """The bytes of a multipart form field (an ``UploadFile``), or None when the field is absent."""
    if value is None or isinstance(value, str):
        return None
    data = value.file.read() if hasattr(value, "file") else bytes(value)
    return data or None


class TextAPI(_EmotionAPI):
    path = "/api/predict"
    modalities = ("text",)

    def payloads(self, request: Any) -> dict[str, Any]:
        return {"text": request["text"]}


class AudioAPI(_EmotionAPI):
    path = "/predict/audio"
    modalities = ("audio",)

    def payloads(self, request: Any) -> dict[str, Any]:
        return {"audio": _file_bytes(request.get("file")) or b""}


class VideoAPI(_EmotionAPI):
    """A video and its audio track, as the service's ``/predict/video``."""

    path = "/predict/video"
    modalities = ("audio", "video")

    def payloads(self, request: Any) -> dict[str, Any]:
        data = _file_bytes(request.get("file")) or b""
        return {"video": data, "audio": data}


class FusedAPI(_EmotionAPI):
    path = "/predict"
    modalities = ("text", "audio", "video")

    def payloads(self, request: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        text = request.get("text")
        if isinstance(text, str) and text.strip():
            out["text"] = text
        for name in ("audio", "video"):
            data = _file_bytes(request.get(name))
            if data:
                out[name] = data
        return out


APIS: dict[str, type[_EmotionAPI]] = {"text": TextAPI, "audio": AudioAPI, "video": VideoAPI, "fused": FusedAPI}

# LitServe's settings when reports/litserve_sweep.json (python -m bench.litserve_sweep) has no best point.
DEFAULT_SETTINGS: dict[str, Any] = {
    "workers": 2,
    "max_batch_size": 32,
    "batch_timeout": 0.0,
    "torch_threads": 1,
    "fast_queue": True,
}


def chosen_settings(sweep: Path = SWEEP_REPORT) -> dict[str, Any]:
    """The settings bench.run gives LitServe: the best point of its sweep, else :data:`DEFAULT_SETTINGS`."""
    try:
        best = json.loads(sweep.read_text()).get("best") or {}
    except (OSError, ValueError, AttributeError):
        best = {}
    return {**DEFAULT_SETTINGS, **{k: v for k, v in best.items() if k in DEFAULT_SETTINGS}}


def settings_args(settings: dict[str, Any]) -> list[str]:
    """Command-line options of this module for ``settings`` (keys of :data:`DEFAULT_SETTINGS`, ``endpoints``)."""
    out = [
        "--workers",
        str(settings["workers"]),
        "--max-batch-size",
        str(settings["max_batch_size"]),
        "--batch-timeout",
        str(settings["batch_timeout"]),
        "--torch-threads",
        str(settings["torch_threads"]),
    ]
    if not settings.get("fast_queue", True):
        out.append("--no-fast-queue")
    if settings.get("endpoints"):
        out += ["--endpoints", ",".join(settings["endpoints"])]
    return out


def build_server(
    endpoints: list[str],
    workers: int,
    max_batch_size: int,
    batch_timeout: float,
    device: str = "cpu",
    torch_threads: int = 1,
    fast_queue: bool = True,
    timeout_s: float = 120.0,
) -> Any:
    """A ``LitServer`` with one ``LitAPI`` per endpoint in ``endpoints``, each with ``workers`` worker processes."""
    if ls is None:
        raise RuntimeError("litserve is not installed: pip install litserve (requirements-dev.txt)")
    apis = [APIS[key](max_batch_size, batch_timeout, device, torch_threads) for key in endpoints]
    return ls.LitServer(
        apis,
        accelerator="cuda" if device.startswith("cuda") else "cpu",
        devices=1,
        workers_per_device=workers,
        timeout=timeout_s,
        fast_queue=fast_queue,
        healthcheck_path="/api/health",
        disable_openapi_url=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the LitServe app on ``--host``/``--port``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--endpoints", default=",".join(APIS), help=f"comma list of {','.join(APIS)} (default all)")
    p.add_argument("--workers", type=int, default=2, help="inference worker processes per endpoint (default 2)")
    p.add_argument("--api-servers", type=int, default=None, help="HTTP server processes (default: --workers)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.0, help="seconds a batch waits to fill (default 0)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--no-fast-queue", action="store_true", help="multiprocessing queues instead of ZeroMQ")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $BENCH_DEVICE or cpu)")
    args = p.parse_args(argv)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    server = build_server(
        endpoints,
        args.workers,
        args.max_batch_size,
        args.batch_timeout,
        args.device or os.environ.get("BENCH_DEVICE", "cpu"),
        args.torch_threads,
        fast_queue=not args.no_fast_queue,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers or args.workers,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
