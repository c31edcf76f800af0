"""Single-sample CPU latency of each model, decode and preprocessing included.

``python -m models.latency`` writes ``reports/model_latency.json``: p50/p95 over repeated single
requests for text, a 5 s audio clip and a 16-frame video (synthesised with ffmpeg unless files
are given). Targets from the models issue: text <= 20 ms, audio <= 60 ms, video <= 150 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.inference import AudioPipeline, TextPipeline, VideoPipeline
from models.media import ffmpeg_exe

TARGETS_MS = {"text": 20.0, "audio_5s": 60.0, "video_16_frames": 150.0}


def synth_media(kind: str) -> bytes:
    """A 5 s 16 kHz WAV tone sweep, or a 2 s 320x240 MP4 (moving test pattern) with 48 frames."""
    if kind == "audio":
        args = ["-f", "lavfi", "-i", "sine=frequency=220:duration=5:sample_rate=16000", "-f", "wav"]
    else:
        args = [
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=24:duration=2",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
            "-movflags",
            "frag_keyframe+empty_moov",
        ]
    cmd = [ffmpeg_exe(), "-v", "error", *args, "pipe:"]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout


def measure(fn: Callable[[], object], repeats: int, warmup: int = 3) -> dict[str, float]:
    """p50/p95/mean in milliseconds of ``fn`` run ``repeats`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 2),
        "mean_ms": round(statistics.fmean(times), 2),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio", type=Path, help="audio file to use instead of a synthetic 5 s clip")
    p.add_argument("--video", type=Path, help="video file to use instead of a synthetic clip")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--out", type=Path, default=Path("reports/model_latency.json"))
    p.add_argument(
        "--audio-only",
        type=Path,
        metavar="WEIGHTS_DIR",
        help="measure only this audio model (latency and this process's resident memory), e.g. to compare two",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.audio_only:
        audio_only(args)
        return
    audio = args.audio.read_bytes() if args.audio else synth_media("audio")
    video = args.video.read_bytes() if args.video else synth_media("video")
    text = TextPipeline()
    speech = AudioPipeline()
    faces = VideoPipeline(num_frames=16)
    sentence = "I can't believe you did that, this is the best news I've heard all year!"
    results = {
        "text": measure(lambda: text.encode([text.prepare(sentence)]), args.repeats),
        "audio_5s": measure(lambda: speech.encode([speech.prepare(audio)]), args.repeats),
        "video_16_frames": measure(lambda: faces.encode([faces.prepare(video)]), args.repeats),
    }
    for name, r in results.items():
        r["target_ms"] = TARGETS_MS[name]
        r["meets_target"] = r["p50_ms"] <= TARGETS_MS[name]
    report = {
        "what": "single-sample latency, decode + preprocessing + forward, in-process (models/inference.py)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.is_available(),
        },
        "command": "python -m models.latency",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:16s} p50 {r['p50_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  (target {r['target_ms']} ms)")


def resident_mb() -> float:
    """This process's resident memory (VmRSS) in MiB, as a replica holding the model would use."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def audio_only(args: argparse.Namespace) -> None:
    """One audio model: single-request latency and the resident memory of a process that holds only it."""
    audio = args.audio.read_bytes() if args.audio else synth_media("audio")
    speech = AudioPipeline(args.audio_only)
    result = measure(lambda: speech.encode([speech.prepare(audio)]), args.repeats)
    result |= {
        "resident_mb": round(resident_mb(), 1),
        "model": speech.version,
        "input": str(args.audio or "synthetic 5 s tone"),
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
