"""How much the text encoder's context expert should weigh, chosen on the training holdout.

``python -m training.context_weight`` reads the utterance model (``models/weights/text``) and its context expert
(``.../context``) on the 5 % holdout of both training sets that picked their epochs (MELD lines, with their
dialogue's turns for the expert, and without them as a control), combines the two calibrated predictions with
:func:`models.text.model.with_context` for a few expert weights, and writes the MELD weighted-F1 of each to
``reports/text_context_weight.json``. The served encoder uses the default weight, 0.5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.metrics import f1_score

from models.checkpoint import DEFAULT_WEIGHTS_DIR
from models.text.model import CONTEXT_EXPERT, with_context
from training.embeddings import encode_split

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR / "text"))
    p.add_argument("--split", default="holdout:0.05")
    p.add_argument("--out", default="reports/text_context_weight.json")
    args = p.parse_args(argv)
    text, expert = Path(args.weights), Path(args.weights) / CONTEXT_EXPERT
    alone = encode_split("text", args.split, text, args.data_root)
    meld = alone["source"] == "meld"
    labels = alone["labels"][meld]
    rows = {}
    for name, context in (("with_turns", True), ("control_without_turns", False)):
        other = encode_split("text", args.split, expert, args.data_root, context=context)
        a, b = (torch.from_numpy(d["probs"][meld]) for d in (alone, other))
        rows[name] = {
            str(w): float(f1_score(labels, with_context(a, b, w).argmax(1).numpy(), average="weighted"))
            for w in WEIGHTS
        }
    result = {"split": args.split, "n_meld": int(meld.sum()), "meld_weighted_f1": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
