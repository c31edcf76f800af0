"""Leave-actors-out cross-validation of the speech encoder over RAVDESS actors 01-20.

``python -m training.crossval --out models/weights/audio_folds [--only 4,0] -- <training.train options>``
trains one model per fold (fold ``k`` of 5 validates on actors ``4k+1 .. 4k+4`` and trains on the other 16),
each resumable under ``runs/audio_cv/fold<k>``, and writes it to ``<out>/fold<k>``. Fold 4 validates on
actors 17-20, the split the model card reports. ``python -m training.evaluate`` scores every fold on its
own held-out actors and reports the mean and spread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.train import main as train_main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/weights/audio_folds", help="folder that gets one fold<k> model per fold")
    p.add_argument("--run-dir", default="runs/audio_cv", help="resumable training state, one fold<k> folder per fold")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated folds to train (default: all)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="options passed to training.train (after --)")
    args = p.parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]
    folds = [int(f) for f in args.only.split(",") if f] or list(range(args.folds))
    for fold in folds:
        out = Path(args.out) / f"fold{fold}"
        print(f"== fold {fold} of {args.folds} -> {out}", flush=True)
        train_main(
            [
                "--modality",
                "audio",
                "--fold",
                str(fold),
                "--folds",
                str(args.folds),
                "--resume",
                "--run-dir",
                str(Path(args.run_dir) / f"fold{fold}"),
                "--out",
                str(out),
                *extra,
            ]
        )


if __name__ == "__main__":
    main()
