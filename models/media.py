"""Decoding uploaded media with ffmpeg (ffmpeg-python + the binary shipped by imageio-ffmpeg).

Every decode runs in a separate ffmpeg process, with a wall-clock timeout and a bound on how much
it may output, so a hostile or broken file can neither hang nor exhaust the caller. Errors are
typed (:class:`MediaError` and subclasses) so that callers can turn them into clear messages.

One exception: a mono PCM WAV already at the wanted sample rate (the usual speech format) is read
in-process with the standard library's ``wave`` module, which gives exactly the samples ffmpeg
would and saves the ~20 ms an ffmpeg process costs. Anything else, or anything ``wave`` rejects,
goes to ffmpeg.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from functools import lru_cache

import ffmpeg
import numpy as np


class MediaError(ValueError):
    """Base class of every media problem caused by the input itself."""


class EmptyMediaError(MediaError):
    """The payload is empty."""


class MediaDecodeError(MediaError):
    """ffmpeg could not read the payload (corrupt, truncated or not media at all)."""


class NoAudioStreamError(MediaError):
    """The container has no usable audio track."""


class NoVideoStreamError(MediaError):
    """The container has no video or image stream."""


class MediaTimeoutError(MediaError):
    """Decoding took longer than allowed."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied to every decode."""

    timeout_s: float = 20.0
    max_audio_seconds: float = 30.0
    max_video_seconds: float = 30.0
    max_decoded_frames: int = 900
    max_frame_side: int = 320


DEFAULT_LIMITS = DecodeLimits()


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (no system ffmpeg needed)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(stream: ffmpeg.nodes.OutputStream, timeout_s: float, max_bytes: int) -> tuple[bytes, str]:
    """Run a compiled ffmpeg-python graph with a wall-clock timeout and at most ``max_bytes`` of output; return
    (stdout, stderr) or raise a :class:`MediaError`."""
    cmd = stream.global_args("-nostdin", "-hide_banner").compile(cmd=ffmpeg_exe())
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise MediaTimeoutError(f"decoding took longer than {timeout_s:.0f} s") from exc
    stderr = proc.stderr.decode("utf-8", "replace")
    if len(proc.stdout) > max_bytes:
        raise MediaDecodeError("decoded media is larger than allowed")
    if proc.returncode != 0:
        if re.search(r"matches no streams|does not contain any stream|Output file .* does not contain", stderr):
            raise _missing_stream_error(stream)
        raise MediaDecodeError(_ffmpeg_reason(stderr))
    return proc.stdout, stderr


def _missing_stream_error(stream: ffmpeg.nodes.OutputStream) -> MediaError:
    args = " ".join(stream.get_args())
    if "0:a" in args:
        return NoAudioStreamError("the file has no audio track")
    return NoVideoStreamError("the file has no video or image stream")


def _ffmpeg_reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    tail = lines[-1] if lines else "unknown error"
    return f"could not decode media: {tail[:200]}"


class _TempMedia:
    """Write payload bytes to a private temp file (containers like MP4 need seeking, not a pipe)."""

    def __init__(self, data: bytes) -> None:
        if not data:
            raise EmptyMediaError("the uploaded file is empty")
        fd, self.path = tempfile.mkstemp(prefix="emo-media-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: object) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


def decode_audio(data: bytes, sample_rate: int = 16000, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode any ffmpeg-readable audio (or a video's audio track) to mono float32 at ``sample_rate``.

    At most ``limits.max_audio_seconds`` are read. Raises :class:`MediaError` subclasses.
    """
    wave_data = _read_plain_wav(data, sample_rate, limits.max_audio_seconds)
    if wave_data is not None:
        return _checked_wave(wave_data, sample_rate)
    with _TempMedia(data) as path:
        stream = ffmpeg.input(path, t=limits.max_audio_seconds).output(
            "pipe:", map="0:a:0", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate
        )
        max_bytes = int(limits.max_audio_seconds * sample_rate * 4) + 65536
        raw, _ = run_ffmpeg(stream, limits.timeout_s, max_bytes)
    return _checked_wave(np.frombuffer(raw, dtype=np.float32).copy(), sample_rate)


def _checked_wave(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    if samples.size < sample_rate // 20:
        raise MediaDecodeError("the audio track is empty or shorter than 50 ms")
    if not np.isfinite(samples).all():
        raise MediaDecodeError("the audio contains invalid samples")
    return samples


_PCM_SCALE = {1: (np.uint8, 128.0, 128.0), 2: (np.dtype("<i2"), 0.0, 32768.0), 4: (np.dtype("<i4"), 0.0, 2147483648.0)}


def _read_plain_wav(data: bytes, sample_rate: int, max_seconds: float) -> np.ndarray | None:
    """Samples of a mono 8/16/32-bit PCM WAV at ``sample_rate``, as ffmpeg's ``pcm_f32le`` gives them.

    ``None`` for anything else (other rates, channels, sample formats, or a malformed header),
    which then goes to ffmpeg.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getnchannels() != 1 or wav.getframerate() != sample_rate or wav.getsampwidth() not in _PCM_SCALE:
                return None
            frames = wav.readframes(min(wav.getnframes(), int(max_seconds * sample_rate)))
            dtype, offset, scale = _PCM_SCALE[wav.getsampwidth()]
    except (wave.Error, EOFError, ValueError):
        return None
    usable = len(frames) - len(frames) % np.dtype(dtype).itemsize
    return ((np.frombuffer(frames[:usable], dtype=dtype).astype(np.float32) - offset) / scale).astype(np.float32)


_SIZE_RE = re.compile(r"Video: rawvideo.*?, (\d{1,5})x(\d{1,5})")


def decode_frames(data: bytes, num_frames: int = 16, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode a video (or a still image) to ``(T, H, W)`` uint8 grayscale frames, T <= ``num_frames``.

    Frames are sampled uniformly over the clip; a still image gives one frame. Frames are scaled
    down so that their longer side is at most ``limits.max_frame_side``.
    """
    side = limits.max_frame_side
    scale = f"scale=w='min({side},iw)':h='min({side},ih)':force_original_aspect_ratio=decrease:force_divisible_by=2"
    with _TempMedia(data) as path:
        stream = ffmpeg.input(path, t=limits.max_video_seconds).output(
            "pipe:",
            map="0:v:0",
            vf=scale,
            format="rawvideo",
            pix_fmt="gray",
            **{"frames:v": limits.max_decoded_frames, "fps_mode": "passthrough"},
        )
        max_bytes = limits.max_decoded_frames * side * side + 65536
        raw, stderr = run_ffmpeg(stream, limits.timeout_s, max_bytes)
    out_part = stderr.split("Output #0", 1)[-1]
    match = _SIZE_RE.search(out_part)
    if match is None or not raw:
        raise MediaDecodeError("the file has no decodable video frames")
    width, height = int(match.group(1)), int(match.group(2))
    frame_bytes = width * height
    total = len(raw) // frame_bytes
    if total == 0:
        raise MediaDecodeError("the file has no decodable video frames")
    frames = np.frombuffer(raw[: total * frame_bytes], dtype=np.uint8).reshape(total, height, width)
    return sample_uniform(frames, num_frames)


def sample_uniform(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """Pick at most ``num_frames`` frames spread uniformly over the sequence."""
    total = frames.shape[0]
    if total <= num_frames:
        return frames.copy()
    idx = np.linspace(0, total - 1, num_frames).round().astype(int)
    return frames[idx].copy()
