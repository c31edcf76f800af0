"""Timeline benchmark: ``POST /predict/timeline`` of a 5-minute video with 1 and with 2 replicas of each encoder,
and the per-segment accuracy of a timeline of concatenated labelled speech clips.

    python -m bench.timeline                              # both parts -> reports/timeline.json
    python -m bench.timeline --replicas 1 --no-accuracy   # the 1-replica timing only

Speed: a 5-minute video (``tests/fixtures/face.mp4``, a face speaking for 3 s, looped: 8 fps, with its audio) is
sent once per configuration to ``deploy/serve_config.yaml`` run as ``python -m serve.launch`` runs it, with
``min = max = initial`` replicas of each encoder (each reserving 0.2 CPU, so that 2 of each fit 2 cores), after a
warm-up timeline of a few seconds. It reports the wall time from sending the request to the summary line, the time
to the first segment, and checks that the segments come in order and cover the file.

Accuracy (on the last configuration's service, when ``--data-root`` has RAVDESS): every speech clip of actors 17-20
(calm left out, as in every report) is sent alone to ``/predict/audio``, then all of them, concatenated in a shuffled
order into one recording, to ``/predict/timeline`` (audio), once cut ``fixed`` (3 s segments) and once by
``speech``. Each segment is labelled with the clip that covers most of it; each clip also gets the timeline's
answer for it (the probabilities of the segments overlapping it, weighted by the overlap). Reported: single-clip
accuracy, and per segmentation the per-segment accuracy, the per-clip accuracy from the timeline, and the
per-segment accuracy of the segments that lie within one clip.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.inputs import FIXTURE_VIDEO, REPO_ROOT
from models.labels import EMOTIONS, RAVDESS_CALM, RAVDESS_TO_EMOTION
from models.media import DecodeLimits, decode_audio, ffmpeg_exe

DEFAULT_OUT = REPO_ROOT / "reports" / "timeline.json"
ENCODERS = ("TextEncoder", "AudioEncoder", "VideoEncoder")
SAMPLE_RATE = 16_000
VAL_ACTORS = (17, 18, 19, 20)


def looped_video(seconds: float, path: Path) -> Path:
    """``tests/fixtures/face.mp4`` looped to ``seconds`` (H.264 + AAC, as a phone would record it)."""
    cmd = [
        ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-stream_loop", "-1", "-i", str(FIXTURE_VIDEO),
        "-t", f"{seconds:g}", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-movflags", "+faststart", str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=600)
    return path


def run_timeline(base_url: str, files: dict[str, Any], data: dict[str, str] | None = None) -> dict[str, Any]:
    """One timeline over HTTP: its lines, the wall time to the summary and to the first segment."""
    lines: list[dict[str, Any]] = []
    first_segment_s = None
    start = time.perf_counter()
    with (
        httpx.Client(base_url=base_url, timeout=1800, trust_env=False) as client,
        client.stream("POST", "/predict/timeline", files=files, data=data or {}) as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"timeline answered {response.status_code}: {response.read()[:500]!r}")
        for raw in response.iter_lines():
            if raw.strip():
                lines.append(json.loads(raw))
                if first_segment_s is None and lines[-1]["type"] == "segment":
                    first_segment_s = time.perf_counter() - start
    return {"lines": lines, "wall_s": time.perf_counter() - start, "first_segment_s": first_segment_s}


def check_order(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the segments came in order and cover the recording without a gap."""
    start, segments, summary = lines[0], lines[1:-1], lines[-1]
    in_order = [s["index"] for s in segments] == list(range(len(segments))) == list(range(start["segments"]))
    hop = start.get("hop_s")  # fixed: segment starts step by the hop; speech: each starts where the last ended
    contiguous = all(
        abs((b["start_s"] - a["start_s"]) - hop if hop is not None else b["start_s"] - a["end_s"]) < 1e-3
        for a, b in itertools.pairwise(segments)
    )
    covering = bool(segments) and segments[0]["start_s"] == 0.0 and segments[-1]["end_s"] == start["duration_s"]
    return {
        "segments": len(segments),
        "in_order": in_order,
        "covering": covering and contiguous and summary["type"] == "summary",
        "answered": summary["answered"],
        "failed": summary["failed"],
        "dropped": sorted({f"{m}: {why}" for s in segments for m, why in s.get("dropped", {}).items()}),
    }


