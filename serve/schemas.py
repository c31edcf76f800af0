"""Request and response models of the REST API (they are what ``/docs`` shows)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from models.labels import EMOTIONS, Modality
from serve.config import MAX_CONTEXT_CHARS, MAX_CONTEXT_TURNS

Emotion = Literal[EMOTIONS]  # type: ignore[valid-type]
Probabilities = dict[Emotion, float]
DIGITS = 6  # probabilities and contributions in answers are rounded to this many decimals


SPEAKER_CHARS = 100  # the longest speaker name of a context turn
CONTEXT_HELP = (
    "optional: the previous turns of the conversation, oldest first, each a string or "
    '{"speaker": ..., "text": ...}; at most limits.max_context_turns turns '
    f"({MAX_CONTEXT_TURNS}) of at most limits.max_context_chars characters ({MAX_CONTEXT_CHARS}) each. The text "
    "model reads the newest turns that fit its 128-token window with the text (which is never cut for them) and "
    "says how many it read and cut (modalities.text.context_turns, context_cut)"
)


class ContextTurn(BaseModel):
    """One previous turn of the conversation, with who said it."""

    model_config = ConfigDict(extra="forbid")

    speaker: str | None = Field(None, max_length=SPEAKER_CHARS, description="who said it (any name or role)")
    text: str = Field(..., min_length=1, max_length=MAX_CONTEXT_CHARS, description="what was said")


TurnText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTEXT_CHARS)]
ContextItem = TurnText | ContextTurn
Context = Annotated[list[ContextItem], Field(max_length=MAX_CONTEXT_TURNS)]
CONTEXT_ADAPTER: TypeAdapter[list[ContextItem]] = TypeAdapter(Context)


def context_payload(context: list[ContextItem]) -> list[dict[str, str | None]]:
    """The turns as the text encoder takes them: ``[{"speaker": ..., "text": ...}]`` (speaker ``None`` if unnamed)."""
    turns = [ContextTurn(text=t) if isinstance(t, str) else t for t in context]
    return [{"speaker": t.speaker, "text": t.text} for t in turns]


def context_problem(context: list[ContextItem] | list[str], max_turns: int, max_chars: int) -> str | None:
    """Why ``context`` is over the deployment's limits (which may be below the schema's), or ``None``.

    A blank turn is no problem: the text model skips it.
    """
    if len(context) > max_turns:
        return f"context has {len(context)} turns; at most {max_turns} are allowed"
    for i, turn in enumerate(context):
        text = turn if isinstance(turn, str) else turn.text
        if len(text) > max_chars:
            return f"context turn {i} is longer than {max_chars} characters"
    return None


class TextRequest(BaseModel):
    """Body of ``POST /api/predict``."""

    # The pattern is documented, and checked by the route (422 "text is empty", a readable reason).
    text: str = Field(
        ...,
        min_length=1,
        description="at least one non-blank character",
        json_schema_extra={"pattern": r"\S"},
        examples=["I can't believe we finally won the match!"],
    )
    context: Context | None = Field(
        None,
        description=CONTEXT_HELP,
        examples=[["We lost the last five games.", {"speaker": "Coach", "text": "Then today we won it 3-1!"}]],
    )


class ModalityResult(BaseModel):
    """One encoder's own calibrated prediction and timings (plus what it noticed about the input)."""

    model_config = ConfigDict(extra="allow")

    emotion: Emotion
    confidence: float
    probabilities: Probabilities
    latency_ms: float = Field(description="end-to-end time inside the encoder replica")
    decode_ms: float = Field(description="ffmpeg decode time (text: validation)")
    preprocess_ms: float = Field(description="preprocessing after decode: face detection and crops, log-mel")
    model_ms: float = Field(description="batched forward time")
    batch_size: int = Field(description="size of the batch this input was encoded in")
    model_version: str
    truncated: bool | None = Field(None, description="text: cut to the model window (128 tokens)")
    characters: int | None = Field(None, description="text: characters after whitespace normalisation")
    context_turns: int | None = Field(
        None, description="text sent with context: previous turns read with it (the newest that fit the window)"
    )
    context_cut: int | None = Field(
        None, description="text sent with context: oldest turns left out to fit the 128-token window"
    )
    duration_s: float | None = Field(None, description="audio: seconds decoded")
    frames: int | None = Field(None, description="video: frames used (uniformly sampled)")
    face_detected: bool | None = Field(None, description="video: whether any frame had a detected face")
    source: Literal["transcript"] | None = Field(
        None, description="text: 'transcript' when the text is the audio's transcript (transcribe=fuse)"
    )
    face_score: float | None = Field(
        None, description="video: the face detector's score for the face used, mean over the frames it was found in"
    )
    face_detector: str | None = Field(
        None, description="video: which detector found the face (hog, cnn, haar); scores compare within one"
    )


