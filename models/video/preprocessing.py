"""Face preprocessing shared by training and serving: grayscale frames -> 48x48 face crops.

One step for both (``training.features.face_crops`` runs it on every FER2013 still, each a 1-frame
video): a face detector on a downscaled frame (dlib's HOG by default, see :class:`FaceConfig`), the
largest face, dlib's 5-point landmarks and a crop rotated so the eyes are level, framed like the
FER2013 faces the frame model learnt from. Detection runs on a few frames of a clip; every frame gets
its own landmarks inside the nearest detected face's box, so the crop follows small movements. When
no frame has a face, the centre square is used and the caller is told (``face_detected = False``).

``python -m training.face_benchmark`` measures the detectors and the framing constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from models.video.faces import Face, FaceModels, Region, extract, map_region, upright_view, warp_view

Pass = tuple[str, int, float]  # (detector, shorter side of the frame it runs on, frame rotation in degrees)


@dataclass(frozen=True)
class FaceConfig:
    """Face detection and crop settings (the defaults are what training and serving use)."""

    face_size: int = 48  # FER2013 resolution
    # Detection passes, tried in order until one finds a confident face: a cheap one for large faces,
    # then a larger frame for small faces, then rotated frames for tilted heads (dlib's HOG finds faces
    # within about 20 degrees of upright). Detectors: "hog", "cnn" (dlib MMOD), "haar" (OpenCV).
    passes: tuple[Pass, ...] = (
        ("hog", 160, 0.0),
        ("hog", 320, 0.0),
        ("hog", 320, -20.0),
        ("hog", 320, 20.0),
        ("hog", 320, -35.0),
        ("hog", 320, 35.0),
    )
    threshold: float = -0.5  # HOG / CNN candidates down to this score; 0 and above stops the search at once
    align: bool = True  # 5-point landmarks and an eye-levelled crop; False: the box grown by ``margin``
    detect_frames: int = 4  # frames of a clip the detector runs on (spread evenly); the rest reuse the nearest box
    # Framing measured on 400 FER2013 Training faces (python -m training.face_benchmark --calibrate 400): a FER
    # face is 1.46 times dlib's 5-point template square, its centre 0.12 of that square above the square's.
    crop_scale: float = 1.46
    crop_shift: float = -0.12
    margin: float = 0.1  # without alignment: the box grown by this fraction on each side
    min_face_fraction: float = 0.15  # smallest face, as a fraction of the shorter side
    scale_factor: float = 1.15  # Haar cascade
    min_neighbors: int = 5  # Haar cascade


@dataclass
class FaceCrops:
    """What :meth:`FaceCropper.crop` found: the crops, whether a face was found, and where."""

    faces: np.ndarray  # (T, S, S) uint8
    face_detected: bool
    score: float | None = None  # the detector's score for the face, mean over the detection frames it was found in
    detector: str | None = None  # which detector found it (scores of different detectors do not compare)
    regions: list[Region] = field(default_factory=list)  # per frame, in frame coordinates
    landmarks: list[np.ndarray | None] = field(default_factory=list)  # per frame, (5, 2) in frame coordinates


class FaceCropper:
    """Finds the largest face in a clip's frames and returns ``face_size`` square grayscale crops."""

    def __init__(self, config: FaceConfig | None = None) -> None:
        self.config = config or FaceConfig()
        self.models = FaceModels(self.config.scale_factor, self.config.min_neighbors)

    def detect(self, frame: np.ndarray, passes: tuple[Pass, ...] | None = None) -> tuple[Face | None, Pass | None]:
        """The face to crop in ``frame`` (H, W uint8) and the pass that found it; ``(None, None)`` when none.

        The first pass with a confident detection (score >= 0; Haar: any) gives its largest face; when no
        pass has one, the best-scoring candidate above ``threshold`` of all passes is taken.
        """
        c = self.config
        best: tuple[Face, Pass] | None = None
        for p in passes or c.passes:
            detector, side, angle = p
            scale = side / min(frame.shape)
            small, _ = warp_view(frame, angle, scale)
            found = self.models.detect(small, detector, max(20, int(c.min_face_fraction * side)), c.threshold)
            faces = [Face(_scaled(box, 1 / scale), score, detector, angle) for box, score in found]
            confident = [f for f in faces if f.score >= 0 or detector == "haar"]
            if confident:
                return max(confident, key=lambda f: f.side), p
            for f in faces:
                if best is None or f.score > best[0].score:
                    best = (f, p)
        return best if best is not None else (None, None)

    def detection_frames(self, count: int) -> list[int]:
        """Frames the detector runs on, in the order it visits them: the middle one, then the rest.

        ``detect_frames`` of ``count``, spread evenly.
        """
        n = min(count, max(1, self.config.detect_frames))
        chosen = sorted({int(i) for i in np.linspace(0, count - 1, n).round()})
        return sorted(chosen, key=lambda i: abs(i - (count - 1) / 2))

    def crop(self, frames: np.ndarray) -> FaceCrops:
        """Crop ``(T, H, W)`` uint8 frames to ``(T, S, S)`` faces of the largest face found.

        All passes run on the first detection frame; the others run only the pass that found the face there
        (or, with no face yet, the first pass), so a clip costs about one full search.
        """
        found: dict[int, Face] = {}
        hit: Pass | None = None
        for n, i in enumerate(self.detection_frames(len(frames))):
            passes = None if n == 0 else ((hit or self.config.passes[0]),)
            face, used = self.detect(frames[i], passes)
            if face is not None:
                found[i], hit = face, hit or used
        size = self.config.face_size
        out = np.empty((len(frames), size, size), dtype=np.uint8)
        regions: list[Region] = []
        landmarks: list[np.ndarray | None] = []
        for i, frame in enumerate(frames):
            points = None
            if found:
                face = found[min(found, key=lambda j: abs(j - i))]
                region, points = self.region(frame, face)
            else:
                region = _centre_square(frame.shape)
            upright_inside = points is None and region.angle == 0  # the centre square, or a Haar box as before
            out[i] = _square(frame, region, size) if upright_inside else extract(frame, region, size)
            regions.append(region)
            landmarks.append(points)
        if not found:
            return FaceCrops(out, False, regions=regions, landmarks=landmarks)
        faces = list(found.values())
        score = float(np.mean([f.score for f in faces]))
        return FaceCrops(out, True, score, faces[0].detector, regions, landmarks)

    def region(self, frame: np.ndarray, face: Face) -> tuple[Region, np.ndarray | None]:
        """Crop region of ``face`` in ``frame`` and its 5 landmarks in frame coordinates (None without alignment)."""
        c = self.config
        if not c.align:
            left, top, right, bottom = face.box
            side = max(right - left, bottom - top) * (1 + 2 * c.margin)
            m, _ = upright_view(frame.shape, face.angle)
            region = map_region(Region((left + right) / 2, (top + bottom) / 2, side), cv2.invertAffineTransform(m), 0)
            region = Region(region.cx, region.cy, region.side, face.angle)
            return (region if face.angle else _inside(region, frame.shape)), None
        view, m = warp_view(frame, face.angle)
        region, points = self.models.aligned_region(view, face, c.crop_scale, c.crop_shift)
        back = cv2.invertAffineTransform(m)
        points = points @ back[:, :2].T + back[:, 2]
        return map_region(region, back, face.angle), points


