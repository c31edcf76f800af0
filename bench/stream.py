"""Live-stream benchmark: N concurrent ``/ws/stream`` clients, each sending a face video's frames and audio live.

    python -m bench.stream              # 1, 4 and 16 streams, 20 s each, against `serve run deploy/serve_config.yaml`
    python -m bench.stream --url http://127.0.0.1:8000 --streams 1,4 --duration 10   # an already running service

Every client replays ``tests/fixtures/face.mp4`` (looped) at its own frame rate: each frame as a JPEG message and
the audio of that frame's duration as 16 kHz PCM16 (the protocol of :mod:`serve.stream`). Per level it reports the
update latency (``update_ms``: window snapshot to update, measured by the server) p50/p95, and updates per second
per stream (updates received / seconds streamed), written to ``reports/stream.json`` and ``reports/stream.md``.

The media helpers and :func:`stream_media` are also what ``tests/test_serve_stream.py`` streams with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import imageio_ffmpeg
import numpy as np

from bench.inputs import FIXTURE_VIDEO, REPO_ROOT
from bench.stats import percentile

AUDIO, FRAME = b"\x01", b"\x02"
SAMPLE_RATE = 16_000
DEFAULT_LEVELS = (1, 4, 16)


@dataclass(frozen=True)
class StreamMedia:
    """A clip as the live protocol sends it: JPEG frames at ``fps`` and mono PCM16 audio at 16 kHz."""

    frames: list[bytes]
    fps: float
    pcm: bytes

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


def load_media(path: Path = FIXTURE_VIDEO, jpeg_quality: int = 85) -> StreamMedia:
    """Decode ``path``'s frames (imageio-ffmpeg, re-encoded as JPEG) and audio (the repo's own decoder)."""
    from models.media import decode_audio

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = []
    for raw in reader:
        rgb = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
        ok, encoded = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        )
        if ok:
            frames.append(encoded.tobytes())
    samples = decode_audio(path.read_bytes(), SAMPLE_RATE)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    return StreamMedia(frames, float(meta["fps"]), pcm)


def ws_url(base_url: str, path: str = "/ws/stream") -> str:
    """``http://host:port`` -> ``ws://host:port/ws/stream``."""
    return base_url.replace("https://", "wss://").replace("http://", "ws://").rstrip("/") + path


@dataclass
class StreamResult:
    """What one client saw: every server message with its arrival time (s since connect), and the close."""

    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed_at: float | None = None
    streamed_s: float = 0.0

    @property
    def updates(self) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == "update"]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == "error"]

    def update_times(self) -> list[float]:
        return [t for t, m in self.messages if m.get("type") == "update"]


async def stream_media(
    url: str,
    media: StreamMedia,
    duration_s: float,
    tail_s: float = 1.0,
    garbage_at_s: float | None = None,
    garbage: bytes = FRAME + b"not a jpeg",
    headers: dict[str, str] | None = None,
) -> StreamResult:
    """Send ``media`` (looped) in real time for ``duration_s``, keep reading for ``tail_s``, then close.

    With ``garbage_at_s``, the message ``garbage`` is sent at that time instead of going on (the server should
    close the stream: the close code and reason are in the result).
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    result = StreamResult()
    chunk = round(SAMPLE_RATE / media.fps) * 2  # audio bytes per frame period
    async with connect(url, additional_headers=headers, max_size=2**22, open_timeout=30) as ws:
        start = time.monotonic()

        async def reader() -> None:
            try:
                async for raw in ws:
                    result.messages.append((time.monotonic() - start, json.loads(raw)))
            except ConnectionClosed:
                pass
            if ws.close_code is not None and result.closed_at is None:
                result.closed_at = time.monotonic() - start

        reading = asyncio.create_task(reader())
        try:
            i = 0
            while (elapsed := time.monotonic() - start) < duration_s:
                if garbage_at_s is not None and elapsed >= garbage_at_s:
                    await ws.send(garbage)
                    break
                frame = i % len(media.frames)
                offset = (frame * chunk) % max(len(media.pcm) - chunk, 1)
                await ws.send(AUDIO + media.pcm[offset : offset + chunk])
                await ws.send(FRAME + media.frames[frame])
                i += 1
                await asyncio.sleep(max(0.0, start + i / media.fps - time.monotonic()))
            result.streamed_s = min(time.monotonic() - start, duration_s)
            try:
                await asyncio.wait_for(asyncio.shield(reading), tail_s)
            except TimeoutError:
                pass
        except ConnectionClosed:
            pass
        finally:
            if not reading.done():
                await ws.close()
                await reading
        result.close_code = ws.close_code
        result.close_reason = ws.close_reason
    return result


async def hold_text_stream(url: str, stop: asyncio.Event, interval_s: float = 0.5) -> StreamResult:
    """One live stream kept open until ``stop`` is set: a new text every ``interval_s`` (so every update has a
    changed window to predict), its updates read as they come. ``bench.run --stream-open`` runs it next to the HTTP
    load: its updates go through the ingress's text encoder calls with the HTTP requests."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    result = StreamResult()
    async with connect(url, max_size=2**22, open_timeout=30) as ws:
        start = time.monotonic()

        async def reader() -> None:
            try:
                async for raw in ws:
                    result.messages.append((time.monotonic() - start, json.loads(raw)))
            except ConnectionClosed:
                pass

        reading = asyncio.create_task(reader())
        i = 0
        try:
            while not stop.is_set():
                i += 1
                await ws.send(json.dumps({"type": "text", "text": f"Live caption {i}: we are so glad you came!"}))
                try:
                    await asyncio.wait_for(stop.wait(), interval_s)
                except TimeoutError:
                    pass
        except ConnectionClosed:
            pass
        finally:
            result.streamed_s = time.monotonic() - start
            await ws.close()
            await reading
        result.close_code = ws.close_code
        result.close_reason = ws.close_reason
    return result


