"""Face preprocessing shared by training and serving: grayscale frames -> 48x48 face crops.

Faces are found with OpenCV's bundled Haar cascade. A frame where no face is found reuses the
nearest frame's face box; if no frame has a face, the centre square is used and the caller is
told (``face_detected = False``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch


@dataclass
class FaceConfig:
    """Face detection and crop settings."""

    face_size: int = 48  # FER2013 resolution
    detect_side: int = 160  # frames are resized so their shorter side is this before detection
    margin: float = 0.1  # box grown by this fraction on each side, close to FER2013's framing
    min_face_fraction: float = 0.2  # smallest face, as a fraction of the shorter side
    scale_factor: float = 1.15
    min_neighbors: int = 5


class FaceCropper:
    """Detects the largest face in each frame and returns ``face_size`` square grayscale crops."""

    def __init__(self, config: FaceConfig | None = None) -> None:
        self.config = config or FaceConfig()
        self._local = threading.local()  # CascadeClassifier is not shared between threads

    @property
    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
            if cascade.empty():
                raise RuntimeError("OpenCV's Haar face cascade could not be loaded")
            self._local.cascade = cascade
        return cascade

    def detect(self, frame: np.ndarray) -> tuple[int, int, int, int] | None:
        """Largest face box ``(x, y, w, h)`` in ``frame`` (H, W uint8), or None."""
        c = self.config
        h, w = frame.shape
        scale = c.detect_side / min(h, w)
        small = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
        small = cv2.equalizeHist(small)
        min_side = max(20, int(c.min_face_fraction * c.detect_side))
        boxes = self._cascade.detectMultiScale(
            small, scaleFactor=c.scale_factor, minNeighbors=c.min_neighbors, minSize=(min_side, min_side)
        )
        if len(boxes) == 0:
            return None
        x, y, bw, bh = max(boxes, key=lambda b: b[2] * b[3])
        return round(x / scale), round(y / scale), round(bw / scale), round(bh / scale)

    def crop(self, frames: np.ndarray) -> tuple[np.ndarray, bool]:
        """Crop ``(T, H, W)`` uint8 frames to ``(T, S, S)`` faces; also say whether any face was found."""
        boxes = [self.detect(f) for f in frames]
        found = [i for i, b in enumerate(boxes) if b is not None]
        size = self.config.face_size
        out = np.empty((len(frames), size, size), dtype=np.uint8)
        for i, frame in enumerate(frames):
            if found:
                nearest = min(found, key=lambda j: abs(j - i))
                square = self._grow(boxes[nearest], frame.shape)
            else:
                square = _centre_square(frame.shape)
            x0, y0, side = square
            face = frame[y0 : y0 + side, x0 : x0 + side]
            out[i] = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
        return out, bool(found)

    def _grow(self, box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int]:
        x, y, w, h = box
        side = int(max(w, h) * (1 + 2 * self.config.margin))
        side = min(side, shape[0], shape[1])
        cx, cy = x + w / 2, y + h / 2
        x0 = int(np.clip(cx - side / 2, 0, shape[1] - side))
        y0 = int(np.clip(cy - side / 2, 0, shape[0] - side))
        return x0, y0, side


def _centre_square(shape: tuple[int, int]) -> tuple[int, int, int]:
    h, w = shape
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


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
