"""Word error rate of the served transcriber on RAVDESS actors 17-20: ``python -m training.transcripts``.

Every speech clip of the validation actors (all 8 emotions, calm included: 240 clips) goes through
:class:`models.transcribe.Transcriber` with the serving defaults (Whisper-base, int8 on CPU, greedy, language
detected). RAVDESS actors read one of two fixed sentences, named by the file name's statement code, so each clip
has its reference. Words are compared after lower-casing and removing punctuation (``jiwer``); the report
(``reports/transcripts.json``) holds the word error rate overall, per actor and per emotion, how often the
language was detected as English, the real-time factor, and every clip whose transcript differs from its
reference.

It also measures what ``transcribe=fuse`` does on these acted clips (``fuse_on_acted_sentences``): on the clips of
every reported figure (calm left out), the served audio encoder alone against the served fusion of the audio with
the clip's transcript as text, the way the ingress fuses them. The actors say the same two neutral sentences in
every emotion, so the words carry nothing about the emotion.
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
import numpy as np
from tqdm import tqdm

from models.labels import EMOTIONS
from models.media import decode_audio
from models.transcribe import SAMPLE_RATE, Transcriber, TranscriberSettings
from training.datasets import RAVDESS_VAL_ACTORS, ravdess_label, read_ravdess

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


def fuse_on_acted_sentences(rows: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """Accuracy of the audio encoder alone and of the fusion of audio + transcript (as ``transcribe=fuse`` serves it)
    on the clips with a reported label (calm left out), and what the text encoder reads in the transcripts."""
    from models.inference import AudioPipeline, FusionPipeline, TextPipeline

    audio, text, fusion = AudioPipeline(), TextPipeline(), FusionPipeline()
    labelled = [(row, path, ravdess_label(path, calm_as=None)) for row, path in zip(rows, paths, strict=True)]
    labelled = [(row, path, label) for row, path, label in labelled if label is not None and row["transcript"]]
    heard = sorted({row["transcript"] for row, _, _ in labelled})
    read = dict(zip(heard, text.encode([text.prepare(t) for t in heard]), strict=True))
    hits = {"audio": 0, "text": 0, "fused": 0}
    text_answers: dict[str, int] = defaultdict(int)
    for start in tqdm(range(0, len(labelled), 8), desc="fuse"):
        chunk = labelled[start : start + 8]
        voices = audio.encode([audio.prepare(Path(path).read_bytes()) for _, path, _ in chunk])
        for (row, _, label), voice in zip(chunk, voices, strict=True):
            words = read[row["transcript"]]
            fused = fusion.fuse(
                {"audio": voice.embedding, "text": words.embedding},
                {"audio": voice.probabilities, "text": words.probabilities},
            )
            truth = EMOTIONS[label]
            hits["audio"] += voice.emotion == truth
            hits["text"] += words.emotion == truth
            hits["fused"] += EMOTIONS[int(np.argmax(fused.probabilities))] == truth
            text_answers[words.emotion] += 1
    n = len(labelled)
    return {
        "clips": n,
        "accuracy": {k: round(v / n, 4) for k, v in hits.items()},
        "text_answers": dict(sorted(text_answers.items(), key=lambda kv: -kv[1])),
        "models": f"{audio.version} + {text.version} fused by {fusion.version}",
    }


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
        "fuse_on_acted_sentences": fuse_on_acted_sentences(rows, clips),
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
    fused = report["fuse_on_acted_sentences"]["accuracy"]
    print(
        f"WER {report['wer']:.4f} on {report['clips']} clips ({report['clips_exact']} exact), English detected "
        f"{report['language_en']:.0%}, real-time factor p50 {report['real_time_factor_p50']}; accuracy audio "
        f"{fused['audio']:.3f}, audio + transcript fused {fused['fused']:.3f}: wrote {args.out}"
    )


if __name__ == "__main__":
    main()
