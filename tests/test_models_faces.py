"""Face preprocessing: detection, eye-levelled alignment, the largest face, no-face fallback, the score in answers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.inference import VideoPipeline
from models.video.faces import LANDMARKS_5, MMOD_CNN, Region, crop_matrix, dlib_model
from models.video.preprocessing import FaceConfig, FaceCropper
from serve.schemas import EncoderAnswer
from tests.synth import SHARED_DATA, image_png

FACE = Path(__file__).resolve().parent / "fixtures" / "face.png"  # a FER2013 face, 112 px, on a plain 192x192 frame
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real datasets) is not present")


def _face() -> np.ndarray:
    image = cv2.imread(str(FACE), cv2.IMREAD_GRAYSCALE)
    assert image is not None
    return image


def _rotated(image: np.ndarray, angle: float) -> np.ndarray:
    """``image`` on a 320x320 canvas of its own edge colour, rotated by ``angle`` degrees about the centre."""
    pad = (320 - image.shape[0]) // 2
    canvas = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    m = cv2.getRotationMatrix2D((160, 160), angle, 1.0)
    return cv2.warpAffine(canvas, m, (320, 320), borderMode=cv2.BORDER_REPLICATE)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _eye_tilt_in_crop(points: np.ndarray, region: Region, size: int) -> float:
    """Degrees of the eye line inside the crop, from the frame's 5 landmarks (0-1 one eye, 2-3 the other)."""
    m = crop_matrix(region, size)
    inside = points @ m[:, :2].T + m[:, 2]
    right, left = inside[0:2].mean(0), inside[2:4].mean(0)
    return float(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0])))


def test_model_files_come_from_the_installed_package() -> None:
    for name in (LANDMARKS_5, MMOD_CNN):
        assert Path(dlib_model(name)).is_file()
    assert "68" not in LANDMARKS_5  # the 68-point model's training data is non-commercial; it is never loaded


@pytest.mark.parametrize("angle", [20.0, -20.0])
def test_alignment_levels_a_rotated_face(angle: float) -> None:
    cropper = FaceCropper()
    upright = cropper.crop(_rotated(_face(), 0.0)[None])
    tilted = cropper.crop(_rotated(_face(), angle)[None])
    assert upright.face_detected and tilted.face_detected
    # the face turned by `angle` (counter-clockwise on screen) and the crop followed it ...
    assert abs((upright.regions[0].angle - tilted.regions[0].angle) - angle) < 5
    # ... so the eye line inside both crops is level ...
    for crops in (upright, tilted):
        assert abs(_eye_tilt_in_crop(crops.landmarks[0], crops.regions[0], 48)) < 3
    # ... and the crop of the tilted face looks like the crop of the upright one, far more than without alignment
    unaligned = FaceCropper(FaceConfig(align=False)).crop(_rotated(_face(), angle)[None])
    assert unaligned.face_detected
    aligned_ncc, unaligned_ncc = _ncc(tilted.faces[0], upright.faces[0]), _ncc(unaligned.faces[0], upright.faces[0])
    assert aligned_ncc > 0.85 and aligned_ncc > unaligned_ncc + 0.1, (aligned_ncc, unaligned_ncc)


@pytest.mark.parametrize("large_on_left", [True, False])
def test_the_largest_of_two_faces_is_cropped(large_on_left: bool) -> None:
    large, small = cv2.resize(_face(), (250, 250)), cv2.resize(_face(), (170, 170))
    frame = np.full((360, 480), int(_face()[0, 0]), dtype=np.uint8)
    (lx, sx) = (0, 480 - 170) if large_on_left else (480 - 250, 0)
    frame[50:300, lx : lx + 250] = large
    frame[100:270, sx : sx + 170] = small
    one_pass = FaceCropper(FaceConfig(passes=(("hog", 320, 0.0),)))
    scale = 320 / 360
    both = one_pass.models.detect(cv2.resize(frame, (round(480 * scale), 320)), "hog", 20, 0.0)
    assert len(both) == 2  # both faces are found in the same pass, so the choice is the cropper's
    for cropper in (one_pass, FaceCropper()):
        crops = cropper.crop(frame[None])
        assert crops.face_detected
        assert abs(crops.regions[0].cx - (lx + 125)) < 30 and abs(crops.regions[0].cy - 175) < 30
        assert 100 < crops.regions[0].side < 300


