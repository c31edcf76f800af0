"""How much of the pauses around an utterance the audio encoder hears in a speech-segmented timeline
(``timeline.speech_pad_s``), chosen on actors the reported figures never see.

    python -m bench.timeline_pad --data-root ../shared/data    # -> reports/timeline_pad.json

For each of the audio model's leave-actors-out folds 0-3 (``models/weights/audio_folds/fold<k>``, trained without
actors ``4k+1 .. 4k+4``), that fold's held-out clips (calm left out) are concatenated in a shuffled order, cut by
:func:`models.recording.speech_spans`, and each segment's heard audio is classified in process by the fold's own
model, once per candidate pad and once hearing the whole segment. Each segment is labelled with the clip that
covers most of it. The pad with the best mean per-segment accuracy over the four folds is the one the Serve config
ships; actors 17-20 (fold 4, the shipped model's held-out actors, reported by ``python -m bench.timeline``) choose
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.inputs import REPO_ROOT
from bench.timeline import SAMPLE_RATE, clip_overlaps, joined_clips, wav_bytes
from models.recording import speech_spans

PADS = (0.0, 0.25, 0.5, 1.0)
FOLDS = (0, 1, 2, 3)
DEFAULT_OUT = REPO_ROOT / "reports" / "timeline_pad.json"


def fold_scores(data_root: Path, fold: int, weights: Path, seed: int = 43) -> dict[str, Any]:
    """Single-clip accuracy and per-segment accuracy for each pad (and ``whole``) on one fold's held-out actors."""
    from models.inference import AudioPipeline

    actors = tuple(range(4 * fold + 1, 4 * fold + 5))
    clips, audio, bounds = joined_clips(data_root, actors, seed)
    pcm = (np.clip(np.concatenate(audio), -1, 1) * 32767).round().astype(np.int16)
    labels = [label for _, label in clips]
    pipe = AudioPipeline(weights)

    def emotion(samples: np.ndarray) -> str:
        return pipe.encode([pipe.prepare(wav_bytes(samples))])[0].emotion

    single = [emotion(a) for a in audio]
    out: dict[str, Any] = {
        "actors": list(actors),
        "clips": len(clips),
        "single_clip_accuracy": round(float(np.mean([a == b for a, b in zip(single, labels, strict=True)])), 4),
        "per_segment_accuracy": {},
    }
    for pad in (*PADS, None):
        spans = speech_spans(pcm, pcm.size / SAMPLE_RATE, max_segment_s=10.0, speech_pad_s=pad or 0.0)
        hits = 0
        for span in spans:
            start, end = span.heard if pad is not None and span.heard else (span.start_s, span.end_s)
            overlaps = clip_overlaps(bounds, span.start_s, span.end_s)
            chunk = pcm[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)].astype(np.float32) / 32767
            hits += emotion(chunk) == labels[int(np.argmax(overlaps))]
        out["per_segment_accuracy"]["whole" if pad is None else f"{pad:g}"] = round(hits / len(spans), 4)
        out["segments"] = len(spans)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    p.add_argument("--folds-dir", type=Path, default=REPO_ROOT / "models" / "weights" / "audio_folds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    folds = {}
    for fold in FOLDS:
        folds[str(fold)] = fold_scores(args.data_root, fold, args.folds_dir / f"fold{fold}")
        print(json.dumps(folds[str(fold)]), file=sys.stderr, flush=True)
    keys = list(folds["0"]["per_segment_accuracy"])
    mean = {k: round(float(np.mean([f["per_segment_accuracy"][k] for f in folds.values()])), 4) for k in keys}
    pads = {k: v for k, v in mean.items() if k != "whole"}
    report = {
        "command": "python -m bench.timeline_pad " + " ".join(argv if argv is not None else sys.argv[1:]),
        "folds": folds,
        "mean_single_clip_accuracy": round(float(np.mean([f["single_clip_accuracy"] for f in folds.values()])), 4),
        "mean_per_segment_accuracy": mean,
        "selected_speech_pad_s": float(max(pads, key=pads.__getitem__)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "folds"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
