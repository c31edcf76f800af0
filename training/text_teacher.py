"""The text teacher: all-mpnet-base-v2 fine-tuned on MELD + GoEmotions, within reach of a CPU.

``python -m training.text_teacher`` runs three resumable steps, each skipped when its output exists:

1. ``cache``: the frozen bottom ``12 - top_layers`` layers of mpnet run once over every training and
   validation text; their hidden states (bfloat16, about 1.5 GB) go to ``--cache`` (outside git).
2. ``train``: the top layers, mean pooling and a linear head learn from those states, the loss the
   student uses (soft targets, class weights ``share ** -0.3``). The epoch is selected on the student's
   holdout (5 % of each class of both training sets, seed 0), scored by the mean of MELD weighted-F1 and
   GoEmotions macro-F1 so that neither domain pays for the other. A checkpoint is written every epoch.
3. ``targets``: the selected teacher's logits on every training text (``soft_targets.safetensors``,
   read by ``--soft-targets`` of ``python -m training.train``) and its figures on MELD dev and
   GoEmotions val in ``reports/text_teacher.json``.

Fetch the teacher first with ``python -m training.fetch_teacher``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.labels import NUM_CLASSES
from training.datasets import read_text_corpora, split_holdout
from training.fetch_teacher import teacher_dir
from training.tasks import length_bucketed, text_selection

MAX_LENGTH = 128
SPLITS = ("train", "val")


def texts_digest(texts: list[str]) -> str:
    """sha256 of the texts in order: soft targets are only read against the same list."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def load_backbone(path: Path) -> tuple[Any, nn.Module]:
    """The teacher's tokenizer and ``AutoModel``, from its unpacked folder (offline)."""
    from transformers import AutoModel, AutoTokenizer

    if not (path / "config.json").exists():
        raise SystemExit(f"no teacher in {path}: run python -m training.fetch_teacher")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def bidirectional_mask(config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """The attention mask the backbone's layers expect for padding ``mask`` [B, T]."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def run_layers(encoder: nn.Module, layers: nn.ModuleList, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
    """``layers`` of mpnet's ``encoder`` on ``hidden``, with the relative position bias they share."""
    position_bias = encoder.compute_position_bias(hidden)
    for layer in layers:
        hidden = layer(hidden, mask, position_bias)[0]
    return hidden


@torch.inference_mode()
def cache_split(tokenizer: Any, model: nn.Module, texts: list[str], frozen: int, batch: int = 64) -> dict:
    """Hidden states after the first ``frozen`` layers, every text's tokens concatenated (bfloat16)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    states: list[torch.Tensor | None] = [None] * len(texts)
    start = time.time()
    for n, k in enumerate(range(0, len(order), batch)):
        idx = order[k : k + batch]
        tok = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model.embeddings(input_ids=tok["input_ids"])
            mask = bidirectional_mask(model.config, emb, tok["attention_mask"])
            hidden = run_layers(model.encoder, model.encoder.layer[:frozen], emb, mask)
        lengths = tok["attention_mask"].sum(1).tolist()
        for j, i in enumerate(idx):
            states[i] = hidden[j, : lengths[j]].to(torch.bfloat16).clone()
        if n % 50 == 0:
            print(f"  cached {k + len(idx)}/{len(texts)} texts ({time.time() - start:.0f} s)", flush=True)
    lengths = torch.tensor([s.shape[0] for s in states])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return {"hidden": torch.cat(states), "offsets": offsets}


class TeacherTop(nn.Module):
    """The backbone's top layers, attention-masked mean pooling and a linear 7-class head."""

    def __init__(self, model: nn.Module, frozen: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = model.config
        self.encoder = copy.deepcopy(model.encoder)
        self.encoder.layer = self.encoder.layer[frozen:]
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.config.hidden_size, NUM_CLASSES))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, 7] for cached states ``hidden`` [B, T, H] with padding ``mask`` [B, T]."""
        out = run_layers(self.encoder, self.encoder.layer, hidden, bidirectional_mask(self.config, hidden, mask))
        m = mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * m).sum(1) / m.sum(1).clamp_min(1.0))


class CachedStates:
    """Random access to one split's cached hidden states, padded into batches."""

    def __init__(self, path: Path) -> None:
        data = load_file(str(path))
        self.hidden, self.offsets = data["hidden"], data["offsets"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.hidden[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        width = max(r.shape[0] for r in rows)
        hidden = torch.zeros(len(rows), width, self.hidden.shape[1], dtype=torch.bfloat16)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            hidden[j, : r.shape[0]] = r
            mask[j, : r.shape[0]] = 1
        return hidden, mask


def length_batches(idx: list[int], states: CachedStates, size: int, rng: random.Random | None) -> list[list[int]]:
    """Batches of texts of similar length: for training (``rng``) in random order, as
    :func:`training.tasks.length_bucketed` builds them over 50-batch windows; else simply sorted by length."""
    lengths = [states.length(i) for i in range(len(states))]
    if rng is None:
        order = sorted(idx, key=lengths.__getitem__)
        return [order[k : k + size] for k in range(0, len(order), size)]
    order = idx[:]
    rng.shuffle(order)
    return length_bucketed(order, lengths, size, 50, rng)


@torch.inference_mode()
def predict(top: TeacherTop, states: CachedStates, idx: list[int], batch: int = 128) -> torch.Tensor:
    """Logits of ``idx`` (in that order), float32."""
    top.eval()
    out = torch.zeros(len(idx), NUM_CLASSES)
    where = {i: j for j, i in enumerate(idx)}
    for b in length_batches(idx, states, batch, None):
        hidden, mask = states.batch(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = top(hidden, mask).float()
        out[[where[i] for i in b]] = logits
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--teacher", default=None, help="unpacked all-mpnet-base-v2 (default: fetch_teacher's cache)")
    p.add_argument("--cache", default=".cache/text_teacher", help="cached states, checkpoints and soft targets")
    p.add_argument("--top-layers", type=int, default=4, help="top layers fine-tuned; the rest are cached")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="head")
    p.add_argument("--backbone-lr", type=float, default=4e-5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--class-weight-power", type=float, default=0.3)
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--report", default="reports/text_teacher.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = Path(args.teacher) if args.teacher else teacher_dir()
    tokenizer, model = load_backbone(path)
    frozen = model.config.num_hidden_layers - args.top_layers
    items = {split: read_text_corpora(args.data_root, split) for split in SPLITS}

    # 1. cache the frozen layers' states
    for split in SPLITS:
        out = cache / f"{split}-frozen{frozen}.safetensors"
        if not out.exists():
            print(f"caching {split}: {len(items[split])} texts through {frozen} frozen layers", flush=True)
            save_file(cache_split(tokenizer, model, [t for t, _, _ in items[split]], frozen), str(out))
    states = {split: CachedStates(cache / f"{split}-frozen{frozen}.safetensors") for split in SPLITS}

    # 2. train the top layers, selecting on the holdout
    train_items = items["train"]
    kept, held = split_holdout([(i, labels[0]) for i, (_, labels, _) in enumerate(train_items)], args.holdout)
    train_idx, held_idx = [i for i, _ in kept], [i for i, _ in held]
    targets = torch.zeros(len(train_items), NUM_CLASSES)
    for i, (_, labels, _) in enumerate(train_items):
        targets[i, list(labels)] = 1.0 / len(labels)
    share = targets[train_idx].sum(0) / len(train_idx)
    weights = share.clamp_min(1e-4) ** -args.class_weight_power
    weights = weights / (weights * share).sum()
    sources = np.array([s for _, _, s in train_items])
    held_labels = np.array([train_items[i][1][0] for i in held_idx])

    top = TeacherTop(model, frozen)
    del model
    backbone = [p for n, p in top.named_parameters() if n.startswith("encoder.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": args.backbone_lr}, {"params": top.head.parameters(), "lr": args.lr}],
        weight_decay=0.01,
    )
    steps = args.epochs * math.ceil(len(train_idx) / args.batch_size)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
    log_path = cache / f"train-top{args.top_layers}.json"
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.exists() else {"epochs": []}
    start_epoch = len(log["epochs"])
    if start_epoch:
        last = load_file(str(cache / f"top{args.top_layers}-epoch{start_epoch}.safetensors"))
        top.load_state_dict(last)
        optimizer_state = cache / f"top{args.top_layers}-optimizer.pt"
        optimizer.load_state_dict(torch.load(optimizer_state, weights_only=True))
        for _ in range(start_epoch * math.ceil(len(train_idx) / args.batch_size)):
            scheduler.step()
        print(f"resumed after epoch {start_epoch}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        rng = random.Random(args.seed * 1000 + epoch)
        torch.manual_seed(args.seed * 1000 + epoch)
        top.train()
        began, total = time.time(), 0.0
        batches = length_batches(train_idx, states["train"], args.batch_size, rng)
        for n, b in enumerate(batches):
            hidden, mask = states["train"].batch(b)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = top(hidden, mask).float()
            loss = loss_fn(logits, targets[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(top.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item()
            if n % 200 == 0:
                print(
                    f"  epoch {epoch + 1} batch {n}/{len(batches)} loss {total / (n + 1):.4f} "
                    f"({time.time() - began:.0f} s)",
                    flush=True,
                )
        preds = predict(top, states["train"], held_idx).argmax(1).numpy()
        score, by_source = text_selection(held_labels, preds, sources[held_idx])
        log["epochs"].append(
            {
                "epoch": epoch + 1,
                "loss": total / len(batches),
                "seconds": time.time() - began,
                "holdout_score": score,
                "holdout_meld_weighted_f1": by_source["meld"]["weighted_f1"],
                "holdout_goemotions_macro_f1": by_source["goemotions"]["macro_f1"],
            }
        )
        print(json.dumps(log["epochs"][-1]), flush=True)
        save_file(
            {k: v.contiguous() for k, v in top.state_dict().items()},
            str(cache / f"top{args.top_layers}-epoch{epoch + 1}.safetensors"),
        )
        torch.save(optimizer.state_dict(), cache / f"top{args.top_layers}-optimizer.pt")
        log_path.write_text(json.dumps(log, indent=1))

    # 3. the selected epoch's soft targets and figures
    best = max(log["epochs"], key=lambda e: e["holdout_score"])
    top.load_state_dict(load_file(str(cache / f"top{args.top_layers}-epoch{best['epoch']}.safetensors")))
    all_idx = list(range(len(train_items)))
    logits = predict(top, states["train"], all_idx)
    texts = [t for t, _, _ in train_items]
    save_file(
        {"logits": logits},
        str(cache / "soft_targets.safetensors"),
        metadata={"texts_sha256": texts_digest(texts), "epoch": str(best["epoch"])},
    )
    val_items = items["val"]  # as training.evaluate reports them: MELD dev, GoEmotions val's single-label comments
    val_idx = [i for i, (_, labels, source) in enumerate(val_items) if source == "meld" or len(labels) == 1]
    val_logits = predict(top, states["val"], val_idx)
    val_sources = np.array([val_items[i][2] for i in val_idx])
    val_labels = np.array([val_items[i][1][0] for i in val_idx])
    _, val = text_selection(val_labels, val_logits.argmax(1).numpy(), val_sources)
    report = {
        "model_version": f"text-teacher-mpnet-top{args.top_layers}-e{best['epoch']}",
        "model": f"all-mpnet-base-v2, top {args.top_layers} of 12 layers fine-tuned on cached states, linear head",
        "data": "MELD train + GoEmotions train",
        "selection_split": f"holdout: {args.holdout:g} of each class of MELD + GoEmotions train (seed 0), "
        "mean of MELD weighted-F1 and GoEmotions macro-F1",
        "selected_epoch": best["epoch"],
        "epochs": log["epochs"],
        "sets": {"meld_dev": val["meld"], "goemotions_val": val["goemotions"]},
        "command": "python -m training.fetch_teacher && python -m training.text_teacher",
    }
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"teacher (epoch {best['epoch']}): MELD dev weighted-F1 {val['meld']['weighted_f1']:.4f}, "
        f"GoEmotions val macro-F1 {val['goemotions']['macro_f1']:.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
