"""Dataset readers: the real sets in ``../shared/data`` and the seed's ``data/{split}/<emotion>/`` layout.

Readers return lists of ``(item, label_index)`` where ``item`` is a string (text) or a file path.
Label mappings live in :mod:`models.labels`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from models.labels import EMOTION_TO_INDEX, EMOTIONS, MELD_TO_EMOTION, RAVDESS_CALM, RAVDESS_TO_EMOTION
from models.text.preprocessing import Turn

Sample = tuple[str, int]

MELD_FILES = {"train": "train_sent_emo.csv", "val": "dev_sent_emo.csv"}
GOEMOTIONS_FILES = {"train": "train.csv", "val": "val.csv"}
TEXT_SOURCES = ("meld", "goemotions")
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


MELD_CONTEXT_TURNS = 12  # at most this many previous turns per line; the token budget usually cuts sooner


def read_meld_contexts(root: str | Path, split: str, turns: int = MELD_CONTEXT_TURNS) -> list[tuple[Turn, ...]]:
    """Per line of :func:`read_meld` (same order): the previous turns of its dialogue, oldest first.

    The turns are the lines of the same ``Dialogue_ID`` with a smaller ``Utterance_ID``, with their speakers.
    """
    path = Path(root) / "meld_text" / MELD_FILES[split]
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(row["Utterance"].replace("\x92", "'").split())
            if text:
                rows.append((int(row["Dialogue_ID"]), int(row["Utterance_ID"]), text, row["Speaker"].strip()))
    dialogues: dict[int, list[tuple[int, str, str]]] = {}
    for dialogue, utterance, text, speaker in rows:
        dialogues.setdefault(dialogue, []).append((utterance, text, speaker))
    for lines in dialogues.values():
        lines.sort()
    contexts = []
    for dialogue, utterance, _, _ in rows:
        before = [Turn(text, speaker) for u, text, speaker in dialogues[dialogue] if u < utterance]
        contexts.append(tuple(before[-turns:]))
    return contexts


def read_goemotions(root: str | Path, split: str) -> list[tuple[str, tuple[int, ...]]]:
    """GoEmotions comments of ``split`` from ``root/goemotions_ekman``: ``(text, label indices)``.

    About 9 % of the comments carry more than one of the 7 labels; all of them are kept here, and
    :class:`training.tasks.TextTask` turns them into a soft target shared equally between the labels.
    """
    path = Path(root) / "goemotions_ekman" / GOEMOTIONS_FILES[split]
    samples = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(row["text"].split())
            labels = tuple(dict.fromkeys(EMOTION_TO_INDEX[name] for name in row["labels"].split()))
            if text and labels:
                samples.append((text, labels))
    return samples


def read_text_corpora(root: str | Path, split: str) -> list[tuple[str, tuple[int, ...], str]]:
    """MELD and GoEmotions together: ``(text, label indices, source)`` with source in :data:`TEXT_SOURCES`."""
    meld = [(text, (label,), "meld") for text, label in read_meld(root, split)]
    goemotions = [(text, labels, "goemotions") for text, labels in read_goemotions(root, split)]
    return meld + goemotions


def ravdess_label(path: str | Path, calm_as: str | None = "neutral") -> int | None:
    """Label index of a RAVDESS file name ``03-01-EE-II-SS-RR-AA.ext`` (None if dropped)."""
    code = Path(path).stem.split("-")[2]
    if code == RAVDESS_CALM:
        return EMOTION_TO_INDEX[calm_as] if calm_as else None
    return EMOTION_TO_INDEX[RAVDESS_TO_EMOTION[code]]


def ravdess_fold_actors(fold: int, folds: int = 5) -> tuple[int, ...]:
    """Actors held out by leave-actors-out fold ``fold`` of ``folds`` over actors 01-20 (fold 4 of 5: 17-20)."""
    if not 0 <= fold < folds or 20 % folds:
        raise ValueError(f"fold must be in [0, {folds}) and folds must divide 20, got fold {fold} of {folds}")
    size = 20 // folds
    return tuple(range(fold * size + 1, (fold + 1) * size + 1))


def read_ravdess(
    root: str | Path, split: str, calm_as: str | None = "neutral", fold: int | None = None, folds: int = 5
) -> list[Sample]:
    """RAVDESS speech clips, speaker-independent: train = actors 01-16, val = actors 17-20.

    With ``fold``, val is that leave-actors-out fold's actors and train the other actors of 01-20.
    """
    held = RAVDESS_VAL_ACTORS if fold is None else ravdess_fold_actors(fold, folds)
    all_actors = RAVDESS_TRAIN_ACTORS + RAVDESS_VAL_ACTORS
    actors = [a for a in all_actors if a not in held] if split == "train" else list(held)
    samples = []
    for actor in actors:
        for path in sorted((Path(root) / "ravdess_speech" / f"Actor_{actor:02d}").glob("*.flac")):
            label = ravdess_label(path, calm_as)
            if label is not None:
                samples.append((str(path), label))
    return samples


def read_tess(root: str | Path) -> list[Sample]:
    """TESS clips ``<speaker>/<speaker>_<word>_<label>.flac`` (two speakers; labels already the 7 classes)."""
    samples = []
    for path in sorted((Path(root) / "tess_speech").glob("*/*.flac")):
        label = path.stem.rsplit("_", 1)[-1]
        if label in EMOTION_TO_INDEX:
            samples.append((str(path), EMOTION_TO_INDEX[label]))
    return samples


def read_image_folders(root: str | Path, extensions: set[str]) -> list[Sample]:
    """``root/<emotion>/<files>`` for the 7 class names (other folders are ignored)."""
    samples = []
    for emotion in EMOTIONS:
        folder = Path(root) / emotion
        if folder.is_dir():
            samples += [
                (str(p), EMOTION_TO_INDEX[emotion]) for p in sorted(folder.iterdir()) if p.suffix.lower() in extensions
            ]
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
    if modality == "text":  # MELD and GoEmotions; multi-label comments count under their first label here
        return [(text, labels[0]) for text, labels, _ in read_text_corpora(root, split)]
    readers = {"audio": read_ravdess, "video": read_fer}
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