class EncoderAnswer(ModalityResult):
    """What an encoder replica answers: its public :class:`ModalityResult` plus the 256-d embedding.

    Built once in the encoder (``serve.encoders``), sent across Ray as plain data and validated once in
    the ingress; :meth:`public` is the part a client sees.
    """

    model_config = ConfigDict(extra="forbid")

    modality: Modality
    embedding: list[float] = Field(min_length=1)

    def public(self) -> ModalityResult:
        """The per-modality result a client sees (no embedding)."""
        return ModalityResult.model_construct(**self.model_dump(exclude={"modality", "embedding"}, exclude_none=True))


class TranscriptSegment(BaseModel):
    """One stretch of speech in the transcript."""

    start: float = Field(description="seconds from the start of the audio")
    end: float = Field(description="seconds from the start of the audio")
    text: str


class Transcript(BaseModel):
    """The words spoken in the request's audio (or its video's audio track), from the ``Transcriber``."""

    text: str = Field(description="the segments' text joined; empty when no speech was found")
    language: str = Field(description="Whisper's language code, detected unless the deployment fixes it")
    language_probability: float
    segments: list[TranscriptSegment]
    duration_s: float = Field(description="seconds of audio transcribed")
    fused: bool = Field(False, description="true when the text was fused as the text modality (transcribe=fuse)")
    latency_ms: float = Field(description="end-to-end time inside the Transcriber replica: decode and transcription")
    model_ms: float = Field(description="transcription time (Whisper's encoder and decoding)")
    real_time_factor: float = Field(description="model_ms over the audio's duration (0.1: 10x faster than real time)")
    model_version: str


class TranscriptAnswer(Transcript):
    """What a ``Transcriber`` replica answers (validated once in the ingress)."""

    model_config = ConfigDict(extra="forbid")


class PredictionResponse(BaseModel):
    """Answer of every prediction endpoint."""

    emotion: Emotion
    confidence: float
    probabilities: Probabilities = Field(description="7 calibrated class probabilities, summing to 1")
    contributions: dict[Modality, float] = Field(
        description="weight of each modality used, summing to 1 (one modality: its own answer, weight 1)"
    )
    modalities: dict[Modality, ModalityResult]
    dropped: dict[Modality | Literal["transcript"], str] = Field(
        description="modalities that failed or timed out, with the reason; 'transcript' when a transcript was "
        "asked for and none came"
    )
    model_version: str = Field(description="versions of the encoders used (and of fusion when used), joined by '+'")
    latency_ms: float = Field(description="time spent in the ingress for this request")
    transcript: Transcript | None = Field(
        None, description="the words of the audio, unless transcribe=off or the request had no audio"
    )


class ModelStatus(BaseModel):
    """Whether one model answers, and which version it serves."""

    loaded: bool
    version: str | None = None
    device: str | None = None
    error: str | None = None


class RayInternals(BaseModel):
    """Whether this ingress replica can read the encoders' replica counts from Ray Serve's router."""

    ok: bool = Field(
        description="true: a dead encoder's modality is dropped at once and coalescing follows the replica "
        "count; false: the reads did not hold for this Ray version, and the ingress relies on retries and "
        "timeouts only"
    )
    detail: str | None = Field(None, description="what did not hold, per encoder (when ok is false)")


class HealthResponse(BaseModel):
    """Answer of ``GET /api/health``."""

    status: Literal["ok", "degraded"]
    api_key_required: bool = Field(False, description="prediction endpoints need an API key")
    models: dict[str, ModelStatus] | None = Field(
        None,
        description="each model's status and version; null when a key is required and none valid was sent "
        "(then status is liveness only)",
    )
    ray_internals: RayInternals | None = Field(
        None,
        description="the ingress's start-up check of Ray Serve's router state (serve/replicas.py); null before "
        "it ran, or when a key is required and none valid was sent",
    )


class ErrorResponse(BaseModel):
    """FastAPI-style error body: a readable reason."""

    detail: str


