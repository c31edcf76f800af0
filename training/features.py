"""Preprocessed training inputs, computed once with the serving preprocessing and cached on disk.

Audio goes through :func:`models.media.decode_audio` + :class:`LogMelExtractor`; faces through
:class:`FaceCropper` (each still is a 1-frame video). Caches are safetensors / ``.npz`` files
read with ``allow_pickle=False`` under ``.cache/`` (git-ignored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.audio.preprocessing import AudioFeatureConfig, LogMelExtractor
from models.audio.whisper import WhisperFrontEnd
from models.media import decode_audio, decode_frames
from models.video.preprocessing import FaceConfig, FaceCropper
from training.datasets import IMAGE_EXTENSIONS

CACHE_DIR = Path(".cache")


def _cache_path(kind: str, samples: Sequence[tuple[str, int]], config: object) -> Path:
    digest = hashlib.sha1(repr((kind, [s[0] for s in samples], config)).encode()).hexdigest()[:16]
    return CACHE_DIR / f"{kind}-{digest}"


def audio_features(samples: Sequence[tuple[str, int]], config: AudioFeatureConfig) -> list[torch.Tensor]:
    """Log-mel features of each audio file (decoded with ffmpeg exactly as when serving)."""
    path = _cache_path("audio", samples, config).with_suffix(".safetensors")
    if path.is_file():
        cached = load_file(str(path))
        return [cached[str(i)] for i in range(len(samples))]
    extractor = LogMelExtractor(config)
    feats = [
        extractor(decode_audio(Path(p).read_bytes(), config.sample_rate)) for p, _ in tqdm(samples, desc="log-mel")
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({str(i): f for i, f in enumerate(feats)}, str(path))
    return feats


def whisper_log_mels(samples: Sequence[tuple[str, int]]) -> list[torch.Tensor]:
    """Whisper log-mels of each audio file as the serving pipeline computes them (decode, silence trim)."""
    frontend = WhisperFrontEnd()
    return [frontend(w) for w in audio_waves(samples, 16000)]


def audio_waves(samples: Sequence[tuple[str, int]], sample_rate: int) -> list[torch.Tensor]:
    """Decoded mono waveforms of each audio file (for augmentation before the log-mel), cached on disk."""
    path = _cache_path("waves", samples, sample_rate).with_suffix(".safetensors")
    if path.is_file():
        cached = load_file(str(path))
        return [cached[str(i)] for i in range(len(samples))]
    waves = [
        torch.from_numpy(decode_audio(Path(p).read_bytes(), sample_rate)).float()
        for p, _ in tqdm(samples, desc="decode")
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({str(i): w.contiguous() for i, w in enumerate(waves)}, str(path))
    return waves


def face_crops(samples: Sequence[tuple[str, int]], config: FaceConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(N, S, S)`` uint8 face crops of each image and whether a face was detected in it."""
    path = _cache_path("faces", samples, config).with_suffix(".npz")
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            return cached["faces"], cached["detected"]
    cropper = FaceCropper(config)
    faces = np.empty((len(samples), config.face_size, config.face_size), dtype=np.uint8)
    detected = np.zeros(len(samples), dtype=bool)
    for i, (p, _) in enumerate(tqdm(samples, desc="faces")):
        if Path(p).suffix.lower() in IMAGE_EXTENSIONS:
            image = cv2.imread(p, cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError(f"unreadable image {p}")
            frames = image[None]
        else:  # a video file in the seed layout: its first frame, decoded as when serving
            frames = decode_frames(Path(p).read_bytes(), num_frames=1)
        crops = cropper.crop(frames)
        faces[i], detected[i] = crops.faces[0], crops.face_detected
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, faces=faces, detected=detected)
    return faces, detected