def speed_run(base_url: str, video: Path, warmup: Path) -> dict[str, Any]:
    """A warm-up timeline, then the measured one."""
    fixed = {"segmentation": "fixed"}  # 3 s segments: the same work whatever the voice-activity detector finds
    run_timeline(base_url, {"video": ("warmup.mp4", warmup.read_bytes(), "video/mp4")}, fixed)
    load_before = os.getloadavg()[0]
    result = run_timeline(base_url, {"video": ("five_minutes.mp4", video.read_bytes(), "video/mp4")}, fixed)
    lines = result["lines"]
    return {
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: a shared machine
        "wall_s": round(result["wall_s"], 2),
        "first_segment_s": round(result["first_segment_s"] or 0.0, 2),
        "duration_s": lines[0]["duration_s"],
        "real_time_factor": round(result["wall_s"] / lines[0]["duration_s"], 4),
        "summary_latency_ms": lines[-1]["latency_ms"],
        "modalities": lines[0]["modalities"],
        **check_order(lines),
    }


# ---- accuracy -----------------------------------------------------------------------------------------------------


def ravdess_clips(data_root: Path, actors: tuple[int, ...] = VAL_ACTORS) -> list[tuple[Path, str]]:
    """(path, emotion) of every RAVDESS speech clip of ``actors`` (17-20 by default), calm left out."""
    clips = []
    for actor in actors:
        for path in sorted((data_root / "ravdess_speech" / f"Actor_{actor:02d}").glob("*.flac")):
            code = path.stem.split("-")[2]
            if code != RAVDESS_CALM:
                clips.append((path, RAVDESS_TO_EMOTION[code]))
    return clips


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes())
    return out.getvalue()


def single_clip_answers(base_url: str, clips: list[tuple[Path, str]], workers: int = 4) -> list[str]:
    """``/predict/audio`` (no transcript) of each clip alone: its emotion."""

    def one(path: Path) -> str:
        with httpx.Client(base_url=base_url, timeout=300, trust_env=False) as client:
            files = {"file": (path.name, path.read_bytes(), "audio/flac")}
            r = client.post("/predict/audio", files=files, data={"transcribe": "off"})
            r.raise_for_status()
            return str(r.json()["emotion"])

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, [p for p, _ in clips]))


def joined_clips(
    data_root: Path, actors: tuple[int, ...] = VAL_ACTORS, seed: int = 43
) -> tuple[list[tuple[Path, str]], list[np.ndarray], np.ndarray]:
    """``actors``' clips in a shuffled order (the order of a conversation, not emotion by emotion), each decoded to
    16 kHz, and the bounds in seconds of each within the recording they make joined: ``bounds[i] .. bounds[i + 1]``."""
    clips = ravdess_clips(data_root, actors)
    random.Random(seed).shuffle(clips)
    limits = DecodeLimits(max_audio_seconds=60.0)
    audio = [decode_audio(p.read_bytes(), SAMPLE_RATE, limits) for p, _ in clips]
    return clips, audio, np.cumsum([0, *[a.size for a in audio]]) / SAMPLE_RATE