class ValidationErrorItem(BaseModel):
    """One problem found by request validation (FastAPI's format)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description='where: e.g. ["body", "text"]')
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """422: a list of validation errors when the request does not fit the schema (a missing field, a wrong type),
    or one readable reason when it fits but cannot be used (blank or over-long text, no modality given)."""

    detail: str | list[ValidationErrorItem]


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "undecodable, corrupt or empty media"},
    401: {"model": ErrorResponse, "description": "API key missing or not valid (when the service requires one)"},
    413: {"model": ErrorResponse, "description": "request body over the upload limit"},
    415: {"model": ErrorResponse, "description": "unsupported content type"},
    422: {
        "model": ValidationErrorResponse,
        "description": "the request does not fit the schema, or its text is blank or too long, or it names no modality",
    },
    429: {
        "model": ErrorResponse,
        "description": "this client's request rate or concurrent uploads are over "
        "the limit; retry after the Retry-After header's seconds",
    },
    503: {
        "model": ErrorResponse,
        "description": "no modality could be used because its encoder has no live replica or failed",
    },
    504: {"model": ErrorResponse, "description": "no encoder answered in time"},
}


# ---- POST /predict/timeline: NDJSON lines -------------------------------------------------------------------------


class TimelineStart(BaseModel):
    """First line of a timeline: what will come."""

    type: Literal["start"] = "start"
    duration_s: float = Field(description="seconds of the recording analysed")
    segmentation: Literal["fixed", "speech"] = Field(
        description="fixed: segment_s every hop_s; speech: one segment per stretch of speech"
    )
    segment_s: float = Field(description="fixed: each segment's length; speech: the longest a segment may be")
    hop_s: float | None = Field(None, description="fixed: seconds between segment starts (segment_s: no overlap)")
    segments: int = Field(description="segment lines that will follow")
    modalities: list[Modality] = Field(description="what each segment is sent as (text: the request's context)")
    transcribe: Literal["off", "return", "fuse"]


class TimelineError(BaseModel):
    """Why a segment has no answer: the HTTP status ``POST /predict`` would answer, and its detail."""

    status: int
    detail: str


class TimelineSegment(BaseModel):
    """One segment's answer (or its ``error``), one line each, in the order of the recording."""

    type: Literal["segment"] = "segment"
    index: int = Field(description="0, 1, ... in the order of the recording")
    start_s: float
    end_s: float
    emotion: Emotion | None = None
    confidence: float | None = None
    probabilities: Probabilities | None = None
    contributions: dict[Modality, float] | None = None
    dropped: dict[Modality | Literal["transcript"], str] = Field(default_factory=dict)
    transcript: Transcript | None = Field(None, description="the segment's words (transcribe=return or fuse)")
    latency_ms: float = Field(description="time from the segment's start to its answer in the ingress")
    error: TimelineError | None = Field(None, description="no modality of this segment could be used")


class TimelineMoment(BaseModel):
    """A segment where an emotion was strongest."""

    index: int
    start_s: float
    end_s: float
    emotion: Emotion
    confidence: float


class TimelineSummary(BaseModel):
    """Last line of a timeline."""

    type: Literal["summary"] = "summary"
    duration_s: float
    segments: int
    answered: int
    failed: int
    dominant: Emotion | None = Field(description="the emotion with the largest share of the time")
    shares: dict[Emotion, float] = Field(
        description="each emotion's share of the answered time (each second counted once where segments overlap)"
    )
    seconds: dict[Emotion, float] = Field(description="each emotion's answered seconds")
    strongest: list[TimelineMoment] = Field(
        description="the most confident segments, strongest first (non-neutral ones when there are any)"
    )
    latency_ms: float = Field(description="time from the first segment sent to the last answered")


TIMELINE_LINES: tuple[type[BaseModel], ...] = (TimelineStart, TimelineSegment, TimelineSummary)
TIMELINE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "NDJSON, one JSON object a line: a `start` line, one `segment` line per segment in the order "
        "of the recording (each as soon as it and those before it are answered), then a `summary` line",
        "content": {
            "application/x-ndjson": {
                "schema": {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in TIMELINE_LINES]}
            }
        },
    },
    400: {"model": ErrorResponse, "description": "undecodable, corrupt or empty media, or no stream to use"},
    401: ERROR_RESPONSES[401],
    413: {"model": ErrorResponse, "description": "request body over limits.max_timeline_upload_mb"},
    415: ERROR_RESPONSES[415],
    422: {
        "model": ValidationErrorResponse,
        "description": "the recording is longer than limits.max_timeline_seconds, hop_s exceeds segment_s, no file "
        "given, or the request does not fit the schema",
    },
    429: {
        "model": ErrorResponse,
        "description": "this client has its maximum of timelines in progress, or is over its request rate; retry "
        "after the Retry-After header's seconds",
    },
    503: {"model": ErrorResponse, "description": "this ingress replica runs its maximum of timelines; retry later"},
}