def test_no_face_keeps_the_centre_square() -> None:
    yy, xx = np.mgrid[0:240, 0:320]
    frame = ((xx * 0.5 + yy * 0.3) % 256).astype(np.uint8)  # a gradient: nothing face-like
    crops = FaceCropper().crop(np.stack([frame, frame[:, ::-1]]))
    assert crops.face_detected is False and crops.score is None and crops.detector is None
    assert crops.faces.shape == (2, 48, 48)
    centre = cv2.resize(frame[:, 40:280], (48, 48), interpolation=cv2.INTER_AREA)
    assert np.array_equal(crops.faces[0], centre)


def test_face_score_is_in_the_answer() -> None:
    pipeline = VideoPipeline()
    face = pipeline.prepare(FACE.read_bytes())
    assert face.info["face_detected"] is True and face.info["face_detector"] == "hog"
    assert isinstance(face.info["face_score"], float) and face.info["face_score"] > 0
    blank = pipeline.prepare(image_png(np.full((120, 160), 128, dtype=np.uint8)))
    assert blank.info["face_detected"] is False and "face_score" not in blank.info
    (result,) = pipeline.encode([face])
    answer = EncoderAnswer(
        modality="video",
        embedding=result.embedding.tolist(),
        probabilities=dict(zip(("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"), [1 / 7] * 7)),
        emotion=result.emotion,
        confidence=result.confidence,
        latency_ms=1.0,
        decode_ms=face.info["decode_ms"],
        preprocess_ms=1.0,
        model_ms=1.0,
        batch_size=1,
        model_version=pipeline.version,
        **{k: v for k, v in face.info.items() if k != "decode_ms"},
    )
    public = answer.public().model_dump(exclude_none=True)
    assert public["face_score"] == face.info["face_score"] and public["face_detector"] == "hog"


def test_clip_detects_on_a_few_frames_and_landmarks_every_frame() -> None:
    frames = np.stack([np.roll(_rotated(_face(), 0.0), 4 * i, axis=1) for i in range(16)])  # the face moves right
    crops = FaceCropper().crop(frames)
    assert crops.face_detected and len(FaceCropper().detection_frames(16)) == 4
    xs = [r.cx for r in crops.regions]
    assert xs[-1] - xs[0] > 45  # every frame's crop follows the face (60 px), not only the detection frames'
    assert all(_ncc(crops.faces[i], crops.faces[0]) > 0.9 for i in range(16))


@needs_data
def test_aligned_crops_of_fer_faces_are_framed_like_fer() -> None:
    faces = sorted((SHARED_DATA / "fer2013" / "val" / "happy").glob("*.jpg"))[:30]
    default, wide = FaceCropper(), FaceCropper(FaceConfig(crop_scale=1.9))
    matched, widened = [], []
    for path in faces:
        face = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        big = cv2.copyMakeBorder(
            cv2.resize(face, (144, 144), interpolation=cv2.INTER_CUBIC), *[48] * 4, cv2.BORDER_REPLICATE
        )
        crops = default.crop(big[None])
        if not crops.face_detected:
            continue
        level = cv2.warpAffine(
            face,
            cv2.getRotationMatrix2D((24, 24), crops.regions[0].angle, 1.0),
            (48, 48),
            borderMode=cv2.BORDER_REPLICATE,
        )
        matched.append(_ncc(crops.faces[0], level))
        widened.append(_ncc(wide.crop(big[None]).faces[0], level))
    assert len(matched) >= 20
    assert np.mean(matched) > 0.6 and np.mean(matched) > np.mean(widened) + 0.05, (np.mean(matched), np.mean(widened))


def test_a_dlib_model_file_must_match_its_pinned_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.video import faces

    faces.dlib_model.cache_clear()
    monkeypatch.setitem(faces.DLIB_SHA256, faces.LANDMARKS_5, "0" * 64)
    try:
        with pytest.raises(RuntimeError, match="pinned"):
            faces.dlib_model(faces.LANDMARKS_5)
    finally:
        faces.dlib_model.cache_clear()