def _scaled(box: tuple[float, float, float, float], k: float) -> tuple[float, float, float, float]:
    left, top, right, bottom = box
    return left * k, top * k, right * k, bottom * k


def _centre_square(shape: tuple[int, int]) -> Region:
    h, w = shape
    side = min(h, w)
    return Region(w / 2, h / 2, side)


def _inside(region: Region, shape: tuple[int, int]) -> Region:
    """An upright square region shrunk and moved to lie inside the frame (the crop Haar boxes always had)."""
    side = min(int(region.side), shape[0], shape[1])
    x0 = int(np.clip(region.cx - side / 2, 0, shape[1] - side))
    y0 = int(np.clip(region.cy - side / 2, 0, shape[0] - side))
    return Region(x0 + side / 2, y0 + side / 2, side)


def _square(frame: np.ndarray, region: Region, size: int) -> np.ndarray:
    """An upright square region inside the frame, resized (area averaging when shrinking)."""
    side = int(region.side)
    x0, y0 = round(region.cx - side / 2), round(region.cy - side / 2)
    face = frame[max(0, y0) : y0 + side, max(0, x0) : x0 + side]
    return cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def faces_to_tensor(faces: np.ndarray) -> torch.Tensor:
    """``(T, S, S)`` uint8 faces -> ``(T, 1, S, S)`` float tensor scaled to [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1)


def pad_clips(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(T_i, 1, S, S)`` clips into ``(B, T_max, 1, S, S)`` plus a frame mask ``(B, T_max)``."""
    t_max = max(c.shape[0] for c in clips)
    batch = torch.zeros(len(clips), t_max, *clips[0].shape[1:])
    mask = torch.zeros(len(clips), t_max, dtype=torch.bool)
    for i, c in enumerate(clips):
        batch[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    return batch, mask
