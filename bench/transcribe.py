"""Transcript latency over HTTP: ``POST /predict/audio`` of the 3-second fixture with and without a transcript.

    python -m bench.transcribe                      # starts `serve run deploy/serve_config.yaml` (Python proxy)
    python -m bench.transcribe --url http://127.0.0.1:8000 --modes off --label before   # a running service

One client sends the audio track of ``tests/fixtures/face.mp4`` (3.0 s of speech) to ``/predict/audio``, one request
at a time, the modes interleaved round by round (``off``, ``return``, ``off``, ...), so both see the same machine
load. Per mode it reports the HTTP latency p50/p90 (client side) and, with a transcript, the transcript's own
latency and real-time factor inside the ``Transcriber`` replica. Results go under ``--label`` in
``reports/transcribe_latency.json`` (other labels in the file are kept): run it once against the service of the
commit before transcripts (``--modes off --label before``) and once against this one to compare the emotion
answer's latency without a transcript.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.inputs import FIXTURE_VIDEO, REPO_ROOT
from bench.stats import percentile

DEFAULT_OUT = REPO_ROOT / "reports" / "transcribe_latency.json"
MODES = ("off", "return", "fuse")


def measure(base_url: str, clip: bytes, modes: list[str], rounds: int, warmup: int) -> dict[str, Any]:
    """``rounds`` requests per mode (after ``warmup`` rounds), interleaved; latency summaries per mode."""
    seen: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for i in range(warmup + rounds):
            for mode in modes:
                start = time.perf_counter()
                r = client.post(
                    "/predict/audio", files={"file": ("face.mp4", clip, "video/mp4")}, data={"transcribe": mode}
                )
                ms = (time.perf_counter() - start) * 1000.0
                r.raise_for_status()
                body = r.json()
                if i >= warmup:
                    seen[mode].append({"http_ms": ms, "body": body})
    out: dict[str, Any] = {}
    for mode, rows in seen.items():
        http_ms = [r["http_ms"] for r in rows]
        words = [r["body"]["transcript"] for r in rows if "transcript" in r["body"]]
        summary: dict[str, Any] = {
            "requests": len(rows),
            "http_p50_ms": round(percentile(http_ms, 50), 1),
            "http_p90_ms": round(percentile(http_ms, 90), 1),
            "ingress_p50_ms": round(percentile([r["body"]["latency_ms"] for r in rows], 50), 1),
            "audio_encoder_p50_ms": round(
                percentile([r["body"]["modalities"]["audio"]["latency_ms"] for r in rows], 50), 1
            ),
            "with_transcript": len(words),
            "dropped": sorted(
                {r["body"]["dropped"]["transcript"] for r in rows if "transcript" in r["body"]["dropped"]}
            ),
        }
        if words:
            summary |= {
                "transcript_p50_ms": round(percentile([w["latency_ms"] for w in words], 50), 1),
                "transcript_model_p50_ms": round(percentile([w["model_ms"] for w in words], 50), 1),
                "real_time_factor_p50": round(percentile([w["real_time_factor"] for w in words], 50), 3),
                "text": words[-1]["text"],
                "language": words[-1]["language"],
            }
        out[mode] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.machine import machine_info

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running service (default: start deploy/serve_config.yaml)")
    p.add_argument("--modes", default="off,return", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=30, help="measured requests per mode")
    p.add_argument("--warmup", type=int, default=3, help="rounds sent first and not measured")
    p.add_argument("--label", default="current", help="key of this run in the report")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ready-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes {', '.join(MODES)}")
    clip = FIXTURE_VIDEO.read_bytes()
    server = None
    if args.url is None:
        from bench.servers import CPU_CONFIG, serve_server

        server = serve_server(CPU_CONFIG, args.out.parent / "logs", tag="serve-transcribe", ingress="proxy")
        server.start()
    try:
        base_url = args.url or server.base_url  # type: ignore[union-attr]
        if server is not None:
            server.wait_ready(args.ready_timeout)
        run = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "clip": f"{FIXTURE_VIDEO.relative_to(REPO_ROOT)} (its 3.0 s audio track), POST /predict/audio",
            "rounds": args.rounds,
            "modes": measure(base_url, clip, modes, args.rounds, args.warmup),
        }
    finally:
        if server is not None:
            server.stop()
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(run["modes"], indent=2))
    print(f"wrote {args.label} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
