"""Saving and loading weights as ``model.safetensors`` + ``config.json`` (never pickle).

``config.json`` holds the model type, its architecture config, the label order and free-form
metadata (training command, data, metrics). The text model and the Whisper speech model store only
the parameters training changed; everything else is rebuilt from their pip-installed backbones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.audio.model import AudioModel, AudioModelConfig
from models.audio.whisper_model import WhisperAudioModel, WhisperAudioModelConfig
from models.fusion.model import FusionModel, FusionModelConfig
from models.labels import EMOTIONS
from models.text.model import TextModel, TextModelConfig
from models.video.model import VideoModel, VideoModelConfig

MODEL_TYPES: dict[str, tuple[type[nn.Module], type]] = {
    "text": (TextModel, TextModelConfig),
    "audio": (AudioModel, AudioModelConfig),
    "audio_whisper": (WhisperAudioModel, WhisperAudioModelConfig),
    "video": (VideoModel, VideoModelConfig),
    "fusion": (FusionModel, FusionModelConfig),
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, malformed or does not match its model."""


def config_from_dict(model_type: str, values: dict[str, Any]) -> Any:
    """Build the config dataclass of ``model_type`` from JSON values (lists become tuples)."""
    _, config_cls = MODEL_TYPES[model_type]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - fields
    if unknown:
        raise CheckpointError(f"unknown {model_type} config fields: {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_model(model_type: str, config: Any) -> nn.Module:
    """Instantiate a fresh model of ``model_type``."""
    model_cls, _ = MODEL_TYPES[model_type]
    return model_cls(config)


def model_type_of(model: nn.Module) -> str:
    for name, (cls, _) in MODEL_TYPES.items():
        if isinstance(model, cls):
            return name
    raise CheckpointError(f"not an emotion model: {type(model).__name__}")


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy that safetensors can write whatever device trained it."""
    return tensor.detach().cpu().contiguous().clone()


def stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: all of them, except a pretrained backbone's frozen part."""
    state = model.state_dict()
    if isinstance(model, TextModel | WhisperAudioModel):
        keep = set(model.trainable_parameter_names())
        state = {k: v for k, v in state.items() if not k.startswith("backbone.") or k in keep}
    return {k: host_copy(v) for k, v in state.items()}


def weights_digest(model: nn.Module) -> str:
    """Six hex digits of the stored tensors: two models trained on one day get different versions."""
    digest = hashlib.sha1()
    for name, tensor in sorted(stored_state(model).items()):
        digest.update(name.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:6]


def save_model(
    model: nn.Module, directory: str | Path, metadata: dict[str, Any] | None = None, half: bool = False
) -> Path:
    """Write ``model`` to ``directory`` as safetensors + JSON; ``half`` stores float16 weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = stored_state(model)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    config = {
        "model_type": model_type_of(model),
        "config": dataclasses.asdict(model.config),
        "labels": list(EMOTIONS),
        "metadata": metadata or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's ``config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}")
    config = json.loads(path.read_text())
    if config.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{path}: unknown model_type {config.get('model_type')!r}")
    if tuple(config.get("labels", ())) != EMOTIONS:
        raise CheckpointError(f"{path}: labels {config.get('labels')} differ from {list(EMOTIONS)}")
    return config


def load_model(directory: str | Path, overrides: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model and its config dict from ``directory``; the model is in eval mode.

    ``overrides`` replaces config values, e.g. ``{"backbone": "/path/to/other"}`` for text.
    """
    directory = Path(directory)
    config = read_config(directory)
    values = {**config["config"], **(overrides or {})}
    model = build_model(config["model_type"], config_from_dict(config["model_type"], values))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}")
    state = load_file(str(weights))
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{weights}: tensors the model does not have: {unexpected[:5]}")
    missing = [k for k in expected if k not in state and not k.startswith("backbone.")]
    if missing:
        raise CheckpointError(f"{weights}: tensors missing: {missing[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{weights}: {k} has shape {tuple(v.shape)}, model wants {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    model.eval()
    return model, config
