"""Long recordings for a timeline: probe, decode once, cut into segments (no Ray, no model).

A recording (a call, an interview) is decoded once: its audio to 16 kHz mono 16-bit PCM, its video (if any) to
JPEG frames at a fixed rate, each by one ffmpeg process with a wall-clock timeout and bounded output
(:mod:`models.media`'s rules). :func:`plan_spans` cuts the duration into segments of ``segment_s`` every
``hop_s``; :meth:`Recording.audio_wav` and :meth:`Recording.frames_jpeg` give one segment's payloads in the
formats the encoders read: a WAV (read without ffmpeg) and concatenated JPEG frames (ffmpeg reads them as a
video of those frames).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ffmpeg
import numpy as np

from models.media import (
    DecodeLimits,
    EmptyMediaError,
    MediaDecodeError,
    MediaError,
    MediaTimeoutError,
    NoAudioStreamError,
    NoVideoStreamError,
    decode_audio,
    ffmpeg_exe,
    run_ffmpeg,
)

SAMPLE_RATE = 16_000
JPEG_SOI = b"\xff\xd8"
_DURATION_RE = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+.*?: (Audio|Video): (.*)$", re.MULTILINE)
_MAX_JPEG_BYTES = 256 * 1024  # bound of one encoded frame (320 px side) in the output check


class RecordingTooLong(MediaError):
    """The recording lasts longer than allowed."""

    def __init__(self, duration_s: float, max_s: float) -> None:
        super().__init__(f"the recording lasts {_clock(duration_s)}; a timeline takes at most {_clock(max_s)}")
        self.duration_s = duration_s
        self.max_s = max_s


class RecordingTooShort(MediaError):
    """The recording is shorter than one segment may be (a still image, a blip)."""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds, 1), 60)
    return f"{int(minutes)} min {secs:g} s" if minutes else f"{secs:g} s"


@dataclass(frozen=True)
class RecordingLimits:
    """Bounds of one timeline decode."""

    max_seconds: float = 900.0
    timeout_s: float = 300.0
    fps: float = 5.0
    max_frame_side: int = 320
    min_seconds: float = 0.5


@dataclass(frozen=True)
class Probe:
    """What the container says: its duration (``None`` when unknown) and which streams it has."""

    duration_s: float | None
    has_audio: bool
    has_video: bool


@dataclass(frozen=True)
class Span:
    """One segment of the timeline, in seconds from the start of the recording."""

    index: int
    start_s: float
    end_s: float
    heard: tuple[float, float] | None = None  # the stretch whose audio the encoder hears; None: the whole span


def probe(path: str, timeout_s: float = 20.0) -> Probe:
    """Read the container's header with ``ffmpeg -i`` (no decode). Raises :class:`MediaDecodeError` for non-media."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise MediaTimeoutError(f"reading the file took longer than {timeout_s:.0f} s") from exc
    text = proc.stderr.decode("utf-8", "replace")
    streams = _STREAM_RE.findall(text)
    if not streams:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        raise MediaDecodeError(f"could not decode media: {(lines[-1] if lines else 'no streams')[:200]}")
    match = _DURATION_RE.search(text)
    duration = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None
    return Probe(
        duration_s=duration,
        has_audio=any(kind == "Audio" for kind, _ in streams),
        has_video=any(kind == "Video" and "(attached pic)" not in rest for kind, rest in streams),
    )


def plan_spans(duration_s: float, segment_s: float, hop_s: float, min_segment_s: float = 1.0) -> list[Span]:
    """Segments of ``segment_s`` starting every ``hop_s`` (``hop_s <= segment_s``), covering ``[0, duration_s]``.

    The last segment ends at ``duration_s``; a last one shorter than ``min_segment_s`` is merged into the one
    before it (which then runs to the end), so no segment is a sliver.
    """
    if not 0 < hop_s <= segment_s:
        raise ValueError(f"hop_s ({hop_s}) must be in (0, segment_s ({segment_s})]")
    if duration_s <= 0:
        return []
    spans: list[Span] = []
    start = 0.0
    while True:
        end = min(start + segment_s, duration_s)
        spans.append(Span(len(spans), round(float(start), 3), round(float(end), 3)))
        if end >= duration_s:
            break
        start = len(spans) * hop_s
    if len(spans) > 1 and spans[-1].end_s - spans[-1].start_s < min_segment_s:
        last = spans.pop()
        spans[-1] = Span(spans[-1].index, spans[-1].start_s, last.end_s)
    return spans


