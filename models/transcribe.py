"""Speech to text: Whisper-base on CTranslate2 (``faster-whisper``), the packaged model the speech encoder uses.

:class:`Transcriber` loads the folder that :func:`models.audio.whisper.whisper_model_folder` assembles once from the
two PyPI packages (one reassembly serves the speech encoder and this), and transcribes decoded 16 kHz mono audio,
so a caller that already decoded an upload (as :class:`models.inference.AudioPipeline` does) shares that decode.

int8 on CPU and float16 on a GPU (``compute_type="auto"``); greedy decoding (``beam_size`` 1) by default; the
language is detected unless given; Silero VAD (bundled with faster-whisper) drops non-speech from inputs of at
least ``vad_min_s`` seconds, where Whisper otherwise tends to invent words over long silences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.audio.whisper import MODEL_BIN_SHA256, SAMPLE_RATE, whisper_model_folder
from models.media import DEFAULT_LIMITS, DecodeLimits, decode_audio

ComputeType = Literal["auto", "int8", "int8_float16", "float16", "float32"]
TranscriberDevice = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class TranscriberSettings:
    """How the model is loaded and decodes (the Serve config's ``transcriber`` section carries the same keys)."""

    device: TranscriberDevice = "auto"
    compute_type: ComputeType = "auto"
    cpu_threads: int = 1
    workers: int = 1  # transcriptions one model runs at once (CTranslate2's num_workers)
    beam_size: int = 1
    vad_min_s: float = 10.0
    language: str | None = None  # None: detected per input


@dataclass(frozen=True)
class Segment:
    """One stretch of speech: seconds from the start of the audio, and its words."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class TranscriptResult:
    """The words of one input, its language and where the time went."""

    text: str
    language: str
    language_probability: float
    duration_s: float
    segments: list[Segment] = field(default_factory=list)
    model_ms: float = 0.0
    vad: bool = False

    @property
    def real_time_factor(self) -> float:
        """Transcription time over audio time (0.1: ten times faster than real time)."""
        return self.model_ms / 1000.0 / self.duration_s if self.duration_s > 0 else 0.0


def resolve_device(device: TranscriberDevice) -> Literal["cpu", "cuda"]:
    """``auto``: CUDA when CTranslate2 sees a GPU, else CPU; ``cuda`` without one is an error that says so."""
    import ctranslate2

    gpus = ctranslate2.get_cuda_device_count()
    if device == "cuda" and gpus == 0:
        raise RuntimeError("transcriber device 'cuda' asked for, but CTranslate2 sees no CUDA device")
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return device


def resolve_compute_type(compute_type: ComputeType, device: str) -> str:
    """``auto``: float16 on a GPU, int8 on CPU."""
    if compute_type != "auto":
        return compute_type
    return "float16" if device == "cuda" else "int8"


class Transcriber:
    """Whisper-base through faster-whisper: decoded 16 kHz mono float32 audio in, :class:`TranscriptResult` out.

    Thread-safe: up to ``settings.workers`` calls run at once (more wait inside CTranslate2).
    """

    def __init__(self, settings: TranscriberSettings | None = None, model_dir: str | Path | None = None) -> None:
        from faster_whisper import WhisperModel

        self.settings = settings or TranscriberSettings()
        self.device = resolve_device(self.settings.device)
        self.compute_type = resolve_compute_type(self.settings.compute_type, self.device)
        self.folder = Path(model_dir) if model_dir else whisper_model_folder()
        self.model = WhisperModel(
            str(self.folder),
            device=self.device,
            compute_type=self.compute_type,
            cpu_threads=self.settings.cpu_threads,
            num_workers=self.settings.workers,
        )
        self.version = f"whisper-base-{MODEL_BIN_SHA256[:6]}-{self.compute_type}"

    def transcribe(self, wave: np.ndarray) -> TranscriptResult:
        """The transcript of ``wave`` (mono float32 samples at 16 kHz)."""
        samples = np.ascontiguousarray(wave, dtype=np.float32)
        duration = len(samples) / SAMPLE_RATE
        vad = duration >= self.settings.vad_min_s
        start = time.perf_counter()
        segments, info = self.model.transcribe(
            samples,
            language=self.settings.language,
            beam_size=self.settings.beam_size,
            condition_on_previous_text=False,
            vad_filter=vad,
        )
        found = [Segment(round(s.start, 2), round(s.end, 2), s.text.strip()) for s in segments]  # decodes here
        model_ms = (time.perf_counter() - start) * 1000.0
        return TranscriptResult(
            text=" ".join(s.text for s in found if s.text),
            language=info.language,
            language_probability=round(float(info.language_probability), 4),
            duration_s=round(duration, 3),
            segments=found,
            model_ms=model_ms,
            vad=vad,
        )

    def transcribe_bytes(self, data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> TranscriptResult:
        """Decode any ffmpeg-readable audio (or a video's audio track) and transcribe it."""
        return self.transcribe(decode_audio(data, SAMPLE_RATE, limits))
