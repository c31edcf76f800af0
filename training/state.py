"""Resumable training state: model + optimizer tensors in safetensors, the rest in JSON (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel

from models.checkpoint import host_copy


def save_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    ema: AveragedModel | None = None,
) -> None:
    """Write ``model``/``optimizer`` tensors, the weight average ``ema`` if any, and ``info`` (epoch,
    best score, history...) atomically, in one file so they always belong to the same step."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": host_copy(v) for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": host_copy(v) for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = host_copy(value)
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(directory / "state.tmp"))
    meta = {"info": info, "param_groups": opt["param_groups"], "opt_scalars": scalars}
    (directory / "state.json.tmp").write_text(json.dumps(meta))
    (directory / "state.tmp").replace(directory / "state.safetensors")
    (directory / "state.json.tmp").replace(directory / "state.json")


def load_state(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: AveragedModel | None = None
) -> dict[str, Any] | None:
    """Restore a state written by :func:`save_state`; returns its ``info`` or None if there is none.

    ``ema`` gets the stored average; a state saved without one starts the average at the restored weights.
    """
    if not (directory / "state.json").is_file():
        return None
    tensors = load_file(str(directory / "state.safetensors"))
    meta = json.loads((directory / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        average = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if average:
            ema.load_state_dict(average)
        else:
            ema.update_parameters(model)
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in meta["opt_scalars"].items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["info"]