def speech_spans(
    pcm: np.ndarray,
    duration_s: float,
    max_segment_s: float,
    min_segment_s: float = 1.0,
    min_pause_s: float = 0.3,
    speech_pad_s: float = 0.25,
) -> list[Span]:
    """Segments that follow the speech: one per stretch of speech, cut in the middle of each pause between them.

    Silero's voice-activity detector (bundled with faster-whisper) finds the speech in 16-bit 16 kHz ``pcm``;
    pauses of at least ``min_pause_s`` separate stretches. The cuts fall halfway through each pause, so the
    segments still cover ``[0, duration_s]``; one longer than ``max_segment_s`` is cut into equal parts, and one
    shorter than ``min_segment_s`` joins its shorter neighbour. Without any speech: ``max_segment_s`` pieces.

    Each segment's ``heard`` stretch runs from its first speech to its last, widened by ``speech_pad_s`` on each
    side (within the segment): the encoder hears the utterance and not a click or breath at the far end of the
    pause, which its silence trim would otherwise keep, with the whole pause between.
    """
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(min_silence_duration_ms=int(min_pause_s * 1000), speech_pad_ms=100, min_speech_duration_ms=250)
    speech = get_speech_timestamps(pcm.astype(np.float32) / 32768.0, options, sampling_rate=SAMPLE_RATE)
    bounds = [(c["start"] / SAMPLE_RATE, c["end"] / SAMPLE_RATE) for c in speech]
    cuts = [0.0] + [(a_end + b_start) / 2 for (_, a_end), (b_start, _) in itertools.pairwise(bounds)] + [duration_s]
    pieces: list[tuple[float, float]] = []
    for start, end in itertools.pairwise(cuts):
        parts = max(1, math.ceil((end - start) / max_segment_s - 1e-9))
        step = (end - start) / parts
        pieces += [(start + i * step, start + (i + 1) * step) for i in range(parts)]

    def length(i: int) -> float:
        return pieces[i][1] - pieces[i][0] if 0 <= i < len(pieces) else math.inf

    while len(pieces) > 1:
        short = min(range(len(pieces)), key=length)
        if length(short) >= min_segment_s:
            break
        lo, hi = (short - 1, short) if length(short - 1) <= length(short + 1) else (short, short + 1)
        pieces[lo : hi + 1] = [(pieces[lo][0], pieces[hi][1])]
    return [Span(i, round(a, 3), round(b, 3), _heard(a, b, bounds, speech_pad_s)) for i, (a, b) in enumerate(pieces)]


def _heard(start: float, end: float, speech: list[tuple[float, float]], pad_s: float) -> tuple[float, float] | None:
    """From the first to the last speech within ``[start, end]``, widened by ``pad_s``; ``None`` without speech."""
    inside = [(max(a, start), min(b, end)) for a, b in speech if b > start and a < end]
    if not inside:
        return None
    return round(max(start, inside[0][0] - pad_s), 3), round(min(end, inside[-1][1] + pad_s), 3)