# ---- the benchmark ---------------------------------------------------------------------------------------


def summarize(results: list[StreamResult], streams: int, duration_s: float) -> dict[str, Any]:
    """One level's figures: update latency p50/p95 and updates per second per stream."""
    latencies = [float(u["update_ms"]) for r in results for u in r.updates]
    per_stream = [len(r.updates) / (r.streamed_s or duration_s) for r in results]
    both = sum(1 for r in results for u in r.updates if {"audio", "video"} <= set(u.get("contributions", {})))
    total = sum(len(r.updates) for r in results)
    return {
        "streams": streams,
        "duration_s": duration_s,
        "updates": total,
        "errors": sum(len(r.errors) for r in results),
        "update_ms_p50": round(percentile(latencies, 50), 1) if latencies else None,
        "update_ms_p95": round(percentile(latencies, 95), 1) if latencies else None,
        "updates_per_s_per_stream_mean": round(float(np.mean(per_stream)), 3) if per_stream else None,
        "updates_per_s_per_stream_min": round(min(per_stream), 3) if per_stream else None,
        "share_audio_and_video": round(both / total, 3) if total else None,
        "server_closes": sorted(
            {f"{r.close_code} {r.close_reason}" for r in results if r.close_code not in (None, 1000)}
        ),
        "example_update": next((r.updates[-1] for r in results if r.updates), None),
    }


async def run_level(url: str, media: StreamMedia, streams: int, duration_s: float) -> dict[str, Any]:
    """``streams`` concurrent clients, started together."""
    results = await asyncio.gather(*(stream_media(url, media, duration_s) for _ in range(streams)))
    return summarize(list(results), streams, duration_s)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Live stream benchmark (`python -m bench.stream`)",
        "",
        (
            f"{m.get('cpu_count')} CPU cores ({m.get('cpu_model')}), GPU: {', '.join(m.get('gpu') or []) or 'none'}; "
            f"commit {m.get('commit')}{' (dirty)' if m.get('commit_dirty') else ''}; {report['started']}."
        ),
        "",
        (
            f"Each stream sends `{report['media']['file']}` (looped) in real time: {report['media']['fps']:g} JPEG "
            f"frames/s and 16 kHz PCM audio, for {report['duration_s']:g} s; the server predicts every "
            f"{report['update_interval_s']:g} s (window: 3 s of audio, 8 frames). "
            "`update_ms` is measured by the server "
            "from the window snapshot to the update."
        ),
        "",
        (
            "| streams | update latency p50 | p95 | updates/s per stream (mean) | (min) | updates | errors | "
            "audio+video used |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['streams']} | {r['update_ms_p50']} ms | {r['update_ms_p95']} ms | "
            f"{r['updates_per_s_per_stream_mean']} | {r['updates_per_s_per_stream_min']} | {r['updates']} | "
            f"{r['errors']} | {r['share_audio_and_video']:.0%} |"
            if r["updates"]
            else f"| {r['streams']} | - | - | 0 | 0 | 0 | {r['errors']} | - |"
        )
    closes = [c for r in report["levels"] for c in r["server_closes"]]
    if closes:
        lines += ["", "Server closes: " + "; ".join(sorted(set(closes)))]
    lines += [
        "",
        (
            "An update still running at the next tick skips that tick, so under load the rate per stream drops "
            "below 1/s rather than latency growing without bound."
        ),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="base URL of a running service (default: start serve_config.yaml)")
    p.add_argument("--streams", default=",".join(map(str, DEFAULT_LEVELS)), help="concurrent streams per level")
    p.add_argument("--duration", type=float, default=20.0, help="seconds each stream sends")
    p.add_argument("--video-file", type=Path, default=FIXTURE_VIDEO, help="clip to stream (frames and audio)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "reports", help="output folder")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.machine import machine_info
    from serve.config import StreamConfig

    args = parse_args(argv)
    levels = [int(x) for x in args.streams.split(",") if x.strip()]
    media = load_media(args.video_file)
    server = None
    if args.url is None:
        from bench.servers import CPU_CONFIG, serve_server

        server = serve_server(CPU_CONFIG, args.out / "logs", tag="serve-stream")
        server.start()
    try:
        base_url = args.url or server.base_url  # type: ignore[union-attr]
        if server is not None:
            server.wait_ready(args.ready_timeout)
        report: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "media": {
                "file": str(
                    args.video_file.relative_to(REPO_ROOT)
                    if args.video_file.is_relative_to(REPO_ROOT)
                    else args.video_file
                ),
                "fps": media.fps,
                "frames": len(media.frames),
                "audio_s": len(media.pcm) / 2 / SAMPLE_RATE,
            },
            "duration_s": args.duration,
            "update_interval_s": StreamConfig().update_interval_s,
            "levels": [],
        }
        asyncio.run(stream_media(ws_url(base_url), media, 3.0))  # warm-up: first calls load lazily
        for n in levels:
            print(f"[bench.stream] {n} concurrent streams for {args.duration:g} s", file=sys.stderr, flush=True)
            level = asyncio.run(run_level(ws_url(base_url), media, n, args.duration))
            print(f"[bench.stream]   {json.dumps(level)}", file=sys.stderr, flush=True)
            report["levels"].append(level)
    finally:
        if server is not None:
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "stream.md").write_text(render_markdown(report))
    print(f"wrote {args.out / 'stream.json'} and {args.out / 'stream.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
