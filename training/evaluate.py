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
from models.text.model import CONTEXT_EXPERT, with_context
from training.audio_augment import DEGRADATIONS
from training.embeddings import encode_split
from training.fusion import evaluate_combinations, load_pools
from training.metrics import classification_report, expected_calibration_error

DATASETS = {
    "text": "MELD dev (1,109 utterances) and GoEmotions val (single-label comments)",
    "audio": "RAVDESS speech, actors 17-20 (speaker-independent, calm dropped)",
    "video": "FER2013 PublicTest (3,589 faces, each a 1-frame video)",
    "fusion": "label-matched combinations of data neither the encoders nor the fusion trained on (training/fusion.py)",
}
TARGETS = {  # (report row, metric, goal)
    "text": [
        ("meld_dev", "weighted_f1", 0.60),
        ("meld_dev_context", "weighted_f1", 0.60),
        ("goemotions_val", "macro_f1", 0.56),
    ],
    "audio": [("actors_17_20", "accuracy", 0.72)],
    "video": [("publictest", "accuracy", 0.66)],
}
AUDIO_LOAO_GOAL, AUDIO_DEGRADED_MAX_DROP = 0.78, 0.08
CONTROL = "meld_dev_expert_without_context"  # both text models without the turns: a control, never served
CONTEXT_GAIN_GOAL = 0.02  # MELD dev weighted-F1: the same text model with the previous turns, over without (issue 44)
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
            ax.text(
                j, i, int(m[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black"
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scored(labels: np.ndarray, logits: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Classification report plus calibration error before and after the temperature."""
    report = classification_report(labels, logits.argmax(1))
    raw = torch.softmax(torch.from_numpy(logits), -1).numpy()
    report["ece_uncalibrated"] = expected_calibration_error(raw, labels)
    report["ece_calibrated"] = expected_calibration_error(probs, labels)
    return report


def _meta(weights: Path) -> dict[str, Any]:
    meta = read_config(weights)["metadata"]
    return {
        "model_version": meta.get("version"),
        "temperature": meta.get("temperature"),
        "train_seconds": meta.get("train_seconds"),
        "hardware": meta.get("hardware"),
        "command": meta.get("command"),
        "selection_split": meta.get("selection_split", "val"),
    }


def evaluate_encoder(modality: str, args: argparse.Namespace) -> dict[str, Any]:
    """Validation report of one encoder: ``{"sets": {name: report}, ...}`` (several sets for text and audio)."""
    weights = Path(args.weights_dir) / modality
    data = encode_split(modality, args.split, weights, args.data_root, args.layout)
    sets: dict[str, Any] = {}
    if modality == "text" and "source" in data:
        for name, mask in (
            ("meld_dev", data["source"] == "meld"),
            ("goemotions_val", (data["source"] == "goemotions") & ~data["multi_label"]),
        ):
            sets[name] = _scored(data["labels"][mask], data["logits"][mask], data["probs"][mask])
        expert = weights / CONTEXT_EXPERT
        if expert.is_dir():  # the same lines read with their dialogue's turns: both experts, as served
            mask = data["source"] == "meld"
            for name, context in (("meld_dev_context", True), (CONTROL, False)):
                ctx = encode_split(modality, args.split, expert, args.data_root, args.layout, context=context)
                if not np.array_equal(ctx["labels"], data["labels"]):
                    raise SystemExit(f"{expert}: its split is not the utterance model's")
                probs = with_context(torch.from_numpy(data["probs"][mask]), torch.from_numpy(ctx["probs"][mask]))
                sets[name] = _scored(data["labels"][mask], probs.log().numpy(), probs.numpy())
            order = ("meld_dev", "meld_dev_context", "goemotions_val", CONTROL)
            sets = {k: sets[k] for k in order}
        elif read_config(weights)["config"].get("context"):  # the same lines, read with their dialogue's turns
            ctx = encode_split(modality, args.split, weights, args.data_root, args.layout, context=True)
            mask = ctx["source"] == "meld"
            sets["meld_dev_context"] = _scored(ctx["labels"][mask], ctx["logits"][mask], ctx["probs"][mask])
            sets = {k: sets[k] for k in ("meld_dev", "meld_dev_context", "goemotions_val")}
    else:
        name = (
            {"audio": "actors_17_20", "video": "publictest"}.get(modality, "val") if args.split == "val" else args.split
        )
        sets[name] = _scored(data["labels"], data["logits"], data["probs"])
    report: dict[str, Any] = {"dataset": DATASETS[modality], "split": args.split, "sets": sets, **_meta(weights)}
    if modality == "audio" and args.split == "val" and args.layout == "shared":
        report.update(audio_robustness(args, sets["actors_17_20"]["accuracy"]))
    return report


def audio_robustness(args: argparse.Namespace, clean_accuracy: float) -> dict[str, Any]:
    """Leave-actors-out folds over actors 01-20 and the degraded validation set (``training.degrade``)."""
    out: dict[str, Any] = {}
    folds_dir = Path(args.audio_folds)
    folds = sorted(folds_dir.glob("fold*"), key=lambda p: int(p.name[4:])) if folds_dir.is_dir() else []
    if folds:
        rows = {}
        for folder in folds:
            data = encode_split("audio", f"fold:{folder.name[4:]}", folder, args.data_root, args.layout)
            r = classification_report(data["labels"], data["logits"].argmax(1))
            actors = read_config(folder)["metadata"].get("fold")
            rows[folder.name] = {"fold": actors, "n": r["n"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
        acc = np.array([r["accuracy"] for r in rows.values()])
        f1 = np.array([r["macro_f1"] for r in rows.values()])
        out["leave_actors_out"] = {
            "folds": rows,
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "macro_f1_mean": float(f1.mean()),
            "macro_f1_std": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
            "models": str(folds_dir),
        }
    degraded = {}
    for cond in DEGRADATIONS:
        data = encode_split("audio", f"degraded:{cond}", Path(args.weights_dir) / "audio", args.data_root, args.layout)
        r = classification_report(data["labels"], data["logits"].argmax(1))
        degraded[cond] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
    mean = float(np.mean([d["accuracy"] for d in degraded.values()]))
    out["degraded"] = {"conditions": degraded, "accuracy_mean": mean, "drop_from_clean": clean_accuracy - mean}
    return out


def evaluate_fusion(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped fusion on the report side of the pools (see :mod:`training.fusion`)."""
    model, config = load_model(Path(args.weights_dir) / "fusion")
    pools = load_pools(args.weights_dir, args.data_root, args.layout, args.audio_folds)
    result = evaluate_combinations(model, pools["report"])
    meta = config["metadata"]
    full = result["subsets"]["+".join(MODALITIES)]
    result.update(
        dataset=DATASETS["fusion"],
        model_version=meta.get("version"),
        temperatures=meta.get("temperatures"),
        train_seconds=meta.get("train_seconds"),
        hardware=meta.get("hardware"),
        command=meta.get("command"),
        confusion_matrix=full["fused"]["confusion_matrix"],
        checks=fusion_checks(result),
    )
    return result


def fusion_checks(result: dict[str, Any]) -> dict[str, bool]:
    """The fusion's acceptance checks on the reported combinations."""
    checks = {}
    for name, row in result["subsets"].items():
        best = max(r["accuracy"] for r in row["single"].values())
        checks[f"{name}: fused >= best single"] = row["fused"]["accuracy"] >= best
        if "+" in name:  # every subset of two or more modalities
            checks[f"{name}: fused >= product"] = row["fused"]["accuracy"] >= row["product"]["accuracy"]
            checks[f"{name}: fused >= best single + 0.05"] = row["fused"]["accuracy"] >= best + 0.05
        if "contribution_check" in row:
            checks[f"{name}: removing the largest contributor changes more answers"] = row["contribution_check"][
                "holds"
            ]
    full = result["subsets"]["text+audio+video"]
    checks["text+audio+video: overrule rate < 5 %"] = full["overrule_rate"] < 0.05
    return checks


def _fitted_on(report: dict[str, Any]) -> str:
    """Where an encoder's temperature (and kept epoch) was chosen, for the card."""
    split = report.get("selection_split", "val")
    if split.startswith("RAVDESS actors"):
        return "fitted on the held-out actors it is reported on"
    return "fitted on the validation split" if split == "val" else "fitted on a training holdout"


def _cell(value: float, goal: float | None = None) -> str:
    """Three decimals, or four where rounding to three would put a figure on the wrong side of its target."""
    text = f"{value:.3f}"
    if goal is not None and (float(text) >= goal) != (value >= goal):
        text = f"{value:.4f}"
    return text


def text_comparison(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Rows putting the text teacher (``reports/text_teacher.json``) beside the served text model."""
    teacher, served = reports.get("text_teacher"), reports.get("text")
    if not teacher or not served or "meld_dev" not in served["sets"]:
        return []
    rows = [
        "",
        "Text teacher (`python -m training.text_teacher`), selected on the served model's holdout:",
        "",
        "| text model | version | MELD dev weighted-F1 | GoEmotions val macro-F1 |",
        "|---|---|---|---|",
    ]
    for name, r in (("all-mpnet-base-v2, top 4 layers tuned (not served)", teacher), ("MiniLM-L6 (served)", served)):
        meld, goemotions = r["sets"]["meld_dev"]["weighted_f1"], r["sets"]["goemotions_val"]["macro_f1"]
        rows.append(f"| {name} | `{r.get('model_version', '')}` | {meld:.3f} | {goemotions:.3f} |")
    return rows


def card_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of the validation metrics, generated from the report files."""
    rows = [
        "| model | data | n | accuracy | macro-F1 | weighted-F1 | target | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "meld_dev": "MELD dev",
        "meld_dev_context": "MELD dev, with the previous turns as context",
        CONTROL: "MELD dev, both models without turns",
        "goemotions_val": "GoEmotions val, single-label comments",
        "actors_17_20": "RAVDESS actors 17-20",
        "publictest": "FER2013 PublicTest",
    }
    for m in MODALITIES:
        r = reports.get(m)
        if r is None:
            continue
        for set_name, key, goal in TARGETS[m]:
            s = r["sets"].get(set_name)
            if s is None:
                continue
            cells = {k: _cell(s[k], goal if k == key else None) for k in ("accuracy", "macro_f1", "weighted_f1")}
            rows.append(
                f"| {m} | {names[set_name]} | {s['n']} | {cells['accuracy']} | {cells['macro_f1']} | "
                f"{cells['weighted_f1']} | {key.replace('_', '-')} >= {goal} | {'yes' if s[key] >= goal else 'no'} |"
            )
        if m == "text" and "meld_dev_context" in r["sets"]:
            gain = r["sets"]["meld_dev_context"]["weighted_f1"] - r["sets"]["meld_dev"]["weighted_f1"]
            rows.append(
                f"| text | MELD dev: with context minus without (the same model) | | | | {gain:+.3f} | "
                f"weighted-f1 gain >= {CONTEXT_GAIN_GOAL} | {'yes' if gain >= CONTEXT_GAIN_GOAL else 'no'} |"
            )
            control = r["sets"].get(CONTROL)
            if control:  # how much of the gain a second model brings without any turns (never served)
                rows.append(
                    f"| text | MELD dev, control: the context expert also without turns | {control['n']} | "
                    f"{control['accuracy']:.3f} | {control['macro_f1']:.3f} | {control['weighted_f1']:.3f} | | |"
                )
        if m == "audio" and "leave_actors_out" in r:
            loao = r["leave_actors_out"]
            rows.append(
                f"| audio | leave-actors-out, {len(loao['folds'])} folds of 4 actors over 01-20 (mean ± sd) | "
                f"{sum(f['n'] for f in loao['folds'].values())} "
                f"| {loao['accuracy_mean']:.3f} ± {loao['accuracy_std']:.3f} | "
                f"{loao['macro_f1_mean']:.3f} ± {loao['macro_f1_std']:.3f} | | accuracy mean >= {AUDIO_LOAO_GOAL} | "
                f"{'yes' if loao['accuracy_mean'] >= AUDIO_LOAO_GOAL else 'no'} |"
            )
        if m == "audio" and "degraded" in r:
            deg = r["degraded"]
            conds = ", ".join(f"{c} {v['accuracy']:.3f}" for c, v in deg["conditions"].items())
            rows.append(
                f"| audio | degraded actors 17-20 ({conds}) | | {deg['accuracy_mean']:.3f} | | | "
                f"at most {AUDIO_DEGRADED_MAX_DROP:.2f} below clean (drop {deg['drop_from_clean']:.3f}) | "
                f"{'yes' if deg['drop_from_clean'] <= AUDIO_DEGRADED_MAX_DROP else 'no'} |"
            )
    rows += text_comparison(reports)
    f = reports.get("fusion")
    if f:
        intro = (
            f"Fusion, {f['subsets']['text']['fused']['n']} {f['dataset']}: accuracy of the served answer "
            "(macro-F1 in brackets) next to the product and the mean of the encoders' probabilities and each "
            "encoder alone, on the same combinations:"
        )
        rows += [
            "",
            intro,
            "",
            (
                "| modalities | fused | product | mean | best single | overrule rate | contributions "
                "| answer changes removing largest / smallest contributor |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in f["subsets"].items():
            best_name, best = max(r["single"].items(), key=lambda kv: kv[1]["accuracy"])
            contrib = ", ".join(f"{k} {v:.2f}" for k, v in r["mean_contributions"].items())
            overrule = f"{r['overrule_rate']:.3f} of {r['agreeing_pairs']}" if "overrule_rate" in r else ""
            check = r.get("contribution_check")
            change = (
                f"{check['changed_removing_largest']:.3f} / {check['changed_removing_smallest']:.3f}" if check else ""
            )
            rows.append(
                f"| {name} | {r['fused']['accuracy']:.3f} ({r['fused']['macro_f1']:.3f}) "
                f"| {r['product']['accuracy']:.3f} | {r['mean']['accuracy']:.3f} "
                f"| {best['accuracy']:.3f} ({best_name}) | {overrule} | {contrib} | {change} |"
            )
        full = f["subsets"]["+".join(MODALITIES)]
        if "product_overrule_rate" in full:
            rows += [
                "",
                (
                    f"With all three, the product of probabilities overrules two agreeing encoders in "
                    f"{full['product_overrule_rate']:.3f} of those answers and is right in "
                    f"{full['product_overrules_right']:.3f} of its overrules."
                ),
            ]
        failed = [k for k, ok in f["checks"].items() if not ok]
        rows += [
            "",
            f"Fusion checks: {len(f['checks']) - len(failed)} of {len(f['checks'])} hold"
            + (f"; failing: {'; '.join(failed)}." if failed else "."),
        ]
    calib = [
        f"{m} {names.get(set_name, set_name)} {s['ece_uncalibrated']:.3f} -> {s['ece_calibrated']:.3f} "
        f"(T={reports[m]['temperature']}, {_fitted_on(reports[m])})"
        for m in MODALITIES
        if m in reports
        for set_name, s in reports[m]["sets"].items()
        if set_name != CONTROL
    ]
    if calib:
        rows += ["", "Expected calibration error before -> after temperature scaling: " + "; ".join(calib) + "."]
    return "\n".join(rows)


def update_card(table: str) -> None:
    text = CARD.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{CARD} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    CARD.write_text(
        f"{head}{START}\n<!-- generated by `python -m training.evaluate`; do not edit by hand -->\n{table}\n{END}{tail}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--layout", choices=["shared", "seed"], default="shared")
    p.add_argument("--weights-dir", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--reports", default="reports")
    p.add_argument("--modality", choices=[*MODALITIES, "fusion", "all"], default="all")
    p.add_argument(
        "--audio-folds",
        default=str(DEFAULT_WEIGHTS_DIR / "audio_folds"),
        help="the leave-actors-out audio fold models of training.crossval",
    )
    p.add_argument("--no-card", action="store_true", help="do not rewrite the model card table")
    p.add_argument(
        "--split",
        default="val",
        help="encoders only: 'val' (default, the reported split) or 'holdout:F', the slice of the training "
        "split that --holdout F selected on, for deciding inference options without touching val",
    )
    args = p.parse_args(argv)
    if args.split != "val" and (args.modality in ("fusion", "all") or not args.no_card):
        p.error("--split other than val needs one encoder --modality and --no-card (the card reports val only)")
    out = Path(args.reports)
    out.mkdir(parents=True, exist_ok=True)
    todo = [*MODALITIES, "fusion"] if args.modality == "all" else [args.modality]
    for m in todo:
        report = evaluate_fusion(args) if m == "fusion" else evaluate_encoder(m, args)
        (out / f"{m}.json").write_text(json.dumps(report, indent=2) + "\n")
        for name, r in report.get("sets", {"": {"confusion_matrix": report.get("confusion_matrix")}}).items():
            if name == CONTROL:
                continue
            suffix = f"_{name}" if name and len(report.get("sets", {})) > 1 else ""
            plot_confusion(r["confusion_matrix"], f"{m}: {name or DATASETS[m]}", out / f"{m}{suffix}_confusion.png")
        print(
            f"{m}: "
            + json.dumps({k: round(v["accuracy"], 4) for k, v in report.get("sets", {}).items()})
            + f" -> {out / f'{m}.json'}"
        )
    if not args.no_card:
        reports = {
            m: json.loads((out / f"{m}.json").read_text())
            for m in [*MODALITIES, "fusion"]
            if (out / f"{m}.json").is_file()
        }
        if (out / "text_teacher.json").is_file():
            reports["text_teacher"] = json.loads((out / "text_teacher.json").read_text())
        update_card(card_table(reports))


if __name__ == "__main__":
    main()
