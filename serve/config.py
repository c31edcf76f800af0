"""The one configuration schema of the Serve application (what ``build_app`` takes as ``args``).

``serve run deploy/serve_config.yaml`` passes the file's ``args:`` here; ``serve run serve.app:build_app``
with no args uses the defaults. Replica resources, replica counts and autoscaling are Ray Serve's own
deployment options (the ``deployments:`` list of the YAML, defaults in :mod:`serve.app`), not part of this.

Model paths and batching reach the encoders through Serve's ``user_config`` (see
:meth:`AppConfig.encoder_user_config`). Setting them under a deployment's ``user_config`` and re-running
``serve deploy`` hot-swaps the weights through ``reconfigure`` without restarting replicas; changing
``args`` instead changes the application's code version, so Serve replaces the replicas.

``access`` holds API-key sources, the CORS allow-list and per-client limits; the keys themselves are never
in ``args`` (a Serve config file is in the repository and in ``serve status``): only where to read them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.common import Precision
from models.labels import MODALITIES
from models.media import DecodeLimits
from models.transcribe import ComputeType, TranscriberSettings

Device = Literal["auto", "cpu", "cuda"]
TranscribeMode = Literal["off", "return", "fuse"]
TRANSCRIBE_MODES: tuple[str, ...] = ("off", "return", "fuse")
Segmentation = Literal["fixed", "speech"]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in the YAML must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Strict):
    """Where the weights are (``None``: the defaults in ``models/weights/<name>``)."""

    text_weights: str | None = None
    audio_weights: str | None = None
    video_weights: str | None = None
    fusion_weights: str | None = None
    text_backbone: str | None = Field(None, description="override of the text backbone (local folder or HF id)")
    revision: str | None = Field(None, description="change to force a reload of weights replaced in place")

    def weights(self, name: str) -> str | None:
        """Weights folder of ``name`` (text, audio, video or fusion)."""
        return getattr(self, f"{name}_weights")


MAX_CONTEXT_TURNS = 20  # the most previous turns a text request may carry (the OpenAPI schema's bound)
MAX_CONTEXT_CHARS = 1000  # the most characters of one previous turn's text (the OpenAPI schema's bound)


class LimitsConfig(_Strict):
    """Input limits applied by the ingress and by the decoders."""

    max_upload_mb: float = Field(50.0, gt=0, description="request body limit, enforced while reading")
    max_text_chars: int = Field(
        20_000,
        gt=0,
        description="longer texts are rejected (422); the model window (128 tokens) truncates, and says so",
    )
    max_context_turns: int = Field(
        MAX_CONTEXT_TURNS,
        ge=0,
        le=MAX_CONTEXT_TURNS,
        description="previous turns a text may carry as context; more are rejected (422). The 128-token model "
        "window keeps the newest turns that fit and says how many it cut. 0 rejects any context",
    )
    max_context_chars: int = Field(
        MAX_CONTEXT_CHARS, gt=0, le=MAX_CONTEXT_CHARS, description="characters of one context turn; longer: 422"
    )
    num_frames: int = Field(16, ge=1, le=64, description="frames sampled uniformly from a video")
    decode_timeout_s: float = Field(20.0, gt=0, description="wall-clock limit of one ffmpeg decode")
    max_media_seconds: float = Field(30.0, gt=0, description="audio/video beyond this is not decoded")
    max_timeline_seconds: float = Field(
        900.0, gt=0, description="longest recording POST /predict/timeline takes; longer ones are answered 422"
    )
    max_timeline_upload_mb: float = Field(
        200.0, gt=0, description="request body limit of POST /predict/timeline (413), enforced while reading"
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_timeline_upload_bytes(self) -> int:
        return int(self.max_timeline_upload_mb * 1024 * 1024)

    def decode_limits(self) -> DecodeLimits:
        """The matching :class:`models.media.DecodeLimits`."""
        return DecodeLimits(
            timeout_s=self.decode_timeout_s,
            max_audio_seconds=self.max_media_seconds,
            max_video_seconds=self.max_media_seconds,
        )


class EncoderConfig(_Strict):
    """Per-encoder serving settings."""

    timeout_s: float = Field(30.0, gt=0, description="the ingress drops the modality after this")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size; kept <= max_ongoing_requests")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="how long a batch waits to fill up (adds this to a "
        "lone request); with 0 a batch takes what queued while the last forward ran",
    )
    max_ongoing_requests: int = Field(16, ge=1, description="Serve's per-replica concurrency cap")
    calls_per_replica: int = Field(
        2,
        ge=0,
        description="handle calls the ingress keeps in flight per live replica "
        "of this encoder; requests beyond wait in the ingress and leave together as one "
        "call (up to max_batch_size items). 0: one call per request, no coalescing",
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica")
    prepare_threads: int = Field(2, ge=1, description="threads decoding/preprocessing in parallel per replica")
    device: Device = "auto"
    precision: Precision = Field(
        "auto",
        description="auto = bfloat16 autocast where the CPU/GPU has native bf16 (as in evaluation), else float32",
    )

    @model_validator(mode="after")
    def _batch_fits(self) -> EncoderConfig:
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must be <= max_ongoing_requests "
                f"({self.max_ongoing_requests}), or batches can never fill"
            )
        return self


def _default_encoders() -> dict[str, EncoderConfig]:
    return {
        "text": EncoderConfig(timeout_s=10.0, max_batch_size=16, max_ongoing_requests=32),
        "audio": EncoderConfig(timeout_s=30.0),
        "video": EncoderConfig(timeout_s=40.0),
    }


class EncodersConfig(_Strict):
    text: EncoderConfig = Field(default_factory=lambda: _default_encoders()["text"])
    audio: EncoderConfig = Field(default_factory=lambda: _default_encoders()["audio"])
    video: EncoderConfig = Field(default_factory=lambda: _default_encoders()["video"])

    def __getitem__(self, modality: str) -> EncoderConfig:
        if modality not in MODALITIES:
            raise KeyError(modality)
        return getattr(self, modality)


class ApiKeysConfig(_Strict):
    """Where the API keys come from: an environment variable and/or a file, never this config (it is in git).

    With ``required`` the prediction endpoints need a key, and a replica that finds no key refuses to start.
    """

    required: bool = Field(False, description="prediction endpoints answer 401 without a valid key")
    env: str | None = Field(
        "EMOTION_API_KEYS",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="name of an environment variable holding keys, comma or whitespace "
        "separated (the variable's name, not a key)",
    )
    file: str | None = Field(
        None,
        description="file with one key per line (# comments), e.g. a mounted "
        "Kubernetes Secret; re-read when it changes",
    )


class ClientLimitsConfig(_Strict):
    """Per-client limits of one ingress replica (a client is an API key, or an address when keys are off)."""

    requests_per_minute: float | None = Field(
        None, gt=0, description="sustained prediction requests per client; None: no rate limit"
    )
    burst: int = Field(10, ge=1, description="requests a client may send at once before the rate applies")
    max_concurrent_uploads: int | None = Field(
        None, ge=1, description="media requests (/predict, /predict/audio, /predict/video) in flight per client"
    )
    max_concurrent_timelines: int | None = Field(
        2, ge=1, description="POST /predict/timeline requests in progress per client (429 beyond); None: no limit"
    )


class AccessConfig(_Strict):
    """Who may call the prediction endpoints, from which web origins, and how much."""

    api_keys: ApiKeysConfig = Field(default_factory=ApiKeysConfig)
    cors_origins: tuple[str, ...] = Field(
        (),
        description="origins other than the page's own allowed to call the "
        "API from a browser, e.g. https://app.example.org",
    )
    per_client: ClientLimitsConfig = Field(default_factory=ClientLimitsConfig)

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path) or '*'")
        return origins


class StreamConfig(_Strict):
    """Live streams on ``/ws/stream`` (:mod:`serve.stream`): window, update interval and per-replica bounds."""

    update_interval_s: float = Field(
        1.0, ge=0.1, le=60, description="how often a stream's window is predicted (an update still running skips ticks)"
    )
    audio_window_s: float = Field(3.0, gt=0, le=30, description="seconds of 16 kHz PCM audio kept per stream")
    min_audio_s: float = Field(0.5, gt=0, description="less buffered audio than this is not sent to the encoder")
    max_frames: int = Field(8, ge=1, le=64, description="JPEG frames kept per stream (the most recent)")
    frame_max_age_s: float = Field(3.0, gt=0, description="frames older than this leave the window")
    max_fps: float = Field(
        15.0, gt=0, description="frames arriving faster than this (on average; short bursts pass) are dropped"
    )
    max_connections: int = Field(32, ge=1, description="open streams per ingress replica; more are closed (1013)")
    max_buffer_bytes: int = Field(
        4 * 1024 * 1024,
        ge=65536,
        description="bytes buffered per stream (audio, frames, text); the oldest frames are dropped first",
    )
    max_message_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest client message; larger ones close the stream (1009)"
    )
    idle_timeout_s: float = Field(30.0, gt=0, description="a stream that sends nothing for this long is closed (4408)")
    send_timeout_s: float = Field(
        10.0, gt=0, description="an update the client does not take within this closes the stream"
    )


class TimelineConfig(_Strict):
    """``POST /predict/timeline`` (:mod:`serve.timeline`): how a long recording is cut, and how hard it is pushed."""

    segment_s: float = Field(3.0, ge=1.0, le=30.0, description="segment length when the request names none")
    hop_s: float | None = Field(
        None, ge=0.5, le=30.0, description="seconds between segment starts (<= segment_s); None: segment_s"
    )
    segmentation: Segmentation = Field(
        "speech",
        description="how a request naming neither segmentation nor segment_s/hop_s is cut: speech (one segment per "
        "stretch of speech, cut halfway through the pauses; fixed when the recording has no audio) or fixed "
        "(segment_s every hop_s)",
    )
    speech_max_s: float = Field(
        10.0, ge=1.0, le=30.0, description="speech segmentation: a longer stretch is cut into equal parts"
    )
    speech_pad_s: float = Field(
        0.25, ge=0.0, le=5.0, description="speech segmentation: the encoder hears each segment's speech widened by this"
    )
    min_segment_s: float = Field(1.0, ge=0.1, description="a shorter segment joins its neighbour")
    fps: float = Field(5.0, gt=0, le=30.0, description="video frames decoded per second of the recording")
    segments_in_flight: int = Field(
        8,
        ge=1,
        le=256,
        description="segments of one timeline sent to the encoders at once (the coalescer spreads them over the "
        "replicas and batches); the next leaves as one finishes",
    )
    max_active: int = Field(4, ge=1, description="timelines in progress per ingress replica (503 beyond)")
    decode_timeout_s: float = Field(300.0, gt=0, description="wall-clock limit of decoding one whole recording")
    default_transcribe: TranscribeMode = Field(
        "off", description="transcribe without a request option: per-segment words cost a Whisper call per segment"
    )
    moments: int = Field(5, ge=0, le=50, description="strongest moments listed in the summary")

    @model_validator(mode="after")
    def _hop_fits(self) -> TimelineConfig:
        if self.hop_s is not None and self.hop_s > self.segment_s:
            raise ValueError(f"timeline.hop_s ({self.hop_s}) must be <= segment_s ({self.segment_s}): no gaps")
        return self


class TranscriberConfig(_Strict):
    """The ``Transcriber`` deployment (Whisper-base on faster-whisper) and the ingress's calls to it."""

    default_mode: TranscribeMode = Field(
        "return",
        description="what a request without a `transcribe` option gets: off (no transcript), return (the words "
        "in the answer) or fuse (also the text modality when the request has no text)",
    )
    timeout_s: float = Field(30.0, gt=0, description="the ingress drops the transcript after this (never the emotion)")
    max_ongoing_requests: int = Field(4, ge=1, description="Serve's per-replica concurrency cap")
    workers: int = Field(1, ge=1, description="transcriptions run at once per replica (CTranslate2 workers)")
    cpu_threads: int = Field(1, ge=1, description="CTranslate2 threads per transcription on CPU")
    prepare_threads: int = Field(2, ge=1, description="threads decoding uploads in parallel per replica")
    device: Device = "auto"
    compute_type: ComputeType = Field("auto", description="auto = int8 on CPU, float16 on a GPU")
    beam_size: int = Field(1, ge=1, le=10, description="1: greedy decoding")
    vad_min_s: float = Field(
        10.0, ge=0, description="inputs at least this long go through the VAD filter (non-speech removed)"
    )
    language: str | None = Field(None, description="a Whisper language code; None: detected per input")

    def settings(self) -> TranscriberSettings:
        """The :class:`models.transcribe.TranscriberSettings` of these keys."""
        return TranscriberSettings(
            device=self.device,
            compute_type=self.compute_type,
            cpu_threads=self.cpu_threads,
            workers=self.workers,
            beam_size=self.beam_size,
            vad_min_s=self.vad_min_s,
            language=self.language,
        )


