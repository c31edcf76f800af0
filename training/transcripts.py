"""Word error rate of the served transcriber on RAVDESS actors 17-20: ``python -m training.transcripts``.

Every speech clip of the validation actors (all 8 emotions, calm included: 240 clips) goes through
:class:`models.transcribe.Transcriber` with the serving defaults (Whisper-base, int8 on CPU, greedy, language
detected). RAVDESS actors read one of two fixed sentences, named by the file name's statement code, so each clip
has its reference. Words are compared after lower-casing and removing punctuation (``jiwer``); the report
(``reports/transcripts.json``) holds the word error rate overall, per actor and per emotion, how often the
language was detected as English, the real-time factor, and every clip whose transcript differs from its
reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jiwer
from tqdm import tqdm

from models.media import decode_audio
from models.transcribe import SAMPLE_RATE, Transcriber, TranscriberSettings
from training.datasets import RAVDESS_VAL_ACTORS, read_ravdess

DEFAULT_OUT = Path("reports") / "transcripts.json"
# RAVDESS statement codes (the 5th field of the file name) and what the actors say.
SENTENCES = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
RAVDESS_EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
NORMALISE = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (errors over reference words) after lower-casing and removing punctuation."""
    return float(jiwer.wer(references, hypotheses, reference_transform=NORMALISE, hypothesis_transform=NORMALISE))


def evaluate(data_root: str | Path, settings: TranscriberSettings, limit: int | None = None) -> dict[str, Any]:
    """Transcribe the validation actors' clips and score them (see the module docstring)."""
    clips = [path for path, _ in read_ravdess(data_root, "val", calm_as="neutral")]
    if not clips:
        raise SystemExit(f"no RAVDESS clips of actors {RAVDESS_VAL_ACTORS} under {data_root}/ravdess_speech")
    clips = clips[:limit] if limit else clips
    transcriber = Transcriber(settings)
    rows = []
    for path in tqdm(clips, desc="transcribe"):
        fields = Path(path).stem.split("-")
        wave = decode_audio(Path(path).read_bytes(), SAMPLE_RATE)
        result = transcriber.transcribe(wave)
        rows.append(
            {
                "clip": Path(path).name,
                "actor": int(fields[6]),
                "emotion": RAVDESS_EMOTIONS[fields[2]],
                "reference": SENTENCES[fields[4]],
                "transcript": result.text,
                "language": result.language,
                "duration_s": result.duration_s,
                "model_ms": round(result.model_ms, 1),
                "real_time_factor": round(result.real_time_factor, 4),
            }
        )

    def wer_of(selected: list[dict[str, Any]]) -> float:
        return round(word_error_rate([r["reference"] for r in selected], [r["transcript"] for r in selected]), 4)

    by_actor: dict[int, list[dict[str, Any]]] = defaultdict(list)
    by_emotion: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_actor[row["actor"]].append(row)
        by_emotion[row["emotion"]].append(row)
    wrong = [r for r in rows if word_error_rate([r["reference"]], [r["transcript"]]) > 0]
    return {
        "dataset": f"RAVDESS speech, actors {RAVDESS_VAL_ACTORS[0]}-{RAVDESS_VAL_ACTORS[-1]}, every emotion",
        "clips": len(rows),
        "wer": wer_of(rows),
        "wer_by_actor": {str(a): wer_of(r) for a, r in sorted(by_actor.items())},
        "wer_by_emotion": {e: wer_of(r) for e, r in sorted(by_emotion.items())},
        "clips_exact": len(rows) - len(wrong),
        "language_en": round(sum(r["language"] == "en" for r in rows) / len(rows), 4),
        "real_time_factor_p50": round(statistics.median(r["real_time_factor"] for r in rows), 4),
        "model_ms_p50": round(statistics.median(r["model_ms"] for r in rows), 1),
        "model": transcriber.version,
        "settings": {
            "device": transcriber.device,
            "compute_type": transcriber.compute_type,
            "cpu_threads": settings.cpu_threads,
            "beam_size": settings.beam_size,
            "vad_min_s": settings.vad_min_s,
            "language": settings.language,
        },
        "machine": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "normalisation": "lower case, punctuation removed (jiwer)",
        "differing_clips": wrong,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data", help="folder holding ravdess_speech/")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--compute-type", default="auto", choices=("auto", "int8", "int8_float16", "float16", "float32")
    )
    parser.add_argument("--threads", type=int, default=1, help="CTranslate2 threads on CPU")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips (a quick check)")
    args = parser.parse_args(argv)
    settings = TranscriberSettings(device=args.device, compute_type=args.compute_type, cpu_threads=args.threads)
    start = time.perf_counter()
    report = evaluate(args.data_root, settings, args.limit)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"WER {report['wer']:.4f} on {report['clips']} clips ({report['clips_exact']} exact), English detected "
        f"{report['language_en']:.0%}, real-time factor p50 {report['real_time_factor_p50']}: wrote {args.out}"
    )


if __name__ == "__main__":
    main()
