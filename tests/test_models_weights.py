"""The committed weights, run through the serving pipelines (ffmpeg decode included), on real data.

Clear validation examples must come out right, and small fixed validation samples must score well
above chance. These use ``../shared/data`` and skip with a reason when it is absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.inference import AudioPipeline, FusionPipeline, TextPipeline, VideoPipeline
from models.labels import EMOTIONS
from tests.synth import SHARED_DATA

REPO = Path(__file__).resolve().parent.parent

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real datasets) is not present")


@pytest.fixture(scope="module")
def text() -> TextPipeline:
    return TextPipeline()


@pytest.fixture(scope="module")
def audio() -> AudioPipeline:
    return AudioPipeline()


@pytest.fixture(scope="module")
def video() -> VideoPipeline:
    return VideoPipeline()


def test_weights_are_trained_not_bootstrap(text: TextPipeline, audio: AudioPipeline, video: VideoPipeline) -> None:
    fusion = FusionPipeline()
    for pipe in (text, audio, video, fusion):
        assert "untrained" not in pipe.version
        assert pipe.checkpoint["metadata"].get("train_seconds", 0) > 0


@pytest.mark.parametrize(
    "sentence,emotion",
    [
        ("Oh my God, I'm so happy for you! This is wonderful!", "happy"),
        ("Get out! I am so sick of you, I hate you!", "angry"),
        ("What?! Are you serious? No way!", "surprise"),
        ("Okay, I'll see you tomorrow at ten.", "neutral"),
    ],
)
def test_clear_sentences(text: TextPipeline, sentence: str, emotion: str) -> None:
    result = text.encode([text.prepare(sentence)])[0]
    assert result.emotion == emotion, dict(zip(EMOTIONS, result.probabilities.round(3), strict=True))
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


@needs_data
def test_meld_dev_sample(text: TextPipeline) -> None:
    from sklearn.metrics import f1_score

    from training.datasets import read_meld

    samples = read_meld(SHARED_DATA, "val")[:300]
    preds = [r.emotion for r in text.encode([text.prepare(t) for t, _ in samples])]
    truth = [EMOTIONS[y] for _, y in samples]
    assert f1_score(truth, preds, average="weighted") >= 0.45


def _ravdess_val(strong_only: bool) -> list[tuple[Path, str]]:
    from training.datasets import read_ravdess

    out = []
    for path, y in read_ravdess(SHARED_DATA, "val"):
        intensity = Path(path).stem.split("-")[3]
        if not strong_only or intensity == "02":
            out.append((Path(path), EMOTIONS[y]))
    return out


@needs_data
def test_ravdess_unseen_actors_strong_intensity(audio: AudioPipeline) -> None:
    samples = _ravdess_val(strong_only=True)[::2]
    results = audio.encode([audio.prepare(p.read_bytes()) for p, _ in samples])
    accuracy = np.mean([r.emotion == y for r, (_, y) in zip(results, samples, strict=True)])
    assert len(samples) >= 40 and accuracy >= 0.45


@needs_data
def test_fer_val_faces_through_ffmpeg(video: VideoPipeline) -> None:
    samples = []
    for emotion in EMOTIONS:
        if emotion != "disgust":  # 56 validation images only; too few to test on
            samples += [(p, emotion) for p in sorted((SHARED_DATA / "fer2013" / "val" / emotion).iterdir())[:12]]
    results = video.encode([video.prepare(p.read_bytes()) for p, _ in samples])
    accuracy = np.mean([r.emotion == y for r, (_, y) in zip(results, samples, strict=True)])
    assert accuracy >= 0.5
    assert all(r.info["frames"] == 1 for r in results)


@needs_data
def test_fused_label_matched_triplets(text: TextPipeline, audio: AudioPipeline, video: VideoPipeline) -> None:
    """A clearly happy sentence and face with each strong-intensity happy clip of the unseen RAVDESS actors:
    the fusion must say happy for most of them, more often than the audio encoder alone does."""
    fusion = FusionPipeline()
    clips = [p for p, y in _ravdess_val(strong_only=True) if y == "happy"]
    face = min((SHARED_DATA / "fer2013" / "val" / "happy").iterdir())
    said = text.encode([text.prepare("This is amazing, I love it so much!")])[0]
    shown = video.encode([video.prepare(face.read_bytes())])[0]
    audio_right = fused_right = 0
    for clip in clips:
        speech = audio.encode([audio.prepare(clip.read_bytes())])[0]
        fused = fusion.fuse(
            {"text": said.embedding, "audio": speech.embedding, "video": shown.embedding},
            {"text": said.probabilities, "audio": speech.probabilities, "video": shown.probabilities},
        )
        assert set(fused.contributions) == {"text", "audio", "video"}
        assert sum(fused.contributions.values()) == pytest.approx(1.0, abs=1e-5)
        assert fused.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        audio_right += speech.emotion == "happy"
        fused_right += fused.emotion == "happy"
    assert len(clips) >= 8
    assert fused_right >= 0.6 * len(clips) and fused_right > audio_right, (fused_right, audio_right, len(clips))


def test_float32_and_bfloat16_inference_agree() -> None:
    """bfloat16 autocast (the default where the CPU has it) gives the float32 answer, nearly the same probabilities."""
    from models.common import native_bf16

    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bfloat16; the pipelines run float32")
    fp32 = TextPipeline(precision="float32")
    bf16 = TextPipeline(precision="bfloat16")
    assert (fp32.precision, bf16.precision) == ("float32", "bfloat16")
    items = [fp32.prepare(s) for s in ("I am so happy today!", "This is disgusting.", "Why did you leave me?")]
    a, b = fp32.encode(items), bf16.encode(items)
    for x, y in zip(a, b, strict=True):
        assert x.emotion == y.emotion
        assert abs(x.probabilities - y.probabilities).max() < 0.05


def test_pipeline_device_choice() -> None:
    """``auto`` resolves to the GPU only where there is one; asking for a missing GPU says so at load time."""
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert FusionPipeline(device="auto").device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            FusionPipeline(device="cuda")


def test_fusion_pays_its_one_time_costs_when_loaded_not_on_the_first_request() -> None:
    # torch imports sympy at the first attention call with a padding mask (a request missing a modality); the
    # server fuses on its event loop, so loading must have done it already. A fresh interpreter: other tests
    # here may have imported sympy.
    code = (
        "import sys; from models.inference import FusionPipeline; "
        "assert 'sympy' not in sys.modules, 'imported before loading'; FusionPipeline(); "
        "assert 'sympy' in sys.modules, 'not warmed up'"
    )
    cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
