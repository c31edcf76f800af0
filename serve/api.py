"""The FastAPI application of the fusion ingress: routes, access control, upload guards, metrics, static page.

:func:`create_app` builds it around a :class:`serve.service.FusionService`, so the same app runs inside
the ``FusionIngress`` replica and, with fake encoder handles, in fast in-process tests. Middleware, outermost
first: request metrics, CORS (only with an allow-list), access control (:mod:`serve.access`), upload limit.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.labels import MODALITIES
from models.media import MediaError
from models.recording import RecordingTooLong
from serve.access import API_KEY_HEADER, BEARER, AccessControl, AccessMiddleware, Client, route_path
from serve.config import TRANSCRIBE_MODES, AppConfig, Segmentation, TranscribeMode
from serve.errors import EncoderError
from serve.metrics import Metrics
from serve.schemas import (
    CONTEXT_ADAPTER,
    CONTEXT_HELP,
    ERROR_RESPONSES,
    TIMELINE_LINES,
    TIMELINE_RESPONSES,
    ContextItem,
    HealthResponse,
    PredictionResponse,
    TextRequest,
    context_payload,
    context_problem,
)
from serve.service import FusionService, PredictionFailed
from serve.stream import StreamManager
from serve.timeline import NDJSON, NDJSONResponse, TimelineBusy, TimelineRunner, encode_line
from serve.uploads import UploadLimitMiddleware, check_media

STATIC_DIR = Path(__file__).resolve().parent / "static"
TIMELINE_PATH = "/predict/timeline"
ENDPOINTS = (
    "/api/health",
    "/api/predict",
    "/predict",
    "/predict/audio",
    "/predict/video",
    TIMELINE_PATH,
    "/docs",
    "/openapi.json",
)
UPLOAD_PATHS = ("/predict", "/predict/audio", "/predict/video")  # multipart: what the upload cap counts
PREDICT_PATHS = ("/api/predict", *UPLOAD_PATHS, TIMELINE_PATH)  # what API keys and per-client limits guard
SNIFF_BYTES = 512
NON_EMPTY = {"minLength": 1}  # an uploaded file must have content (an empty one is answered 400)
TRANSCRIBE_HELP = (
    "off: no transcript; return: the words of the audio in `transcript`; fuse: also fused as the text modality "
    "when the request has no text. A form field wins over the query parameter; default: the deployment's "
    "transcriber.default_mode (return)"
)
SEGMENT_HELP = "fixed segmentation: seconds per segment (default: the deployment's timeline.segment_s, 3)"
HOP_HELP = "fixed segmentation: seconds between segment starts, at most segment_s (default: segment_s, no overlap)"
SEGMENTATION_HELP = (
    "fixed: segment_s every hop_s; speech: one segment per stretch of speech, cut halfway through the pauses "
    "(a recording without audio is cut fixed). Default: fixed when segment_s or hop_s is given, else the "
    "deployment's timeline.segmentation (speech)"
)
TIMELINE_TRANSCRIBE_HELP = (
    "off: no words; return: each segment's words in its `transcript`; fuse: also fused as its text when the "
    "request has no text. Default: the deployment's timeline.default_transcribe (off)"
)
TranscribeField = Annotated[TranscribeMode | None, Form(description=TRANSCRIBE_HELP)]
TranscribeQuery = Annotated[TranscribeMode | None, Query(alias="transcribe", description=TRANSCRIBE_HELP)]


class RequestMetricsMiddleware:
    """Count requests by endpoint and status, and time them (outermost, so 413s are counted too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)  # without the route prefix of an application deployed under one
        endpoint = path if path in ENDPOINTS else "other"
        status = 500
        start = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.inc("emotion_requests_total", endpoint=endpoint, status=str(status))
            self.metrics.observe(
                "emotion_request_latency_ms", (time.perf_counter() - start) * 1000.0, endpoint=endpoint
            )


