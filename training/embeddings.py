"""Run a trained encoder over a whole split: embeddings, logits and labels (cached per weights file).

Used by fusion training (embeddings of all three training sets) and by evaluation (validation logits).
Inputs come from the same preprocessing caches as training (no augmentation).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.audio.preprocessing import AudioFeatureConfig, pad_features
from models.checkpoint import WEIGHTS_FILE, load_model
from models.common import forward_in_precision, prepare_for_inference, resolve_precision
from models.text.preprocessing import TextPreprocessor
from models.video.preprocessing import FaceConfig, faces_to_tensor, pad_clips
from training.datasets import check_holdout_fraction, read_ravdess, read_split, split_holdout
from training.features import CACHE_DIR, audio_features, face_crops


def _weights_digest(weights_dir: Path) -> str:
    """Digest of the weights and their config (an inference option in config.json changes the outputs too)."""
    digest = hashlib.sha1((weights_dir / WEIGHTS_FILE).read_bytes())
    config = weights_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:12]


def parse_split(split: str) -> tuple[str, float]:
    """``"val"`` -> ``("val", 0)``; ``"holdout:0.05"`` -> ``("train", 0.05)``, the slice ``--holdout 0.05`` selected on."""
    if split.startswith("holdout:"):
        return "train", check_holdout_fraction(float(split.split(":", 1)[1]))
    return split, 0.0


@torch.inference_mode()
def encode_split(modality: str, split: str, weights_dir: str | Path, data_root: str | Path,
                 layout: str = "shared", batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{"embedding": (N, 256), "logits": (N, 7), "probs": (N, 7), "labels": (N,)}`` for one split.

    ``split`` is a data split (``train``, ``val``) or ``holdout:F``, the stratified slice of the training split
    that ``training.train --holdout F`` picks epochs on (see ``training.datasets.split_holdout``).
    """
    source, holdout = parse_split(split)  # a bad split fails here, before the cache or the model is touched
    weights_dir = Path(weights_dir)
    precision = resolve_precision("auto", torch.device("cpu"))
    cache = CACHE_DIR / f"emb-{modality}-{split}-{layout}-{precision}-nhwc-{_weights_digest(weights_dir)}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return dict(data)
    model, config = load_model(weights_dir)
    prepare_for_inference(model, precision)  # as the pipelines do
    if modality == "audio" and layout == "shared":
        calm = config["metadata"].get("ravdess_calm_as", "neutral")
        samples = read_ravdess(data_root, source, calm)
    else:
        samples = read_split(modality, data_root, source, layout)
    if holdout:
        samples = split_holdout(samples, holdout)[1]
    labels = np.array([y for _, y in samples])
    order = list(range(len(samples)))
    if modality == "text":
        tokenizer = TextPreprocessor(model.config.backbone, model.config.max_length)
        order.sort(key=lambda i: len(samples[i][0]))  # similar lengths together: less padding

        def make(idx: list[int]) -> tuple[torch.Tensor, ...]:
            tok = tokenizer([samples[i][0] for i in idx])
            return tok.input_ids, tok.attention_mask
    elif modality == "audio":
        feats = audio_features(samples, AudioFeatureConfig(**config["metadata"].get("features", {})))

        def make(idx: list[int]) -> tuple[torch.Tensor, ...]:
            return pad_features([feats[i] for i in idx])
    else:
        faces, _ = face_crops(samples, FaceConfig(face_size=model.config.face_size))

        def make(idx: list[int]) -> tuple[torch.Tensor, ...]:
            return pad_clips([faces_to_tensor(faces[i][None]) for i in idx])
    emb = np.zeros((len(samples), model.config.embed_dim), dtype=np.float32)
    logits = np.zeros((len(samples), 7), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=f"embed {modality}/{split}", leave=False):
        idx = order[start : start + batch_size]
        e, lg = forward_in_precision(model, make(idx), precision, torch.device("cpu"))  # as the pipelines run
        emb[idx], logits[idx] = e.numpy(), lg.numpy()
    probs = model.head.probabilities(torch.from_numpy(logits)).numpy()
    out = {"embedding": emb, "logits": logits, "probs": probs, "labels": labels}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out
