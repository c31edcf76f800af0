"""Face detectors, 5-point landmarks and eye-levelled crop regions (dlib, with OpenCV's Haar cascade).

Model files come from the ``face-recognition-models`` package: the MMOD CNN detector and the 5-point
landmark model only (the package's 68-point model is trained on data for non-commercial use only and
is never loaded). dlib's HOG detector needs no file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import cv2
import dlib
import numpy as np

DetectorName = Literal["hog", "cnn", "haar"]
DETECTORS: tuple[str, ...] = ("hog", "cnn", "haar")
LANDMARKS_5 = "shape_predictor_5_face_landmarks.dat"
MMOD_CNN = "mmod_human_face_detector.dat"
# The only dlib files loaded, pinned: a changed package file is refused, not silently used.
DLIB_SHA256 = {
    LANDMARKS_5: "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    MMOD_CNN: "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
}


@cache
def dlib_model(name: str) -> str:
    """Path of a model file shipped by the ``face-recognition-models`` package, checked against its pinned sha256.

    Found through the package's import spec without importing it (its ``__init__`` needs ``pkg_resources``,
    which current setuptools no longer has).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face models missing: pip install face-recognition-models==0.3.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in the installed face-recognition-models package")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != DLIB_SHA256[name]:
        raise RuntimeError(f"{path} has sha256 {digest}, pinned {DLIB_SHA256[name]}")
    return str(path)


@dataclass(frozen=True)
class Face:
    """A detected face; ``box`` (left, top, right, bottom) is in the frame rotated by ``angle`` degrees.

    ``angle`` is 0 unless the face was found on a rotated copy of the frame (see :func:`upright_view`).
    """

    box: tuple[float, float, float, float]
    score: float
    detector: str
    angle: float = 0.0

    @property
    def side(self) -> float:
        """Mean of the box's width and height."""
        return 0.5 * (self.box[2] - self.box[0] + self.box[3] - self.box[1])


@dataclass(frozen=True)
class Region:
    """A square crop region of a frame: centre, side (pixels) and the face's tilt in degrees.

    ``angle`` follows :func:`cv2.getRotationMatrix2D`: cropping with it makes the eye line level.
    """

    cx: float
    cy: float
    side: float
    angle: float = 0.0