class MethodGuardMiddleware:
    """405 with an ``Allow`` header for a wrong method on an API route.

    Without it the static page's mount at ``/`` (after the API routes) takes such requests and answers with its
    own methods (``Allow: GET, HEAD``), which contradicts the OpenAPI document.
    """

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self._allowed: dict[str, set[str]] | None = None

    def allowed(self) -> dict[str, set[str]]:
        if self._allowed is None:  # the routes exist once the first request arrives
            table: dict[str, set[str]] = {}
            for route in self.api.routes:
                if isinstance(route, APIRoute):
                    table.setdefault(route.path, set()).update(route.methods or ())
            self._allowed = table
        return self._allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            methods = self.allowed().get(route_path(scope))
            if methods and scope["method"] not in methods:
                response = JSONResponse(
                    {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(sorted(methods))}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _clean_text(text: str, config: AppConfig) -> str:
    """422 for blank or over-long text (the model window itself truncates, and says so)."""
    if not text.strip():
        raise HTTPException(422, "text is empty")
    limit = config.limits.max_text_chars
    if len(text) > limit:
        raise HTTPException(422, f"text is longer than {limit} characters")
    return text


def _text_payload(text: str, context: list[ContextItem] | None, config: AppConfig) -> str | dict[str, Any]:
    """The text encoder's payload: the checked text, with its checked context when there is one (422 otherwise)."""
    text = _clean_text(text, config)
    if not context:
        return text
    limits = config.limits
    problem = context_problem(context, limits.max_context_turns, limits.max_context_chars)
    if problem:
        raise HTTPException(422, problem)
    return {"text": text, "context": context_payload(context)}


def _form_context(raw: str | None) -> list[ContextItem] | None:
    """The ``context`` form field (JSON text) parsed as the JSON body's ``context`` is; FastAPI's 422 list if not."""
    if raw is None or not raw.strip():
        return None
    try:
        return CONTEXT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", "context", *e["loc"])} for e in errors]) from None


async def _read_upload(upload: UploadFile | None, field: str) -> bytes | None:
    """The upload's bytes (``b""`` if empty), ``None`` if no file was chosen; 415 if it is not media."""
    if upload is None:
        return None
    data = await upload.read()
    if not data and not upload.filename:  # an HTML form's empty file input
        return None
    if data:
        check_media(field, upload.content_type, data[:SNIFF_BYTES])
    return data


def _transcribe_mode(field: TranscribeMode | None, query: TranscribeMode | None, config: AppConfig) -> TranscribeMode:
    """The ``transcribe`` option: the form field, else the query parameter, else the deployment's default."""
    return field or query or config.transcriber.default_mode


def _split(uploads: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, EncoderError]]:
    """Separate empty uploads (known failures) from real payloads."""
    payloads = {m: d for m, d in uploads.items() if d}
    empty = {
        m: EncoderError(code="empty_media", message="the uploaded file is empty", status=400)
        for m, d in uploads.items()
        if not d
    }
    return payloads, empty


