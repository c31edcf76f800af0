"""Small synthetic media made on the fly with the bundled ffmpeg (no dataset needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from models.media import ffmpeg_exe

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ffmpeg(args: list[str]) -> bytes:
    cmd = [ffmpeg_exe(), "-v", "error", "-nostdin", *args, "pipe:"]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout


def tone_wav(seconds: float = 2.0, freq: int = 220) -> bytes:
    """A mono 16 kHz WAV sine tone."""
    return _ffmpeg(["-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate=16000", "-f", "wav"])


def pattern_mp4(seconds: float = 2.0, with_audio: bool = True, fps: int = 24) -> bytes:
    """A 320x240 MP4 test pattern, optionally with an AAC tone track."""
    args = ["-f", "lavfi", "-i", f"testsrc=size=320x240:rate={fps}:duration={seconds}"]
    if with_audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=330:duration={seconds}", "-c:a", "aac", "-shortest"]
    return _ffmpeg([*args, "-pix_fmt", "yuv420p", "-f", "mp4", "-movflags", "frag_keyframe+empty_moov"])


def image_png(pixels: np.ndarray) -> bytes:
    """Encode a grayscale uint8 image as PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return buf.tobytes()


def still_video(image_path: Path, seconds: float = 1.0, fps: int = 16, size: int = 240) -> bytes:
    """An MP4 that shows one image (scaled up, padded to 320x240) for ``seconds``, with a tone track."""
    return _ffmpeg(
        [
            "-loop",
            "1",
            "-i",
            str(image_path),
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=300:duration={seconds}",
            "-t",
            str(seconds),
            "-r",
            str(fps),
            "-vf",
            f"scale={size}:{size},pad=320:240:(ow-iw)/2:(oh-ih)/2",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
            "-f",
            "mp4",
            "-movflags",
            "frag_keyframe+empty_moov",
        ]
    )
