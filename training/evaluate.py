"""Evaluate the committed weights on the validation splits.

``python -m training.evaluate --data-root ../shared/data`` writes ``reports/<modality>.json``
(accuracy, macro-F1, weighted-F1, per-class F1, confusion matrix, calibration error), a
confusion-matrix PNG per modality, and regenerates the metrics table in ``models/MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from models.checkpoint import DEFAULT_WEIGHTS_DIR, load_model, read_config
from models.labels import EMOTIONS, MODALITIES
from training.embeddings import encode_split
from training.fusion import evaluate_triplets, make_triplets
from training.metrics import classification_report, expected_calibration_error

DATASETS = {
    "text": "MELD dev (1,109 utterances)",
    "audio": "RAVDESS speech, actors 17-20 (speaker-independent, 240 clips)",
    "video": "FER2013 PublicTest (3,589 faces, each a 1-frame video)",
    "fusion": "3,000 label-matched validation triplets (MELD dev x RAVDESS 17-20 x FER2013 PublicTest)",
}
TARGETS = {
    "text": ("weighted_f1", 0.58),
    "audio": ("accuracy", 0.60),
    "video": ("accuracy", 0.66),
}
CARD = Path(__file__).resolve().parents[1] / "models" / "MODEL_CARD.md"
START, END = "<!-- metrics:start -->", "<!-- metrics:end -->"


def plot_confusion(matrix: list[list[int]], title: str, path: Path) -> None:
    """Row-normalised confusion matrix with counts."""
    m = np.array(matrix, dtype=float)
    norm = m / m.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(EMOTIONS)):
        for j in range(len(EMOTIONS)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_encoder(modality: str, args: argparse.Namespace) -> dict[str, Any]:
    """Validation report of one encoder."""
    weights = Path(args.weights_dir) / modality
    data = encode_split(modality, args.split, weights, args.data_root, args.layout)
    report = classification_report(data["labels"], data["logits"].argmax(1))
    raw = torch.softmax(torch.from_numpy(data["logits"]), -1).numpy()
    report["ece_uncalibrated"] = expected_calibration_error(raw, data["labels"])
    report["ece_calibrated"] = expected_calibration_error(data["probs"], data["labels"])
    meta = read_config(weights)["metadata"]
    dataset = DATASETS[modality] if args.split == "val" else f"{args.split} of the {modality} training split"
    report.update(dataset=dataset, split=args.split, model_version=meta.get("version"), temperature=meta.get("temperature"),
                  train_seconds=meta.get("train_seconds"), hardware=meta.get("hardware"), command=meta.get("command"),
                  selection_split=meta.get("selection_split", "val"))
    return report


def evaluate_fusion(args: argparse.Namespace) -> dict[str, Any]:
    """Fusion on fixed label-matched validation triplets versus each single encoder."""
    model, config = load_model(Path(args.weights_dir) / "fusion")
    val = {m: encode_split(m, "val", Path(args.weights_dir) / m, args.data_root, args.layout) for m in MODALITIES}
    ys, idx = make_triplets({m: val[m]["labels"] for m in MODALITIES}, 3000, np.random.default_rng(1234))
    result = evaluate_triplets(model, val, ys, idx)
    full = result["fused"]["+".join(MODALITIES)]
    meta = config["metadata"]
    result.update(dataset=DATASETS["fusion"], model_version=meta.get("version"), temperature=meta.get("temperature"),
                  train_seconds=meta.get("train_seconds"), hardware=meta.get("hardware"), command=meta.get("command"),
                  confusion_matrix=full["confusion_matrix"])
    return result


def _fitted_on(report: dict[str, Any]) -> str:
    """Where an encoder's temperature (and kept epoch) was chosen, for the card."""
    split = report.get("selection_split", "val")
    return "fitted on the validation split" if split == "val" else "fitted on a holdout of the training split"


def _cell(value: float, goal: float | None = None) -> str:
    """Three decimals, or four where rounding to three would put a figure on the wrong side of its target."""
    text = f"{value:.3f}"
    if goal is not None and (float(text) >= goal) != (value >= goal):
        text = f"{value:.4f}"
    return text


