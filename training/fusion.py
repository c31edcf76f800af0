"""Fusion training on label-matched triplets.

No naturally paired text + speech + face set is available. A triplet is built by picking a class,
then one MELD utterance, one RAVDESS clip and one FER2013 face of that class, each from its own
training split (validation triplets: from the validation splits). The encoders are frozen; the
fusion module learns on their embeddings with random modality dropout so that every non-empty
subset of modalities works.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import save_model
from models.fusion.model import FusionModel, FusionModelConfig
from models.labels import MODALITIES, NUM_CLASSES
from training.calibration import fit_temperature
from training.embeddings import encode_split
from training.metrics import classification_report

SUBSETS: list[tuple[str, ...]] = [s for r in range(1, 4) for s in itertools.combinations(MODALITIES, r)]


def make_triplets(labels: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` label-matched triplets, classes drawn uniformly: ``(labels, {modality: sample indices})``."""
    by_class = {m: [np.flatnonzero(y == c) for c in range(NUM_CLASSES)] for m, y in labels.items()}
    classes = [c for c in range(NUM_CLASSES) if all(len(by_class[m][c]) for m in labels)]
    ys = rng.choice(classes, size=n)
    idx = {m: np.array([rng.choice(by_class[m][c]) for c in ys]) for m in labels}
    return ys, idx


def triplet_batch(embs: dict[str, np.ndarray], idx: dict[str, np.ndarray], present: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack embeddings to ``(B, 3, D)`` with a presence mask ``(B, 3)``."""
    stacked = np.stack([embs[m][idx[m]] for m in MODALITIES], axis=1)
    return torch.from_numpy(stacked), torch.from_numpy(present)


def subset_mask(subset: tuple[str, ...], n: int) -> np.ndarray:
    return np.tile(np.array([m in subset for m in MODALITIES]), (n, 1))


@torch.no_grad()
def evaluate_triplets(model: FusionModel, data: dict[str, dict[str, np.ndarray]], ys: np.ndarray,
                      idx: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fused accuracy/F1 for every modality subset, and each encoder's own head, on the same triplets."""
    model.eval()
    embs = {m: data[m]["embedding"] for m in MODALITIES}
    out: dict[str, Any] = {"n": len(ys), "fused": {}, "single_encoder": {}}
    for subset in SUBSETS:
        x, present = triplet_batch(embs, idx, subset_mask(subset, len(ys)))
        logits, contrib = model(x, present)
        report = classification_report(ys, logits.argmax(1).numpy())
        report["mean_contributions"] = {m: round(float(contrib[:, i].mean()), 4) for i, m in enumerate(MODALITIES) if m in subset}
        out["fused"]["+".join(subset)] = report
    for m in MODALITIES:
        out["single_encoder"][m] = classification_report(ys, data[m]["logits"][idx[m]].argmax(1))
    best_single = max(out["single_encoder"].values(), key=lambda r: r["accuracy"])
    out["best_single_accuracy"] = best_single["accuracy"]
    out["fused_all_accuracy"] = out["fused"]["+".join(MODALITIES)]["accuracy"]
    return out


def load_embeddings(split: str, args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    return {m: encode_split(m, split, Path(args.weights_dir) / m, args.data_root, args.layout) for m in MODALITIES}


def train_fusion(args: argparse.Namespace) -> dict[str, Any]:
    """Train the fusion module on frozen-encoder embeddings; write it to ``args.out``."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    train = load_embeddings("train", args)
    val = load_embeddings("val", args)
    val_ys, val_idx = make_triplets({m: val[m]["labels"] for m in MODALITIES}, 3000, np.random.default_rng(1234))
    model = FusionModel(FusionModelConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    train_labels = {m: train[m]["labels"] for m in MODALITIES}
    train_embs = {m: train[m]["embedding"] for m in MODALITIES}
    best, best_state, history = -1.0, None, []
    for step in range(1, args.steps + 1):
        model.train()
        ys, idx = make_triplets(train_labels, args.batch_size, rng)
        present = np.stack([subset_mask(SUBSETS[k], 1)[0] for k in rng.integers(0, len(SUBSETS), args.batch_size)])
        x, mask = triplet_batch(train_embs, idx, present)
        x = x + 0.1 * x.std() * torch.randn_like(x)  # embedding noise: train embeddings are cleaner than unseen ones
        logits, _ = model(x, mask)
        loss = loss_fn(logits, torch.from_numpy(ys))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == args.steps:
            result = evaluate_triplets(model, val, val_ys, val_idx)
            score = result["fused"]["+".join(MODALITIES)]["macro_f1"]
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "val_fused_all_macro_f1": round(score, 4)})
            print(f"fusion step {step} loss {float(loss.detach()):.4f} val fused macro-F1 {score:.4f}", flush=True)
            if score > best:
                best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    # Temperature over a mix of subsets, so probabilities stay calibrated whatever is present.
    with torch.no_grad():
        present = np.stack([subset_mask(SUBSETS[k % len(SUBSETS)], 1)[0] for k in range(len(val_ys))])
        x, mask = triplet_batch({m: val[m]["embedding"] for m in MODALITIES}, val_idx, present)
        logits, _ = model(x, mask)
    model.head.temperature.fill_(fit_temperature(logits, torch.from_numpy(val_ys)))
    result = evaluate_triplets(model, val, val_ys, val_idx)
    metadata = {
        "version": f"fusion-{time.strftime('%Y%m%d')}",
        "command": "python -m training.train " + " ".join(sys.argv[1:]),
        "data": "label-matched triplets: MELD train x RAVDESS actors 01-16 x FER2013 train (val: dev / 17-20 / PublicTest)",
        "encoders": {m: load_embeddings_version(Path(args.weights_dir) / m) for m in MODALITIES},
        "train_seconds": round(time.time() - start, 1),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
        "history": history,
        "temperature": round(float(model.head.temperature), 4),
        "val_fused_all_accuracy": round(result["fused_all_accuracy"], 4),
        "val_best_single_accuracy": round(result["best_single_accuracy"], 4),
    }
    save_model(model, args.out, metadata)
    print(f"fusion: val accuracy all three {result['fused_all_accuracy']:.4f} vs best single {result['best_single_accuracy']:.4f}")
    return result


def load_embeddings_version(weights_dir: Path) -> str:
    from models.checkpoint import read_config

    return str(read_config(weights_dir)["metadata"].get("version", "unversioned"))