def create_app(
    service: FusionService, config: AppConfig, static_dir: Path | None = STATIC_DIR, access: AccessControl | None = None
) -> FastAPI:
    """The ingress's FastAPI app (API routes first, then the static web page at ``/``).

    ``access`` defaults to the policy of ``config.access`` (keys read from their environment variable or file).
    """
    if access is None:
        access = AccessControl(config.access, service.metrics)
    # Shown in /docs ("Authorize"); the check itself is AccessMiddleware's, before the body is read.
    security = [Security(BEARER), Security(API_KEY_HEADER)] if access.keys_required else []
    app = FastAPI(
        title="Multimodal emotion recognition",
        description="Text, speech and face video -> one of 7 emotions, calibrated probabilities and "
        "per-modality contributions. Served by Ray Serve.",
        version="1.0",
    )
    app.add_middleware(MethodGuardMiddleware, api=app)
    app.add_middleware(
        UploadLimitMiddleware,
        max_bytes=config.limits.max_upload_bytes,
        path_limits={TIMELINE_PATH: config.limits.max_timeline_upload_bytes},
    )
    app.add_middleware(
        AccessMiddleware,
        access=access,
        paths=PREDICT_PATHS,
        upload_paths=UPLOAD_PATHS,
        timeline_paths=(TIMELINE_PATH,),
    )
    if config.access.cors_origins:  # none: browsers allow the page's own origin only
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.access.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)

    @app.exception_handler(PredictionFailed)
    async def _prediction_failed(_: Request, exc: PredictionFailed) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail})

    @app.get("/api/health", response_model=HealthResponse, tags=["health"], dependencies=security)
    async def health(request: Request) -> HealthResponse:
        """Service status and the version of each loaded model (when keys are required: liveness only, without
        a valid key)."""
        if access.keys_required and not isinstance(await access.identify(request), Client):
            return HealthResponse(status="ok", api_key_required=True)
        return (await service.health()).model_copy(update={"api_key_required": access.keys_required})

    def predict_route(path: str) -> Any:
        """``@app.post`` for a prediction endpoint: the response model and the documented error answers."""
        return app.post(
            path,
            response_model=PredictionResponse,
            response_model_exclude_none=True,
            responses=ERROR_RESPONSES,
            tags=["predict"],
            dependencies=security,
        )

    @predict_route("/api/predict")
    async def predict_text(body: TextRequest) -> PredictionResponse:
        """Emotion of a text (JSON ``{"text": ...}``), optionally read with the previous turns of its conversation
        (``context``). Text beyond the model window is truncated; context turns beyond it are cut, oldest first."""
        return await service.predict({"text": _text_payload(body.text, body.context, config)})

    @predict_route("/predict/audio")
    async def predict_audio(
        file: Annotated[
            UploadFile,
            File(description="any ffmpeg-readable audio, or a video (its audio track)", json_schema_extra=NON_EMPTY),
        ],
        transcribe: TranscribeField = None,
        transcribe_query: TranscribeQuery = None,
    ) -> PredictionResponse:
        """Emotion of speech, and its words (``transcribe``)."""
        mode = _transcribe_mode(transcribe, transcribe_query, config)
        data = await _read_upload(file, "audio") or b""
        payloads, empty = _split({"audio": data})
        return await service.predict(payloads, primary=("audio",), prefailed=empty, transcribe=mode)

    @predict_route("/predict/video")
    async def predict_video(
        file: Annotated[
            UploadFile, File(description="a video, or a still image (a 1-frame video)", json_schema_extra=NON_EMPTY)
        ],
        transcribe: TranscribeField = None,
        transcribe_query: TranscribeQuery = None,
    ) -> PredictionResponse:
        """Emotion of a face video; its audio track, if usable, is used too (else listed in ``dropped``), and its
        words are transcribed (``transcribe``)."""
        mode = _transcribe_mode(transcribe, transcribe_query, config)
        data = await _read_upload(file, "video") or b""
        payloads, empty = _split({"video": data})
        if payloads:
            payloads["audio"] = data
        return await service.predict(payloads, primary=("video",), prefailed=empty, transcribe=mode)

    @predict_route("/predict")
    async def predict(
        text: Annotated[str | None, Form(description="text (blank counts as absent)")] = None,
        context: Annotated[str | None, Form(description=f"JSON list: {CONTEXT_HELP}")] = None,
        audio: Annotated[UploadFile | None, File(description="speech audio")] = None,
        video: Annotated[
            UploadFile | None,
            File(description="face video or image; its audio track is used when no separate audio is given"),
        ] = None,
        transcribe: TranscribeField = None,
        transcribe_query: TranscribeQuery = None,
    ) -> PredictionResponse:
        """Fused emotion of any non-empty subset of text, audio and video; the audio's words (``transcribe``)."""
        mode = _transcribe_mode(transcribe, transcribe_query, config)
        uploads = {
            m: d
            for m, d in (("audio", await _read_upload(audio, "audio")), ("video", await _read_upload(video, "video")))
            if d is not None
        }
        turns = _form_context(context)
        has_text = text is not None and text.strip() != ""
        if not has_text and not uploads:
            raise HTTPException(422, "give at least one of: form field 'text', file 'audio', file 'video'")
        payloads: dict[str, str | bytes]
        payloads, empty = _split(uploads)  # type: ignore[assignment]
        primary = tuple(m for m in MODALITIES if m in uploads or (m == "text" and has_text))
        if has_text:
            payloads["text"] = _text_payload(text or "", turns, config)  # type: ignore[assignment]
        if "video" in payloads and "audio" not in uploads:
            payloads["audio"] = payloads["video"]  # the video's own audio track
        return await service.predict(payloads, primary=primary, prefailed=empty, transcribe=mode)

    timelines = TimelineRunner(service, config)

    @app.post(
        TIMELINE_PATH,
        status_code=200,
        response_class=NDJSONResponse,
        responses=TIMELINE_RESPONSES,
        tags=["predict"],
        dependencies=security,
    )
    async def predict_timeline(
        audio: Annotated[UploadFile | None, File(description="a recording's audio (or a video: its track)")] = None,
        video: Annotated[
            UploadFile | None, File(description="a video: its frames, and its audio track unless 'audio' is given")
        ] = None,
        text: Annotated[str | None, Form(description="text fused into every segment (blank counts as absent)")] = None,
        context: Annotated[str | None, Form(description=f"JSON list, read with the text: {CONTEXT_HELP}")] = None,
        segment_s: Annotated[float | None, Form(ge=1.0, le=30.0, description=SEGMENT_HELP)] = None,
        hop_s: Annotated[float | None, Form(ge=0.5, le=30.0, description=HOP_HELP)] = None,
        segmentation: Annotated[Segmentation | None, Form(description=SEGMENTATION_HELP)] = None,
        transcribe: Annotated[TranscribeMode | None, Form(description=TIMELINE_TRANSCRIBE_HELP)] = None,
        transcribe_query: Annotated[
            TranscribeMode | None, Query(alias="transcribe", description=TIMELINE_TRANSCRIBE_HELP)
        ] = None,
    ) -> NDJSONResponse:
        """Emotion over time of a long recording (up to ``limits.max_timeline_seconds``), streamed as NDJSON: a
        ``start`` line, one ``segment`` line per segment in order as they are answered, then a ``summary``."""
        if audio is None and video is None:
            raise HTTPException(422, "give file 'audio' or file 'video'")
        segment = segment_s or config.timeline.segment_s
        if segment > config.limits.max_media_seconds:
            raise HTTPException(422, f"segment_s is over limits.max_media_seconds ({config.limits.max_media_seconds})")
        if hop_s is not None and hop_s > segment:
            raise HTTPException(422, f"hop_s ({hop_s:g}) must not exceed segment_s ({segment:g}): no gaps")
        turns = _form_context(context)
        words = _text_payload(text, turns, config) if text is not None and text.strip() else None
        mode = transcribe or transcribe_query or config.timeline.default_transcribe
        try:
            release = timelines.reserve()
        except TimelineBusy as exc:
            raise HTTPException(503, f"{exc}; retry later", headers={"Retry-After": "10"}) from exc
        try:
            audio_data = await _read_upload(audio, "audio")
            video_data = await _read_upload(video, "video")
            if audio_data is None and video_data is None:
                raise HTTPException(422, "give file 'audio' or file 'video'")
            if audio_data == b"" or video_data == b"":
                raise HTTPException(400, "the uploaded file is empty")
            try:
                if video_data is not None:
                    recording = await timelines.decode(video_data, True, audio_data)
                else:
                    recording = await timelines.decode(audio_data or b"", False)
            except RecordingTooLong as exc:
                raise HTTPException(422, f"{exc} (limits.max_timeline_seconds)") from exc
            except MediaError as exc:
                raise HTTPException(400, str(exc)) from exc
            plan = await timelines.plan(recording, segment_s, hop_s, segmentation)
        except BaseException:
            release()
            raise

        async def lines() -> AsyncIterator[bytes]:
            async for line in timelines.lines(recording, plan, words, mode):
                yield encode_line(line)

        return NDJSONResponse(lines(), on_close=release)

    streams = StreamManager(service, config, access)

    @app.websocket("/ws/stream")
    async def live_stream(websocket: WebSocket) -> None:
        """Live emotion: PCM audio, JPEG frames and text in, an update about once a second out (serve/stream.py)."""
        await streams.handle(websocket)

    if static_dir is not None and static_dir.is_dir():
        app.mount("/", StaticFiles(directory=static_dir, html=True), name="static")
    _describe_fused_form(app)
    return app


