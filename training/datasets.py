"""Dataset readers: the real sets in ``../shared/data`` and the seed's ``data/{split}/<emotion>/`` layout.

Readers return lists of ``(item, label_index)`` where ``item`` is a string (text) or a file path.
Label mappings live in :mod:`models.labels`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from models.labels import EMOTION_TO_INDEX, EMOTIONS, MELD_TO_EMOTION, RAVDESS_CALM, RAVDESS_TO_EMOTION

Sample = tuple[str, int]

MELD_FILES = {"train": "train_sent_emo.csv", "val": "dev_sent_emo.csv"}
RAVDESS_TRAIN_ACTORS = tuple(range(1, 17))
RAVDESS_VAL_ACTORS = tuple(range(17, 21))
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".webm", ".mp4"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".avi", ".mkv"}


def read_meld(root: str | Path, split: str) -> list[Sample]:
    """MELD utterances of ``split`` (train or val = MELD dev) from ``root/meld_text``."""
    path = Path(root) / "meld_text" / MELD_FILES[split]
    samples = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            emotion = MELD_TO_EMOTION[row["Emotion"].strip().lower()]
            text = " ".join(row["Utterance"].replace("\x92", "'").split())
            if text:
                samples.append((text, EMOTION_TO_INDEX[emotion]))
    return samples


def ravdess_label(path: str | Path, calm_as: str | None = "neutral") -> int | None:
    """Label index of a RAVDESS file name ``03-01-EE-II-SS-RR-AA.ext`` (None if dropped)."""
    code = Path(path).stem.split("-")[2]
    if code == RAVDESS_CALM:
        return EMOTION_TO_INDEX[calm_as] if calm_as else None
    return EMOTION_TO_INDEX[RAVDESS_TO_EMOTION[code]]


def read_ravdess(root: str | Path, split: str, calm_as: str | None = "neutral") -> list[Sample]:
    """RAVDESS speech clips; train = actors 01-16, val = actors 17-20 (speaker-independent)."""
    actors = RAVDESS_TRAIN_ACTORS if split == "train" else RAVDESS_VAL_ACTORS
    samples = []
    for actor in actors:
        for path in sorted((Path(root) / "ravdess_speech" / f"Actor_{actor:02d}").glob("*.flac")):
            label = ravdess_label(path, calm_as)
            if label is not None:
                samples.append((str(path), label))
    return samples


def read_image_folders(root: str | Path, extensions: set[str]) -> list[Sample]:
    """``root/<emotion>/<files>`` for the 7 class names (other folders are ignored)."""
    samples = []
    for emotion in EMOTIONS:
        folder = Path(root) / emotion
        if folder.is_dir():
            samples += [(str(p), EMOTION_TO_INDEX[emotion]) for p in sorted(folder.iterdir()) if p.suffix.lower() in extensions]
    return samples


def read_fer(root: str | Path, split: str) -> list[Sample]:
    """FER2013 faces: train = official Training, val = PublicTest."""
    return read_image_folders(Path(root) / "fer2013" / split, IMAGE_EXTENSIONS)


def read_seed_layout(root: str | Path, split: str, modality: str) -> list[Sample]:
    """The seed's ``data/{train,val,test}/<emotion>/<files>`` layout (``.txt`` files for text)."""
    folder = Path(root) / split
    if modality == "text":
        return [(Path(p).read_text(encoding="utf-8").strip(), y) for p, y in read_image_folders(folder, {".txt"})]
    return read_image_folders(folder, AUDIO_EXTENSIONS if modality == "audio" else IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)


def read_split(modality: str, root: str | Path, split: str, layout: str = "shared") -> list[Sample]:
    """Read ``split`` of ``modality`` from the shared real data (``layout='shared'``) or a seed folder."""
    if layout == "seed":
        return read_seed_layout(root, split, modality)
    readers = {"text": read_meld, "audio": read_ravdess, "video": read_fer}
    return readers[modality](root, split)


def check_holdout_fraction(fraction: float) -> float:
    """Return ``fraction`` if it is a usable holdout share, in (0, 1); raise ``ValueError`` otherwise."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    return fraction


def split_holdout(samples: list[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into ``(train, holdout)``, ``fraction`` of each class held out.

    The split depends only on the sample list and ``seed`` (not on the training seed), so a resumed
    run and a rerun hold out the same samples. The holdout is stratified by class but not by speaker
    or dialogue: for RAVDESS and MELD the same person can land on both sides.
    """
    check_holdout_fraction(fraction)
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    labels = np.array([y for _, y in samples])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = round(fraction * len(members))
        held.update(rng.choice(members, size=count, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
