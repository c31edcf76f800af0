"""The response contract every prediction endpoint keeps (shared by the unit and integration tests)."""

from __future__ import annotations

from typing import Any

import pytest

from models.labels import EMOTIONS
from serve.schemas import ModalityResult, PredictionResponse

TOP_LEVEL = {name for name, field in PredictionResponse.model_fields.items() if field.is_required()}
OPTIONAL = {name for name, field in PredictionResponse.model_fields.items() if not field.is_required()}
PER_MODALITY = {name for name, field in ModalityResult.model_fields.items() if field.is_required()}


def check_contract(body: dict[str, Any]) -> None:
    """Shape and arithmetic of a prediction: 7 probabilities summing to 1, contributions summing to 1."""
    assert TOP_LEVEL <= set(body) <= TOP_LEVEL | OPTIONAL, body
    assert list(body["probabilities"]) == list(EMOTIONS)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["emotion"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    assert body["modalities"], "at least one modality answered"
    assert set(body["contributions"]) == set(body["modalities"])
    assert sum(body["contributions"].values()) == pytest.approx(1.0, abs=1e-5)
    assert not set(body["dropped"]) & set(body["modalities"])
    if "transcript" in body:  # the words of the audio: never both given and dropped
        assert "transcript" not in body["dropped"] and isinstance(body["transcript"]["text"], str)
        assert body["transcript"]["fused"] == (body["modalities"].get("text", {}).get("source") == "transcript")
    for result in body["modalities"].values():
        assert PER_MODALITY <= set(result)
        assert result["emotion"] in EMOTIONS
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["latency_ms"] >= 0 and result["batch_size"] >= 1
    if len(body["modalities"]) == 1:  # one modality: the encoder's own calibrated answer
        (only,) = body["modalities"].values()
        assert body["emotion"] == only["emotion"] and body["confidence"] == only["confidence"]
        assert body["probabilities"] == only["probabilities"]
