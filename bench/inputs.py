"""Benchmark inputs: a fixed set of utterances, a ~5 s speech-like clip and a 16-frame video.

Media come from ``tests/fixtures/`` when that folder has them (made by ``tests/fixtures/make_fixtures.py``);
otherwise they are synthesised once with the ffmpeg binary bundled by imageio-ffmpeg into a temp folder.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"

FIXTURE_AUDIO = FIXTURES_DIR / "speech.wav"  # 5 s, 16 kHz mono speech
FIXTURE_VIDEO = FIXTURES_DIR / "face.mp4"  # 3 s at 8 fps (24 frames, 16 sampled) with that speech as audio track

# Short conversational utterances of varied length, like the MELD dialogue lines the text model was trained on.
TEXTS: tuple[str, ...] = (
    "Oh my God, I can't believe you did that!",
    "I'm fine.",
    "Why would you even say something like that to me in front of everybody?",
    "That's the best news I've heard all year, congratulations!",
    "I don't know, maybe we should just go home.",
    "Ugh, this coffee tastes like dirt.",
    "Wait, what? He's getting married? Since when?",
    "I miss her so much, it's like nothing makes sense anymore.",
    "Okay.",
    "Get out of my apartment right now, I mean it!",
    "Hey, you guys want to grab something to eat later?",
    "I'm really scared, what if the test comes back positive?",
    "You know what, forget it, it doesn't matter anymore.",
    "Did you see his face when she walked in? Priceless!",
    "Could you please pass me the remote?",
    "No no no no, this cannot be happening again, not today.",
    "Thank you so much for everything, really, I mean it.",
    "That smell is disgusting, what did you leave in the fridge?",
    "So we're just supposed to pretend that never happened?",
    "Whoa! You're here! I thought you were in London!",
    "I guess it's fine, I just expected a little more from you, that's all.",
    "We lost the apartment.",
    "Honestly I have never been this happy in my entire life, I could scream.",
    "He left without saying goodbye to anyone, not even to his own mother.",
)


@dataclass(frozen=True)
class MediaInputs:
    """The media payloads sent to every target, with where they came from."""

    audio: bytes
    audio_name: str
    video: bytes
    video_name: str
    source: str

    def describe(self) -> dict[str, object]:
        """JSON-ready description (names, sizes, origin)."""
        return {
            "source": self.source,
            "audio": {"name": self.audio_name, "bytes": len(self.audio)},
            "video": {"name": self.video_name, "bytes": len(self.video)},
            "texts": len(TEXTS),
        }


def ffmpeg_exe() -> str:
    """The ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def synthesize_media(folder: Path) -> tuple[Path, Path]:
    """Write a 5 s speech-like WAV and a 16-frame (2 s at 8 fps) 320x240 MP4 with an audio track to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    audio, video = folder / "bench_speech_5s.wav", folder / "bench_face_16f.mp4"
    voice = "0.3*sin(2*PI*(160+50*sin(2*PI*3*t))*t)*(0.55+0.45*sin(2*PI*4*t))+0.02*(random(0)-0.5)"
    exe = ffmpeg_exe()
    base = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if not audio.exists():
        subprocess.run(
            [*base, "-f", "lavfi", "-i", f"aevalsrc='{voice}':s=16000:d=5", "-ac", "1", str(audio)],
            check=True,
            timeout=60,
        )
    if not video.exists():
        subprocess.run(
            [
                *base,
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=320x240:rate=8:duration=2",
                "-f",
                "lavfi",
                "-i",
                f"aevalsrc='{voice}':s=16000:d=2",
                "-frames:v",
                "16",
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-c:a",
                "aac",
                "-shortest",
                str(video),
            ],
            check=True,
            timeout=60,
        )
    return audio, video


def load_media(audio_file: str | None = None, video_file: str | None = None) -> MediaInputs:
    """Media payloads: explicit files, else ``tests/fixtures/``, else synthesised ones."""
    audio_path = Path(audio_file) if audio_file else (FIXTURE_AUDIO if FIXTURE_AUDIO.is_file() else None)
    video_path = Path(video_file) if video_file else (FIXTURE_VIDEO if FIXTURE_VIDEO.is_file() else None)
    sources = []
    if audio_path is None or video_path is None:
        gen_audio, gen_video = synthesize_media(Path(tempfile.gettempdir()) / "emotion-bench-media")
        if audio_path is None:
            audio_path = gen_audio
            sources.append("audio synthesised")
        if video_path is None:
            video_path = gen_video
            sources.append("video synthesised")
    source = ", ".join(sources) if sources else "files"  # explicit files or tests/fixtures
    return MediaInputs(
        audio_path.read_bytes(), _display(audio_path), video_path.read_bytes(), _display(video_path), source
    )


def _display(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
