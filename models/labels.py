"""The service's 7 emotion classes and the label mappings of the source datasets."""

from __future__ import annotations

from typing import Literal, get_args

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
NUM_CLASSES = len(EMOTIONS)
EMOTION_TO_INDEX = {name: i for i, name in enumerate(EMOTIONS)}
Modality = Literal["text", "audio", "video"]
MODALITIES: tuple[Modality, ...] = get_args(Modality)

# MELD emotion column -> service class.
MELD_TO_EMOTION = {
    "anger": "angry",
    "disgust": "disgust",
    "fear": "fear",
    "joy": "happy",
    "neutral": "neutral",
    "sadness": "sad",
    "surprise": "surprise",
}

# RAVDESS filename emotion code -> service class. Code 02 ("calm") is not one of our classes;
# we map it to neutral (see models/MODEL_CARD.md). Pass calm_as=None to drop it instead.
RAVDESS_TO_EMOTION = {
    "01": "neutral",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fear",
    "07": "disgust",
    "08": "surprise",
}
RAVDESS_CALM = "02"