def upright_view(shape: tuple[int, int], angle: float, scale: float = 1.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Affine ``(2, 3)`` matrix and output ``(width, height)`` of a frame rotated by ``angle`` degrees, then scaled.

    The canvas grows to hold the whole rotated frame, so no face is cut off.
    """
    h, w = shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    out_w, out_h = w * cos + h * sin, w * sin + h * cos
    m[0, 2] += out_w / 2 - w / 2
    m[1, 2] += out_h / 2 - h / 2
    return m * scale, (max(1, round(out_w * scale)), max(1, round(out_h * scale)))


def warp_view(frame: np.ndarray, angle: float, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``frame`` rotated by ``angle`` and scaled, and the matrix that maps frame points into it."""
    m, size = upright_view(frame.shape[:2], angle, scale)
    if angle == 0.0:
        if scale == 1.0:
            return frame, m
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return cv2.resize(frame, size, interpolation=interpolation), m
    return cv2.warpAffine(frame, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), m


class FaceModels:
    """The detectors and the 5-point landmark model, loaded lazily, one set per thread.

    dlib's and OpenCV's detectors keep scratch state, so threads do not share them.
    """

    def __init__(self, haar_scale_factor: float = 1.15, haar_min_neighbors: int = 5) -> None:
        self.haar_scale_factor = haar_scale_factor
        self.haar_min_neighbors = haar_min_neighbors
        self._local = threading.local()

    def _get(self, name: str) -> object:
        model = getattr(self._local, name, None)
        if model is None:
            if name == "hog":
                model = dlib.get_frontal_face_detector()
            elif name == "cnn":
                model = dlib.cnn_face_detection_model_v1(dlib_model(MMOD_CNN))
            elif name == "landmarks":
                model = dlib.shape_predictor(dlib_model(LANDMARKS_5))
            elif name == "haar":
                model = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
                if model.empty():
                    raise RuntimeError("OpenCV's Haar face cascade could not be loaded")
            else:
                raise ValueError(f"unknown face model {name!r}; detectors are {DETECTORS}")
            setattr(self._local, name, model)
        return model

    def detect(
        self, image: np.ndarray, detector: str, min_side: int, threshold: float = 0.0
    ) -> list[tuple[tuple[float, float, float, float], float]]:
        """Faces in a uint8 grayscale ``image`` as ``(box, score)``; boxes under ``min_side`` pixels are dropped.

        Scores: HOG, the SVM margin (found above ``threshold``); CNN, the MMOD confidence (likewise);
        Haar, the number of merged neighbouring windows.
        """
        image = np.ascontiguousarray(image)
        found: list[tuple[tuple[float, float, float, float], float]] = []
        if detector == "hog":
            rects, scores, _ = self._get("hog").run(image, 0, threshold)
            found = [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)) for r, s in zip(rects, scores)]
        elif detector == "cnn":
            for d in self._get("cnn")(image, 0):
                if d.confidence >= threshold:
                    r = d.rect
                    found.append(((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(d.confidence)))
        elif detector == "haar":
            boxes, neighbours = self._get("haar").detectMultiScale2(
                cv2.equalizeHist(image),
                scaleFactor=self.haar_scale_factor,
                minNeighbors=self.haar_min_neighbors,
                minSize=(min_side, min_side),
            )
            found = [((x, y, x + w, y + h), float(n)) for (x, y, w, h), n in zip(boxes, neighbours)]
        else:
            raise ValueError(f"unknown detector {detector!r}; choose from {DETECTORS}")
        return [(b, s) for b, s in found if min(b[2] - b[0], b[3] - b[1]) >= min_side]

    def aligned_region(self, view: np.ndarray, face: Face, scale: float, shift: float) -> tuple[Region, np.ndarray]:
        """Eye-levelled crop region of ``face`` in ``view`` (the frame rotated by ``face.angle``) and its 5 landmarks.

        dlib fits its 5-point face template to the landmarks (``get_face_chip_details`` with no padding);
        the crop is that template square times ``scale``, its centre moved by ``shift`` template sides
        along the face's down direction (negative: up).
        """
        left, top, right, bottom = (round(v) for v in face.box)
        shape = self._get("landmarks")(np.ascontiguousarray(view), dlib.rectangle(left, top, right - 1, bottom - 1))
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        chip = dlib.get_face_chip_details(shape, size=64, padding=0.0)
        centre, side, tilt = chip.rect.center(), chip.rect.width(), chip.angle
        down = np.array([-math.sin(tilt), math.cos(tilt)])
        cx, cy = np.array([centre.x, centre.y]) + shift * side * down
        return Region(float(cx), float(cy), float(side * scale), math.degrees(tilt)), points


def map_region(region: Region, view_to_frame: np.ndarray, view_angle: float) -> Region:
    """A region found in a rotated view, in the original frame's coordinates."""
    cx, cy = view_to_frame @ np.array([region.cx, region.cy, 1.0])
    return Region(float(cx), float(cy), region.side, region.angle + view_angle)


def crop_matrix(region: Region, size: int) -> np.ndarray:
    """The ``(2, 3)`` affine map from frame coordinates to the ``size`` x ``size`` crop of ``region``."""
    m = cv2.getRotationMatrix2D((region.cx, region.cy), region.angle, size / region.side)
    m[0, 2] += size / 2 - region.cx
    m[1, 2] += size / 2 - region.cy
    return m


def extract(frame: np.ndarray, region: Region, size: int) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``region``, rotated so the face is upright; edges repeat outside the frame.

    A region much larger than ``size`` is first shrunk with area averaging, so the crop does not alias.
    """
    if region.side > 2 * size:
        k = 2 * size / region.side
        frame = cv2.resize(
            frame, (max(1, round(frame.shape[1] * k)), max(1, round(frame.shape[0] * k))), interpolation=cv2.INTER_AREA
        )
        region = Region(region.cx * k, region.cy * k, region.side * k, region.angle)
    m = crop_matrix(region, size)
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
