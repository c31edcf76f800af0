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
from models.checkpoint import WEIGHTS_FILE, load_model, read_config
from models.common import forward_in_precision, prepare_for_inference, resolve_precision
from models.text.preprocessing import TextPreprocessor, Turn
from models.video.preprocessing import FaceConfig, faces_to_tensor, pad_clips
from training.audio_augment import DEGRADATIONS
from training.datasets import (
    check_holdout_fraction,
    read_meld_contexts,
    read_ravdess,
    read_split,
    read_text_corpora,
    split_holdout,
)
from training.degrade import build_degraded
from training.features import CACHE_DIR, audio_features, face_crops, whisper_log_mels


def _weights_digest(weights_dir: Path, preprocessing: object = None) -> str:
    """Digest of the weights, their config (an inference option in config.json changes the outputs too) and the
    preprocessing settings the inputs are built with (defaults in the code that config.json does not spell out)."""
    digest = hashlib.sha1((weights_dir / WEIGHTS_FILE).read_bytes())
    config = weights_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    digest.update(repr(preprocessing).encode())
    return digest.hexdigest()[:12]


def parse_split(split: str) -> tuple[str, float]:
    """``"val"`` -> ``("val", 0)``; ``"holdout:0.05"`` -> ``("train", 0.05)``, the slice ``--holdout 0.05`` selected on.

    Audio also takes ``fold:K`` (the actors leave-actors-out fold K holds out) and ``degraded:<condition>``
    (the validation clips through one channel condition of :mod:`training.degrade`); both read as ``val``.
    """
    if split.startswith("holdout:"):
        return "train", check_holdout_fraction(float(split.split(":", 1)[1]))
    if split.startswith("fold:"):
        int(split.split(":", 1)[1])
        return "val", 0.0
    if split.startswith("degraded:"):
        if split.split(":", 1)[1] not in DEGRADATIONS:
            raise ValueError(f"unknown degradation in {split!r}; choose from {DEGRADATIONS}")
        return "val", 0.0
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}")
    return split, 0.0


@torch.inference_mode()
def encode_split(
    modality: str,
    split: str,
    weights_dir: str | Path,
    data_root: str | Path,
    layout: str = "shared",
    batch_size: int = 64,
    context: bool = False,
) -> dict[str, np.ndarray]:
    """``{"embedding": (N, 256), "logits": (N, 7), "probs": (N, 7), "labels": (N,)}`` for one split.

    ``split`` is a data split (``train``, ``val``) or ``holdout:F``, the stratified slice of the training split
    that ``training.train --holdout F`` picks epochs on (see ``training.datasets.split_holdout``). With
    ``context`` (text), each MELD line is read with the previous turns of its dialogue, as a client sends them.
    """
    source, holdout = parse_split(split)  # a bad split fails here, before the cache or the model is touched
    weights_dir = Path(weights_dir)
    stored = read_config(weights_dir)
    whisper = stored["model_type"] == "audio_whisper"
    precision = "float32" if whisper else resolve_precision("auto", torch.device("cpu"))  # as the pipelines run
    features = AudioFeatureConfig(**stored["metadata"].get("features", {})) if modality == "audio" else None
    kind = f"{split}-context" if context and modality == "text" else split
    cache = CACHE_DIR / f"emb-{modality}-{kind}-{layout}-{precision}-nhwc-{_weights_digest(weights_dir, features)}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return dict(data)
    model, config = load_model(weights_dir)
    prepare_for_inference(model, precision)  # as the pipelines do
    extra: dict[str, np.ndarray] = {}
    contexts: list[tuple[Turn, ...]] = []
    if modality == "audio" and layout == "shared":
        # Calm is not one of the 7 classes: whatever training mapped it to, the reported splits leave it out.
        calm = config["metadata"].get("ravdess_calm_as", "neutral") if source == "train" else None
        fold = int(split.split(":", 1)[1]) if split.startswith("fold:") else None
        samples = read_ravdess(data_root, source, calm, fold)
        if split.startswith("degraded:"):
            samples = build_degraded(data_root, calm_as=calm, condition=split.split(":", 1)[1])[split.split(":", 1)[1]]
    elif modality == "text" and layout == "shared":
        corpora = read_text_corpora(data_root, source)
        samples = [(text, labels[0]) for text, labels, _ in corpora]
        extra = {
            "source": np.array([src for _, _, src in corpora]),
            "multi_label": np.array([len(labels) > 1 for _, labels, _ in corpora]),
        }
        if context:
            meld = iter(read_meld_contexts(data_root, source))
            contexts = [next(meld) if src == "meld" else () for _, _, src in corpora]
    else:
        samples = read_split(modality, data_root, source, layout)
    if holdout:  # the slice training held out: split_holdout on indices picks the same samples
        held = [i for i, _ in split_holdout([(i, y) for i, (_, y) in enumerate(samples)], holdout)[1]]
        samples = [samples[i] for i in held]
        extra = {k: v[held] for k, v in extra.items()}
        contexts = [contexts[i] for i in held] if contexts else []
    labels = np.array([y for _, y in samples])
    order = list(range(len(samples)))
    if modality == "text":
        tokenizer = TextPreprocessor(model.config.backbone, model.config.max_length)
        # similar lengths together: less padding
        order.sort(key=lambda i: len(samples[i][0]) + sum(len(t.text) for t in (contexts[i] if contexts else ())))

        def make(idx: list[int]) -> tuple[torch.Tensor, ...]:
            tok = tokenizer([samples[i][0] for i in idx], [contexts[i] for i in idx] if contexts else None)
            return tok.input_ids, tok.attention_mask
    elif modality == "audio" and whisper:
        mels = whisper_log_mels(samples)
        order.sort(key=lambda i: mels[i].shape[1])  # similar lengths together: less padding

        def make(idx: list[int]) -> tuple[torch.Tensor, ...]:
            batch, lengths = pad_features([mels[i] for i in idx])
            return batch[:, 0], lengths
    elif modality == "audio":
        feats = audio_features(samples, features)

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
    out = {"embedding": emb, "logits": logits, "probs": probs, "labels": labels, **extra}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out