def card_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the validation metrics, generated from the report files."""
    rows = ["| model | validation data | accuracy | macro-F1 | weighted-F1 | target | met? |", "|---|---|---|---|---|---|---|"]
    for m in ("text", "audio", "video"):
        r = reports.get(m)
        if r is None:
            continue
        key, goal = TARGETS[m]
        cells = {k: _cell(r[k], goal if k == key else None) for k in ("accuracy", "macro_f1", "weighted_f1")}
        rows.append(f"| {m} | {r['dataset']} | {cells['accuracy']} | {cells['macro_f1']} | {cells['weighted_f1']} "
                    f"| {key.replace('_', '-')} >= {goal} | {'yes' if r[key] >= goal else 'no'} |")
    f = reports.get("fusion")
    if f:
        full = f["fused"]["+".join(MODALITIES)]
        met = f["fused_all_accuracy"] > f["best_single_accuracy"]
        rows.append(f"| fusion (text+audio+video) | {f['dataset']} | {full['accuracy']:.3f} | {full['macro_f1']:.3f} "
                    f"| {full['weighted_f1']:.3f} | beat best single encoder on the same triplets "
                    f"({f['best_single_accuracy']:.3f}) | {'yes' if met else 'no'} |")
        rows += ["", "Fusion accuracy by modality subset on the same triplets:", "",
                 "| modalities | accuracy | macro-F1 | mean contributions |", "|---|---|---|---|"]
        for name, r in f["fused"].items():
            contrib = ", ".join(f"{k} {v:.2f}" for k, v in r["mean_contributions"].items())
            rows.append(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {contrib} |")
    calib = [f"{m} {reports[m]['ece_uncalibrated']:.3f} -> {reports[m]['ece_calibrated']:.3f} "
             f"(T={reports[m]['temperature']}, {_fitted_on(reports[m])})"
             for m in ("text", "audio", "video") if m in reports]
    if calib:
        rows += ["", "Expected calibration error before -> after temperature scaling; a temperature fitted on the "
                 "validation split it is measured on makes the 'after' figure optimistic: " + "; ".join(calib) + "."]
    return "\n".join(rows)


def update_card(table: str) -> None:
    text = CARD.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{CARD} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    CARD.write_text(f"{head}{START}\n<!-- generated by `python -m training.evaluate`; do not edit by hand -->\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--layout", choices=["shared", "seed"], default="shared")
    p.add_argument("--weights-dir", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--reports", default="reports")
    p.add_argument("--modality", choices=[*MODALITIES, "fusion", "all"], default="all")
    p.add_argument("--no-card", action="store_true", help="do not rewrite the model card table")
    p.add_argument("--split", default="val",
                   help="encoders only: 'val' (default, the reported split) or 'holdout:F', the slice of the training "
                        "split that --holdout F selected on, for deciding inference options without touching val")
    args = p.parse_args(argv)
    if args.split != "val" and (args.modality in ("fusion", "all") or not args.no_card):
        p.error("--split other than val needs one encoder --modality and --no-card (the card reports val only)")
    out = Path(args.reports)
    out.mkdir(parents=True, exist_ok=True)
    todo = [*MODALITIES, "fusion"] if args.modality == "all" else [args.modality]
    for m in todo:
        report = evaluate_fusion(args) if m == "fusion" else evaluate_encoder(m, args)
        (out / f"{m}.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_confusion(report["confusion_matrix"], f"{m}: {DATASETS[m]}", out / f"{m}_confusion.png")
        acc = report.get("fused_all_accuracy", report.get("accuracy"))
        print(f"{m}: accuracy {acc:.4f} -> {out / f'{m}.json'}")
    if not args.no_card:
        reports = {m: json.loads((out / f"{m}.json").read_text()) for m in [*MODALITIES, "fusion"] if (out / f"{m}.json").is_file()}
        update_card(card_table(reports))


if __name__ == "__main__":
    main()