def clip_overlaps(bounds: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    """Seconds of ``[start_s, end_s]`` within each clip of :func:`joined_clips`'s ``bounds``; the largest is the
    segment's clip."""
    return np.clip(np.minimum(bounds[1:], end_s) - np.maximum(bounds[:-1], start_s), 0, None)


def accuracy_run(base_url: str, data_root: Path, seed: int = 43) -> dict[str, Any]:
    """Single-clip against per-segment accuracy on the same clips, for each segmentation (see the module doc)."""
    clips, audio, bounds = joined_clips(data_root, seed=seed)
    recording = wav_bytes(np.concatenate(audio))
    labels = [c[1] for c in clips]
    single = single_clip_answers(base_url, clips)
    out: dict[str, Any] = {
        "clips": len(clips),
        "actors": list(VAL_ACTORS),
        "recording_s": round(float(bounds[-1]), 2),
        "order": f"clips shuffled with seed {seed}",
        "segment_label": "the clip covering most of the segment",
        "single_clip_accuracy": round(float(np.mean([a == b for a, b in zip(single, labels, strict=True)])), 4),
    }
    for segmentation in ("fixed", "speech"):
        files = {"audio": ("ravdess_17-20.wav", recording, "audio/wav")}
        result = run_timeline(base_url, files, {"segmentation": segmentation})
        out[segmentation] = score_segments(result, bounds, labels)
    return out


def score_segments(result: dict[str, Any], bounds: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Per-segment accuracy (label: the clip covering most of the segment), the same for segments that lie within
    one clip, and per-clip accuracy of the overlap-weighted segment probabilities."""
    segments = [s for s in result["lines"] if s["type"] == "segment"]
    hits, inside_hits, inside = 0, 0, 0
    clip_probs = np.zeros((len(labels), len(EMOTIONS)))
    for seg in segments:
        overlaps = clip_overlaps(bounds, seg["start_s"], seg["end_s"])
        main = int(np.argmax(overlaps))
        if seg.get("emotion") is None:
            continue
        hit = seg["emotion"] == labels[main]
        hits += hit
        if overlaps[main] >= (seg["end_s"] - seg["start_s"]) - 1e-6:
            inside += 1
            inside_hits += hit
        probs = np.array([seg["probabilities"][e] for e in EMOTIONS])
        clip_probs += overlaps[:, None] * probs[None, :]
    clip_answers = [EMOTIONS[int(i)] for i in clip_probs.argmax(axis=1)]
    lengths = [s["end_s"] - s["start_s"] for s in segments]
    main_share = [
        float(np.max(np.clip(np.minimum(bounds[1:], s["end_s"]) - np.maximum(bounds[:-1], s["start_s"]), 0, None)))
        / (s["end_s"] - s["start_s"])
        for s in segments
    ]
    return {
        "segments": len(segments),
        "segment_s_mean": round(float(np.mean(lengths)), 2),
        "main_clip_share_mean": round(float(np.mean(main_share)), 3),
        "timeline_wall_s": round(result["wall_s"], 2),
        "per_segment_accuracy": round(hits / max(len(segments), 1), 4),
        "per_segment_accuracy_within_one_clip": round(inside_hits / max(inside, 1), 4),
        "segments_within_one_clip": inside,
        "per_clip_accuracy_from_timeline": round(float(np.mean([a == b for a, b in zip(clip_answers, labels)])), 4),
        **{k: v for k, v in check_order(result["lines"]).items() if k in ("in_order", "covering", "failed")},
    }


# ---- main ---------------------------------------------------------------------------------------------------------


def replica_overrides(replicas: int) -> dict[str, Any]:
    """Serve config overrides: exactly ``replicas`` of each encoder, 0.2 CPU each (two of each fit 2 cores)."""
    scaling = {"min_replicas": replicas, "initial_replicas": replicas, "max_replicas": replicas}
    return {
        "deployments": {
            name: {"ray_actor_options": {"num_cpus": 0.2}, "autoscaling_config": scaling} for name in ENCODERS
        }
    }


def main(argv: list[str] | None = None) -> int:
    from bench.machine import machine_info
    from bench.servers import CPU_CONFIG, serve_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="encoder replica counts to time, comma-separated")
    p.add_argument("--minutes", type=float, default=5.0, help="length of the timed video")
    p.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    p.add_argument("--no-accuracy", action="store_true", help="skip the RAVDESS accuracy check")
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    accuracy = not args.no_accuracy and (args.data_root / "ravdess_speech").is_dir()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench.timeline " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "config": "deploy/serve_config.yaml (speed: fixed 3 s segments, 8 in flight; accuracy: fixed 3 s and "
        "speech with the configured speech_pad_s), "
        f"{args.ingress} ingress, transcribe=off",
        "file": f"{FIXTURE_VIDEO.relative_to(REPO_ROOT)} looped to {args.minutes:g} min (8 fps video + AAC audio)",
        "speed": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as tmp:
        video = looped_video(args.minutes * 60.0, Path(tmp) / "five_minutes.mp4")
        warmup = looped_video(6.0, Path(tmp) / "warmup.mp4")
        for i, replicas in enumerate(counts):
            server = serve_server(
                CPU_CONFIG,
                args.out.parent / "logs",
                overrides=replica_overrides(replicas),
                tag=f"serve-timeline-{replicas}",
                ingress=args.ingress,
            )
            with server:
                server.wait_ready(args.ready_timeout)
                print(f"{replicas} replica(s) of each encoder: ready in {server.startup_s} s", file=sys.stderr)
                report["speed"][str(replicas)] = run = speed_run(server.base_url, video, warmup)
                print(json.dumps(run), file=sys.stderr)
                if accuracy and i == len(counts) - 1:
                    report["accuracy"] = acc = accuracy_run(server.base_url, args.data_root)
                    acc["replicas"] = replicas
                    print(json.dumps(acc), file=sys.stderr)
    if "1" in report["speed"] and "2" in report["speed"]:
        report["speedup_1_to_2"] = round(report["speed"]["1"]["wall_s"] / report["speed"]["2"]["wall_s"], 3)
    if not accuracy:
        report["accuracy"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