class Recording:
    """A decoded recording: 16-bit PCM audio (or ``None``, with ``audio_error`` saying why) and JPEG frames."""

    def __init__(
        self,
        pcm: np.ndarray | None,
        frames: list[bytes],
        fps: float,
        audio_error: MediaError | None = None,
        video: bool = False,
    ) -> None:
        self.pcm = pcm
        self.frames = frames
        self.fps = fps
        self.audio_error = audio_error
        self.video = video
        audio_s = 0.0 if pcm is None else pcm.size / SAMPLE_RATE
        self.duration_s = round(max(audio_s, len(frames) / fps if frames else 0.0), 3)

    def audio_wav(self, span: Span) -> bytes | None:
        """The span's audio (its ``heard`` stretch when it has one) as a mono 16-bit 16 kHz WAV; ``None`` when the
        recording has under 50 ms there."""
        if self.pcm is None:
            return None
        start, end = span.heard or (span.start_s, span.end_s)
        chunk = self.pcm[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        if chunk.size < SAMPLE_RATE // 20:
            return None
        out = io.BytesIO()
        with wave.open(out, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            wav.writeframes(chunk.astype("<i2").tobytes())
        return out.getvalue()

    def frames_jpeg(self, span: Span) -> bytes | None:
        """The span's frames as concatenated JPEGs; ``None`` when no frame falls in it."""
        first = math.ceil(span.start_s * self.fps - 1e-6)
        last = math.ceil(span.end_s * self.fps - 1e-6)  # frames at t in [start, end)
        chosen = self.frames[max(first, 0) : last]
        return b"".join(chosen) if chosen else None


def split_jpegs(stream: bytes) -> list[bytes]:
    """The JPEG files of an MJPEG stream (ffmpeg's ``image2pipe`` output), found by walking their markers."""
    frames: list[bytes] = []
    pos, size = 0, len(stream)
    while pos + 4 <= size and stream.startswith(JPEG_SOI, pos):
        i = pos + 2
        while i + 4 <= size:  # header segments: FF xx + 16-bit length, up to the start of scan
            if stream[i] != 0xFF:
                raise MediaDecodeError("malformed JPEG in the decoded frames")
            marker = stream[i + 1]
            length = int.from_bytes(stream[i + 2 : i + 4], "big")
            i += 2 + length
            if marker == 0xDA:
                break
        while i + 1 < size:  # entropy-coded data: FF 00 is a stuffed byte, FF D0-D7 restarts, FF D9 the end
            if stream[i] == 0xFF and stream[i + 1] not in (0x00, *range(0xD0, 0xD8)):
                break
            i += 1
        if not stream.startswith(b"\xff\xd9", i):
            raise MediaDecodeError("truncated JPEG in the decoded frames")
        frames.append(stream[pos : i + 2])
        pos = i + 2
    return frames


def _decode_frames(path: str, limits: RecordingLimits, seconds: float) -> list[bytes]:
    side = limits.max_frame_side
    scale = f"scale=w='min({side},iw)':h='min({side},ih)':force_original_aspect_ratio=decrease:force_divisible_by=2"
    stream = ffmpeg.input(path, t=seconds).output(
        "pipe:", map="0:v:0", vf=f"fps={limits.fps:g},{scale}", vcodec="mjpeg", format="image2pipe", **{"q:v": 5}
    )
    max_frames = math.ceil(seconds * limits.fps) + 2
    raw, _ = run_ffmpeg(stream, limits.timeout_s, max_frames * _MAX_JPEG_BYTES)
    return split_jpegs(raw)


def decode_recording(data: bytes, video: bool, limits: RecordingLimits, audio_data: bytes | None = None) -> Recording:
    """Decode a recording once: audio (from ``audio_data`` when given, else ``data``'s track) and, with ``video``,
    frames at ``limits.fps``.

    Raises :class:`RecordingTooLong` (its header, or its decoded audio, lasts over ``limits.max_seconds``),
    :class:`RecordingTooShort`, or another :class:`MediaError` (not media, no usable stream).
    """
    if not data:
        raise EmptyMediaError("the uploaded file is empty")
    decode = DecodeLimits(
        timeout_s=limits.timeout_s, max_audio_seconds=limits.max_seconds + 1.0, max_video_seconds=limits.max_seconds
    )
    fd, path = tempfile.mkstemp(prefix="emo-timeline-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        info = probe(path)
        if info.duration_s is not None and info.duration_s > limits.max_seconds + 0.5:
            raise RecordingTooLong(info.duration_s, limits.max_seconds)
        if video and not info.has_video:
            raise NoVideoStreamError("the file has no video stream")
        with ThreadPoolExecutor(1) as pool:  # the frames decode while the audio does
            frames_job = pool.submit(_decode_frames, path, limits, limits.max_seconds) if video else None
            pcm, audio_error = _decode_pcm(audio_data if audio_data is not None else data, decode, limits)
            if pcm is None and not video:
                raise audio_error or NoAudioStreamError("the file has no audio track")
            frames = frames_job.result() if frames_job is not None else []
        if video and not frames:
            raise MediaDecodeError("the file has no decodable video frames")
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    recording = Recording(pcm, frames, limits.fps, audio_error, video)
    if recording.duration_s < limits.min_seconds:
        raise RecordingTooShort(
            f"the recording lasts {recording.duration_s:g} s; a timeline needs at least {limits.min_seconds:g} s"
        )
    return recording


def _decode_pcm(
    data: bytes, decode: DecodeLimits, limits: RecordingLimits
) -> tuple[np.ndarray | None, MediaError | None]:
    """16-bit PCM of ``data``'s audio, or ``None`` and why (a missing or unusable track is not fatal for video)."""
    try:
        samples = decode_audio(data, SAMPLE_RATE, decode)
    except (NoAudioStreamError, MediaDecodeError) as exc:
        return None, exc
    if samples.size > limits.max_seconds * SAMPLE_RATE + SAMPLE_RATE // 2:
        raise RecordingTooLong(samples.size / SAMPLE_RATE, limits.max_seconds)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16), None
