"""The transcriber itself (``models/transcribe.py``): Whisper-base from the packages, on faster-whisper, no Ray.

The speech fixture is synthetic speech saying "I'm so happy to meet you. This is wonderful news. Thank you all so
much." (``tests/fixtures/make_fixtures.py``); the assertions use the words Whisper-base gets right on it every time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from models.audio import whisper
from models.media import decode_audio
from models.transcribe import (
    SAMPLE_RATE,
    Transcriber,
    TranscriberSettings,
    resolve_compute_type,
    resolve_device,
)
from training.transcripts import word_error_rate

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber(TranscriberSettings(device="cpu"))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return decode_audio((FIXTURES / "speech.wav").read_bytes(), SAMPLE_RATE)


def test_the_speech_fixture_is_transcribed_in_english(transcriber: Transcriber, speech: np.ndarray) -> None:
    result = transcriber.transcribe(speech)
    assert result.language == "en" and result.language_probability > 0.5
    heard = words(result.text)
    for word in ("happy", "meet", "you", "wonderful", "news", "thank"):
        assert word in heard, result.text
    assert result.segments and all(0 <= s.start < s.end <= result.duration_s + 0.5 for s in result.segments)
    assert result.text == " ".join(s.text for s in result.segments)
    assert result.duration_s == pytest.approx(5.0, abs=0.01) and not result.vad
    assert result.model_ms > 0 and result.real_time_factor == pytest.approx(result.model_ms / 1000 / 5.0, rel=1e-3)
    assert transcriber.compute_type == "int8" and transcriber.version.endswith("-int8")


def test_a_video_track_decodes_and_transcribes(transcriber: Transcriber) -> None:
    result = transcriber.transcribe_bytes((FIXTURES / "face.mp4").read_bytes())
    assert result.language == "en" and {"happy", "wonderful", "news"} <= set(words(result.text))


def test_long_inputs_go_through_the_vad_filter(transcriber: Transcriber, speech: np.ndarray) -> None:
    """12 s of silence after the speech: the VAD filter runs (at least vad_min_s long) and the words survive."""
    padded = np.concatenate([speech, np.zeros(12 * SAMPLE_RATE, dtype=np.float32)])
    result = transcriber.transcribe(padded)
    assert result.vad and result.duration_s == pytest.approx(17.0, abs=0.01)
    assert {"happy", "wonderful", "news"} <= set(words(result.text))
    assert all(s.end <= 6.0 for s in result.segments), result.segments  # nothing invented in the silence


def test_device_and_precision_rules() -> None:
    assert resolve_compute_type("auto", "cpu") == "int8"
    assert resolve_compute_type("auto", "cuda") == "float16"
    assert resolve_compute_type("float32", "cuda") == "float32"
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_one_assembled_folder_serves_the_encoder_and_the_transcriber(tmp_path: Path) -> None:
    folder = whisper.whisper_model_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".complete",
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]
    assert whisper.whisper_model_folder(tmp_path) == folder  # joined once, then found
    assert whisper.assembled_model_bin() == (whisper.whisper_model_folder() / "model.bin").read_bytes()


def test_word_error_rate_ignores_case_and_punctuation() -> None:
    assert word_error_rate(["Kids are talking by the door"], ["Kids are talking by the door."]) == 0.0
    assert word_error_rate(["Dogs are sitting by the door"], ["dogs sitting by a door"]) == pytest.approx(2 / 6)