def _describe_fused_form(app: FastAPI) -> None:
    """Make the OpenAPI form of ``POST /predict`` say what the route accepts.

    FastAPI writes each optional field as ``anyOf: [value, null]``, but a multipart form has no null (a fuzzer
    sends the text "null"), and it cannot say "at least one modality". Written here: files are binary (possibly
    empty: an HTML form sends an empty part for a file input left blank; an empty file is listed in ``dropped``),
    text is a string, and the form needs a file or a text with a non-blank character. The ``transcribe`` option of
    the media routes, a form field or a query parameter, is one of its strings (never null) too.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            body = spec.get("components", {}).get("schemas", {}).get("Body_predict_predict_post")
            if body is not None:
                props = body["properties"]
                for name in ("audio", "video"):
                    props[name] = {
                        "type": "string",
                        "contentMediaType": "application/octet-stream",
                        "title": props[name].get("title", name.title()),
                        "description": props[name].get("description", ""),
                    }
                props["text"] = {"type": "string", "title": "Text", "description": props["text"].get("description", "")}
                if "context" in props:  # a JSON text holding the JSON body's context
                    text_request = spec["components"]["schemas"].get("TextRequest", {}).get("properties", {})
                    props["context"] = {
                        "type": "string",
                        "title": "Context",
                        "contentMediaType": "application/json",
                        "contentSchema": next(
                            (s for s in text_request.get("context", {}).get("anyOf", []) if s.get("type") == "array"),
                            {"type": "array"},
                        ),
                        "description": props["context"].get("description", ""),
                    }
                body["anyOf"] = [
                    {"required": ["audio"]},
                    {"required": ["video"]},
                    {"required": ["text"], "properties": {"text": {"pattern": r"\S"}}},
                ]
            operation = spec.get("paths", {}).get("/predict", {}).get("post")
            if operation is not None and "requestBody" in operation:
                operation["requestBody"]["required"] = True  # no body at all names no modality either
            _transcribe_is_a_string(spec)
            _describe_timeline_form(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _transcribe_is_a_string(spec: dict[str, Any]) -> None:
    """Write every ``transcribe`` option (form field or query parameter) as one of its strings, not ``anyOf`` null."""
    mode = {"type": "string", "enum": list(TRANSCRIBE_MODES), "description": TRANSCRIBE_HELP}
    for path in ("/predict", "/predict/audio", "/predict/video"):
        operation = spec.get("paths", {}).get(path, {}).get("post", {})
        for param in operation.get("parameters", []):
            if param.get("name") == "transcribe":
                param["schema"] = {**mode, "title": "Transcribe"}
        ref = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
        body = spec.get("components", {}).get("schemas", {}).get(str(ref.get("$ref", "")).rsplit("/", 1)[-1])
        if body is not None and "transcribe" in body.get("properties", {}):
            body["properties"]["transcribe"] = {**mode, "title": "Transcribe"}


def _describe_timeline_form(spec: dict[str, Any]) -> None:
    """The OpenAPI form of ``POST /predict/timeline`` as the route takes it (see :func:`_describe_fused_form`): each
    field its one type, never null; a file ``audio`` or ``video`` required; and the NDJSON lines' schemas."""
    operation = spec.get("paths", {}).get(TIMELINE_PATH, {}).get("post")
    if operation is None:
        return
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = schemas[ref.rsplit("/", 1)[-1]]
    turns = schemas.get("TextRequest", {}).get("properties", {}).get("context", {}).get("anyOf", [])
    for name, prop in body["properties"].items():
        kept = [s for s in prop.pop("anyOf", []) if s.get("type") != "null"]
        prop.update(kept[0] if kept else {})
        if name in ("audio", "video"):
            prop.update(type="string", contentMediaType="application/octet-stream")
        if name == "context":  # a JSON text holding the JSON body's context, as in POST /predict
            array = next((s for s in turns if s.get("type") == "array"), {"type": "array"})
            prop.update(type="string", contentMediaType="application/json", contentSchema=array)
    for param in operation.get("parameters", []):
        if param.get("name") == "transcribe":
            param["schema"] = {"type": "string", "enum": list(TRANSCRIBE_MODES), "title": "Transcribe"}
    body["anyOf"] = [{"required": ["audio"]}, {"required": ["video"]}]
    operation["requestBody"]["required"] = True
    for content in operation["responses"]["200"].get("content", {}).values():
        content.get("schema", {}).pop("type", None)  # FastAPI's default for a custom response class; lines are objects
    for status, response in operation["responses"].items():
        content = response.get("content", {})
        if status != "200" and NDJSON in content:  # errors are JSON, not the stream's type FastAPI gives them
            content["application/json"] = content.pop(NDJSON)
    _, defs = models_json_schema(
        [(line, "serialization") for line in TIMELINE_LINES], ref_template="#/components/schemas/{model}"
    )
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
