"""Interpolate two text models' weights, picking the mix on the training holdout (not on MELD dev / GoEmotions val).

``python -m training.interpolate --base runs/text_ctx/init_text-20261201-e2 --tuned runs/text_ctx/weights
--out runs/text_ctx/mixed``

The tuned model was fine-tuned from the base (same stored tensors: the head and the fine-tuned top layers), so a
weight average ``(1 - a) * base + a * tuned`` is a model between the two (WiSE-FT, Wortsman et al., CVPR 2022): it
keeps more of what the base did well, here reading a line alone, and some of what the tuned one learned, here
reading it with its context. For each ``a`` of ``--mixes`` the holdout that training selected on
(``--holdout``, seed 0) is read with and without MELD's context. The kept mix is the largest ``a`` whose
score without context (mean of MELD weighted-F1 and GoEmotions macro-F1, as training scores) is at least the
base's; none: the best such score. Its temperature is fitted on the holdout read with context, as training does.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_model, save_model, stored_state, weights_digest
from training.calibration import fit_temperature
from training.embeddings import encode_split
from training.metrics import classification_report


def mix(base: Path, tuned: Path, share: float) -> torch.nn.Module:
    """The tuned model (its config) with every stored tensor ``(1 - share) * base + share * tuned``."""
    model, _ = load_model(tuned)
    old, _ = load_model(base)
    new_state, old_state = stored_state(model), stored_state(old)
    mixed = {k: (1 - share) * old_state[k].float() + share * v.float() for k, v in new_state.items()}
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in mixed.items()}, strict=False)
    model.head.temperature.fill_(1.0)
    return model


def holdout_scores(weights: Path, data_root: str, holdout: float) -> dict[str, Any]:
    """MELD weighted-F1 (with and without context) and GoEmotions macro-F1 on the training holdout."""
    out: dict[str, Any] = {}
    for context in (False, True):
        data = encode_split("text", f"holdout:{holdout:g}", weights, data_root, context=context)
        meld = data["source"] == "meld"
        key = "meld_context" if context else "meld"
        out[key] = classification_report(data["labels"][meld], data["logits"][meld].argmax(1))["weighted_f1"]
        if context:
            out["logits"], out["labels"] = data["logits"], data["labels"]
        else:
            goemotions = data["source"] == "goemotions"
            report = classification_report(data["labels"][goemotions], data["logits"][goemotions].argmax(1))
            out["goemotions"] = report["macro_f1"]
    out["score"] = (out["meld"] + out["goemotions"]) / 2
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the model the tuned one started from")
    p.add_argument("--tuned", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mixes", default="1.0,0.75,0.5", help="shares of the tuned model to try, largest first")
    p.add_argument("--holdout", type=float, default=0.05, help="the --holdout training selected on")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    base, tuned = Path(args.base), Path(args.tuned)
    reference = holdout_scores(base, args.data_root, args.holdout)
    print(f"base: holdout score without context {reference['score']:.4f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in sorted((float(s) for s in args.mixes.split(",")), reverse=True):
            folder = Path(tmp) / f"mix{share:g}"
            save_model(mix(base, tuned, share), folder, {"version": f"mix{share:g}"})
            scores = holdout_scores(folder, args.data_root, args.holdout)
            rows.append((share, scores))
            print(
                f"mix {share:g}: MELD wF1 {scores['meld']:.4f} (with context {scores['meld_context']:.4f}), "
                f"GoEmotions macro-F1 {scores['goemotions']:.4f}, score {scores['score']:.4f}",
                flush=True,
            )
    fine = [(s, r) for s, r in rows if r["score"] >= reference["score"]]
    share, chosen = fine[0] if fine else max(rows, key=lambda sr: sr[1]["score"])
    model = mix(base, tuned, share)
    temperature = fit_temperature(torch.from_numpy(chosen["logits"]), torch.from_numpy(chosen["labels"]))
    model.head.temperature.fill_(temperature)
    meta = json.loads((tuned / "config.json").read_text())["metadata"]
    meta.update(
        version=f"text-{time.strftime('%Y%m%d')}-mix{share:g}-{weights_digest(model)}",
        temperature=round(temperature, 4),
        interpolated={
            "command": "python -m training.interpolate " + shlex.join(sys.argv[1:] if argv is None else argv),
            "base": str(base),
            "base_version": json.loads((base / "config.json").read_text())["metadata"].get("version"),
            "tuned_version": meta.get("version"),
            "share_of_tuned": share,
            "holdout_rows": {
                f"{s:g}": {k: round(v, 4) for k, v in r.items() if k in ("meld", "meld_context", "goemotions", "score")}
                for s, r in rows
            },
            "base_holdout_score": round(reference["score"], 4),
            "seconds": round(time.time() - start, 1),
        },
    )
    save_model(model, args.out, meta, half=True)
    print(f"kept mix {share:g} (T={temperature:.4f}) -> {args.out}")


if __name__ == "__main__":
    main()
