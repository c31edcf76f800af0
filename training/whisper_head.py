"""Train the Whisper-base speech emotion head on cached encoder states, with leave-actors-out cross-validation.

``python -m training.whisper_head --data-root ../shared/data`` (after ``python -m training.whisper_features``):

- Outer folds: fold ``k`` of 5 holds out RAVDESS actors ``4k+1 .. 4k+4``; the other 16 actors and all of TESS
  train. Each fold's model goes to ``<out>/fold<k>``; fold 4 (actors 17-20 held out) is the shipped model.
- Selection is nested: for each outer fold, every recipe of ``--grid`` is scored by 4 inner leave-4-actors-out
  folds of its 16 training actors (TESS on the training side), and the best inner mean accuracy wins. The
  held-out actors of the outer fold choose nothing: neither the recipe, nor the temperature, which is fitted
  on the chosen recipe's inner out-of-fold logits.
- The head sees each clip's pooled statistics (per-state mean and standard deviation over time, which is all
  it reads of the states); each epoch takes a clip's clean statistics (version 0) or an augmented draw's
  (versions 1, 2) at random. Calm trains as neutral; the held-out figures leave calm out.

Every step is deterministic given ``--seed``; finished folds are skipped on a rerun (``--resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.audio.whisper_model import WhisperAudioModel, WhisperAudioModelConfig
from models.checkpoint import save_model, weights_digest
from models.labels import EMOTION_TO_INDEX
from training.calibration import fit_temperature
from training.datasets import ravdess_fold_actors, ravdess_label
from training.metrics import classification_report
from training.whisper_features import corpus_files, load_states


@dataclass(frozen=True)
class HeadRecipe:
    """Optimisation and augmentation of one head training run."""

    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.05
    dropout: float = 0.3
    batch_size: int = 64
    label_smoothing: float = 0.1
    versions: tuple[int, ...] = (0, 1, 2)  # cached draws a training clip is taken from, one at random per epoch
    tess_per_epoch: int = 1000  # TESS clips drawn afresh each epoch next to every training RAVDESS clip
    layer_mix: str = "weighted"  # see WhisperAudioModelConfig.layer_mix
    members: int = 1  # heads trained with seeds seed, seed + 1, ... and averaged (WhisperAudioModel.ensemble)


GRID: dict[str, HeadRecipe] = {
    "weighted": HeadRecipe(),
    "concat": HeadRecipe(layer_mix="concat"),
    "concat-regularised": HeadRecipe(layer_mix="concat", dropout=0.5, weight_decay=0.5),
    "concat-x3": HeadRecipe(layer_mix="concat", members=3),
    "concat-regularised-x3": HeadRecipe(layer_mix="concat", dropout=0.5, weight_decay=0.5, members=3),
}
# What the shipped folds were selected among; the ensembles (-x3) are there to compare with --grid.
DEFAULT_GRID = ("weighted", "concat", "concat-regularised")


class StatePool:
    """Cached states of every clip, one float16 tensor per augmentation version, with labels and speakers."""

    def __init__(self, data_root: str, versions: tuple[int, ...], part_size: int = 200) -> None:
        files = corpus_files(data_root)
        self.paths = files["ravdess"] + files["tess"]
        self.is_ravdess = np.array([True] * len(files["ravdess"]) + [False] * len(files["tess"]))
        self.actor = np.array([int(Path(p).stem[-2:]) for p in files["ravdess"]] + [0] * len(files["tess"]))
        self.is_calm = np.array(
            [Path(p).stem.split("-")[2] == "02" for p in files["ravdess"]] + [False] * len(files["tess"])
        )
        labels = [ravdess_label(p, "neutral") for p in files["ravdess"]]
        labels += [EMOTION_TO_INDEX[Path(p).stem.rsplit("_", 1)[-1]] for p in files["tess"]]
        self.labels = torch.tensor(labels)
        self.stats: dict[int, torch.Tensor] = {}  # version -> (clips, num_states, 1024) pooled statistics
        for v in versions:
            per_corpus = []
            for corpus in ("ravdess", "tess"):
                states, offsets = load_states(corpus, v, len(files[corpus]), part_size)
                per_corpus += [
                    WhisperAudioModel.pooled_statistics(
                        states[offsets[i] : offsets[i + 1]].float()[None], offsets[i + 1 : i + 2] - offsets[i]
                    )[0]
                    for i in range(len(offsets) - 1)
                ]
            self.stats[v] = torch.stack(per_corpus)

    def training_indices(self, held_actors: tuple[int, ...]) -> np.ndarray:
        """TESS and the RAVDESS clips of every actor not in ``held_actors``."""
        return np.flatnonzero(~self.is_ravdess | ~np.isin(self.actor, held_actors))

    def held_indices(self, held_actors: tuple[int, ...]) -> np.ndarray:
        """RAVDESS clips of ``held_actors``, calm left out (it is not one of the 7 classes)."""
        return np.flatnonzero(self.is_ravdess & np.isin(self.actor, held_actors) & ~self.is_calm)


def train_model(
    pool: StatePool, train_idx: np.ndarray, recipe: HeadRecipe, seed: int, cache: dict | None = None
) -> WhisperAudioModel:
    """``recipe.members`` heads (seeds ``seed``, ``seed + 1``, ...) averaged into one model.

    ``cache`` keeps trained members by (training clips, recipe without ``members``, seed), so a one-member recipe
    and its ensemble share their first head instead of training it twice.
    """
    single = dataclasses.replace(recipe, members=1)
    key_clips = hash(train_idx.tobytes())
    heads = []
    for k in range(recipe.members):
        key = (key_clips, single, seed + k)
        head = cache.get(key) if cache is not None else None
        if head is None:
            head = train_head(pool, train_idx, single, seed + k)
            if cache is not None:
                cache[key] = head
        heads.append(head)
    return heads[0] if len(heads) == 1 else WhisperAudioModel.ensemble(heads).eval()


def train_head(pool: StatePool, train_idx: np.ndarray, recipe: HeadRecipe, seed: int) -> WhisperAudioModel:
    """A head trained on ``train_idx`` with ``recipe`` (the encoder is not run: its pooled statistics are cached)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = WhisperAudioModel(
        WhisperAudioModelConfig(dropout=recipe.dropout, layer_mix=recipe.layer_mix, pretrained=False)
    )
    seen = torch.cat([pool.stats[v][train_idx] for v in recipe.versions])
    model.stats_mean.copy_(seen.mean(0))
    model.stats_std.copy_(seen.std(0).clamp_min(1e-4))
    params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    ravdess = [int(i) for i in train_idx if pool.is_ravdess[i]]
    tess = [int(i) for i in train_idx if not pool.is_ravdess[i]]
    per_epoch = len(ravdess) + min(recipe.tess_per_epoch, len(tess))
    steps = recipe.epochs * ((per_epoch + recipe.batch_size - 1) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    stacked = torch.stack([pool.stats[v] for v in recipe.versions])  # (V, clips, S, F)
    model.train()
    for _ in range(recipe.epochs):
        order = ravdess + rng.sample(tess, min(recipe.tess_per_epoch, len(tess)))
        rng.shuffle(order)
        for start in range(0, len(order), recipe.batch_size):
            idx = torch.tensor(order[start : start + recipe.batch_size])
            versions = torch.randint(len(recipe.versions), (len(idx),))
            _, logits = model.forward_statistics(stacked[versions, idx])
            loss = loss_fn(logits, pool.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.inference_mode()
def head_logits(model: WhisperAudioModel, pool: StatePool, idx: np.ndarray, version: int = 0) -> torch.Tensor:
    """Logits of clips ``idx`` (clean statistics unless ``version`` says otherwise)."""
    return model.forward_statistics(pool.stats[version][idx])[1]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def inner_cv(
    pool: StatePool, actors: list[int], recipe: HeadRecipe, seed: int, cache: dict | None = None
) -> tuple[float, torch.Tensor, np.ndarray]:
    """Mean accuracy of ``recipe`` over 4 leave-actors-out folds of ``actors``, with the out-of-fold logits."""
    groups = [tuple(actors[i::4]) for i in range(4)]  # interleaved: each inner fold mixes male and female actors
    scores, logits, indices = [], [], []
    outer_held = tuple(a for a in range(1, 21) if a not in actors)
    for group in groups:
        train_idx = pool.training_indices(group + outer_held)
        held = pool.held_indices(group)
        model = train_model(pool, train_idx, recipe, seed, cache)
        fold_logits = head_logits(model, pool, held)
        scores.append(accuracy(fold_logits, pool.labels[held]))
        logits.append(fold_logits)
        indices.append(held)
    return float(np.mean(scores)), torch.cat(logits), np.concatenate(indices)


def run_fold(pool: StatePool, fold: int, grid: dict[str, HeadRecipe], args: argparse.Namespace) -> dict[str, Any]:
    """Nested selection, then the fold's model trained on its 16 actors + TESS and scored on its 4."""
    held_actors = ravdess_fold_actors(fold, 5)
    actors = [a for a in range(1, 21) if a not in held_actors]
    start = time.perf_counter()
    cache: dict = {}
    inner = {name: inner_cv(pool, actors, recipe, args.seed, cache) for name, recipe in grid.items()}
    for name, (score, _, _) in inner.items():
        print(f"fold {fold} inner CV {name}: {score:.3f}", flush=True)
    best = max(inner, key=lambda name: inner[name][0])
    _, oof_logits, oof_idx = inner[best]
    temperature = fit_temperature(oof_logits, pool.labels[oof_idx])
    model = train_model(pool, pool.training_indices(held_actors), grid[best], args.seed)
    model.head.temperature.fill_(temperature)
    held = pool.held_indices(held_actors)
    logits = head_logits(model, pool, held)
    report = classification_report(pool.labels[held].numpy(), logits.argmax(1).numpy())
    seconds = time.perf_counter() - start
    version = f"audio-whisper-{date.today():%Y%m%d}-{weights_digest(model)}"
    metadata = {
        "version": version,
        "recipe": "training/whisper_head.py",
        "head_recipe": {"name": best, **dataclasses.asdict(grid[best])},
        "inner_cv_accuracy": {name: round(score, 4) for name, (score, _, _) in inner.items()},
        "selection_split": f"inner leave-actors-out CV over actors {actors} (4 folds); "
        "the temperature on its out-of-fold logits",
        "fold": fold,
        "train_actors": actors,
        "data": "RAVDESS (calm as neutral) + TESS (both speakers)",
        "ravdess_calm_as": "neutral",
        "temperature": round(temperature, 4),
        "command": "python -m training.whisper_head " + " ".join(args.argv),
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "train_seconds": round(seconds),
        "held_out_accuracy": round(report["accuracy"], 4),
        "held_out_macro_f1": round(report["macro_f1"], 4),
    }
    model.config = dataclasses.replace(model.config, pretrained=True)
    save_model(model, Path(args.out) / f"fold{fold}", metadata)
    print(
        f"fold {fold}: recipe {best}, held-out actors {held_actors} accuracy {report['accuracy']:.3f} "
        f"macro-F1 {report['macro_f1']:.3f} ({seconds:.0f} s)",
        flush=True,
    )
    return metadata


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="models/weights/audio_folds", help="one fold<k> folder per fold")
    p.add_argument("--folds", default="0,1,2,3,4", help="comma-separated outer folds to run")
    p.add_argument("--grid", default=",".join(DEFAULT_GRID), help=f"recipes compared by inner CV, of {sorted(GRID)}")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than 1 is slower for this small head)")
    p.add_argument("--resume", action="store_true", help="skip folds whose model is already written")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    torch.set_num_threads(args.threads)
    grid = {name: GRID[name] for name in args.grid.split(",")}
    versions = tuple(sorted({v for r in grid.values() for v in r.versions}))
    pool = StatePool(args.data_root, versions)
    summary = {}
    for fold in (int(f) for f in args.folds.split(",")):
        if args.resume and (Path(args.out) / f"fold{fold}" / "config.json").is_file():
            summary[fold] = json.loads((Path(args.out) / f"fold{fold}" / "config.json").read_text())["metadata"]
            continue
        summary[fold] = run_fold(pool, fold, grid, args)
    accs = [m["held_out_accuracy"] for m in summary.values()]
    print(f"held-out accuracy per fold {accs}: mean {np.mean(accs):.3f} ± {np.std(accs):.3f}", flush=True)


if __name__ == "__main__":
    main()
