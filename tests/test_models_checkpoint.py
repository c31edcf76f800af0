"""Round trip of weights through safetensors + JSON, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.audio import AudioModel, AudioModelConfig
from models.checkpoint import CheckpointError, load_model, save_model
from models.fusion import FusionModel, FusionModelConfig
from models.text import TextModel, TextModelConfig
from models.video import VideoModel, VideoModelConfig


def _inputs(kind: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    if kind == "audio":
        return torch.randn(2, 1, 64, 100), torch.tensor([100, 60])
    if kind == "video":
        return torch.randn(2, 3, 1, 48, 48), torch.ones(2, 3, dtype=torch.bool)
    log_probs = torch.log_softmax(torch.randn(2, 3, 7), -1)
    return torch.randn(2, 3, 256), log_probs, torch.tensor([[True, True, False], [True, False, True]])


@pytest.mark.parametrize(
    "kind,model",
    [
        ("audio", lambda: AudioModel(AudioModelConfig())),
        ("video", lambda: VideoModel(VideoModelConfig(channels=(8, 16, 32)))),
        ("fusion", lambda: FusionModel(FusionModelConfig())),
    ],
)
def test_round_trip(tmp_path: Path, kind: str, model) -> None:
    torch.manual_seed(0)
    original = model().eval()
    calibrated = original.temperature if kind == "fusion" else original.head.temperature
    calibrated.fill_(1.7)
    save_model(original, tmp_path, {"version": "t1"})
    loaded, config = load_model(tmp_path)
    assert config["model_type"] == kind and config["metadata"]["version"] == "t1"
    restored = loaded.temperature if kind == "fusion" else loaded.head.temperature
    torch.testing.assert_close(restored, torch.full_like(restored, 1.7))
    with torch.no_grad():
        for a, b in zip(original(*_inputs(kind)), loaded(*_inputs(kind)), strict=True):
            torch.testing.assert_close(a, b)


def test_text_checkpoint_stores_only_tuned_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TextModel(TextModelConfig(trainable_layers=1)).eval()
    with torch.no_grad():
        model.backbone.encoder.layer[-1].output.dense.weight.add_(0.01)
    save_model(model, tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    backbone_keys = [k for k in stored if k.startswith("backbone.")]
    assert backbone_keys and all(k.startswith("backbone.encoder.layer.5.") for k in backbone_keys)
    loaded, _ = load_model(tmp_path)
    ids = torch.tensor([[101, 2023, 2003, 2307, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[1], loaded(ids, mask)[1])


def test_missing_and_mismatched_checkpoints_raise(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    save_model(AudioModel(AudioModelConfig()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["gru_hidden"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path)
    config["labels"] = ["a", "b"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="labels"):
        load_model(tmp_path)