class AppConfig(_Strict):
    """Everything the application builder reads."""

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    encoders: EncodersConfig = Field(default_factory=EncodersConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    transcriber: TranscriberConfig = Field(default_factory=TranscriberConfig)
    timeline: TimelineConfig = Field(default_factory=TimelineConfig)
    ingress_torch_threads: int = Field(1, ge=1)
    health_timeout_s: float = Field(
        5.0, gt=0, description="how long /api/health, and a starting ingress replica, wait for each encoder"
    )

    @model_validator(mode="after")
    def _segments_decodable(self) -> AppConfig:
        longest = max(self.timeline.segment_s, self.timeline.speech_max_s)
        if longest > self.limits.max_media_seconds:
            raise ValueError(
                f"timeline.segment_s and speech_max_s ({longest}) must be <= limits.max_media_seconds "
                f"({self.limits.max_media_seconds}): the encoders decode no more of a segment"
            )
        return self

    @classmethod
    def from_args(cls, args: dict[str, Any] | AppConfig | None) -> AppConfig:
        """Validate builder args (a plain dict from YAML, or already an AppConfig)."""
        if isinstance(args, AppConfig):
            return args
        return cls.model_validate(args or {})

    def encoder_user_config(self, modality: str) -> dict[str, Any]:
        """The ``user_config`` of one encoder deployment (hot-swappable part)."""
        enc = self.encoders[modality]
        return {
            "weights_dir": self.models.weights(modality),
            "backbone": self.models.text_backbone if modality == "text" else None,
            "revision": self.models.revision,
            "max_batch_size": enc.max_batch_size,
            "batch_wait_timeout_s": enc.batch_wait_timeout_s,
        }

    def transcriber_user_config(self) -> dict[str, Any]:
        """The ``user_config`` of the transcriber: a new ``models.revision`` reloads its model in place."""
        return {"revision": self.models.revision}

    def ingress_user_config(self) -> dict[str, Any]:
        """The ``user_config`` of the fusion ingress (hot-swappable fusion weights)."""
        return {"fusion_weights": self.models.fusion_weights, "revision": self.models.revision}


class EncoderUserConfig(_Strict):
    """What an encoder's ``reconfigure`` accepts; missing keys take the defaults."""

    weights_dir: str | None = None
    backbone: str | None = None
    revision: str | None = None
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)


class IngressUserConfig(_Strict):
    """What the ingress's ``reconfigure`` accepts."""

    fusion_weights: str | None = None
    revision: str | None = None
