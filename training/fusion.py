"""Fusion training and evaluation on label-matched combinations of data the encoders never trained on.

No naturally paired text + speech + face set exists, so a combination is built by picking a class, then one
text, one speech clip and one face of that class. Every item comes from data its encoder did not train on
(so its embedding and confidence look like those of a real request), and the fusion's own training and
reporting use disjoint sides of those pools:

| modality | pool (its encoder never trained on it) | fusion trains on | reported on |
|---|---|---|---|
| text | MELD dev + as many single-label GoEmotions val comments | a stratified half | the other half |
| audio | leave-actors-out: each clip through the fold model that held its actor out | actors 01-16 | actors 17-20 (a) |
| video | FER2013 PublicTest | a stratified half | the other half |

(a) through the shipped encoder, which is fold 4.

The shipped fusion is the one trained on the "fusion trains on" side (a fifth of it kept apart to fit the
per-subset temperatures), so the reported figures are those of the shipped weights on combinations that
neither they nor the encoders saw. Without the audio fold models (or with the seed layout) the audio
pool is the shipped encoder's validation split, halved like the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import read_config, save_model, weights_digest
from models.fusion.model import PROB_FLOOR, FusionModel, FusionModelConfig
from models.labels import MODALITIES, NUM_CLASSES
from training.calibration import fit_temperature
from training.embeddings import encode_split
from training.metrics import classification_report, expected_calibration_error

SUBSETS: list[tuple[str, ...]] = [s for r in range(1, 4) for s in itertools.combinations(MODALITIES, r)]
AUDIO_FOLDS = 5
REPORT_COMBINATIONS = 20000  # the fused-minus-product gap is a point or less: 3000 draws left ±0.5 pt of draw noise
MIN_POOL = 100  # below this many items in a pool, train_fusion skips cross-validation (smoke tests)


@dataclass
class Pool:
    """One modality's encoder outputs on data it never trained on."""

    embedding: np.ndarray  # (N, 256)
    log_probs: np.ndarray  # (N, 7), calibrated
    labels: np.ndarray  # (N,)
    groups: np.ndarray | None = None  # (N,) speaker group (audio's leave-actors-out fold), kept apart in CV

    def take(self, idx: np.ndarray) -> Pool:
        groups = None if self.groups is None else self.groups[idx]
        return Pool(self.embedding[idx], self.log_probs[idx], self.labels[idx], groups)

    @staticmethod
    def concat(pools: list[Pool]) -> Pool:
        fields = ["embedding", "log_probs", "labels"]
        if all(p.groups is not None for p in pools):
            fields.append("groups")
        return Pool(*(np.concatenate([getattr(p, f) for p in pools]) for f in fields))


def _pool(data: dict[str, np.ndarray], idx: np.ndarray | None = None) -> Pool:
    log_probs = np.log(np.clip(data["probs"], PROB_FLOOR, 1.0)).astype(np.float32)
    pool = Pool(data["embedding"].astype(np.float32), log_probs, data["labels"])
    return pool if idx is None else pool.take(idx)


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two halves with the same class mix (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    first = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        first.extend(members[: len(members) // 2].tolist())
    mask = np.zeros(len(labels), dtype=bool)
    mask[first] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def load_pools(
    weights_dir: str | Path, data_root: str | Path, layout: str = "shared", audio_folds: str | Path | None = None
) -> dict[str, dict[str, Pool]]:
    """``{"fit": {modality: Pool}, "report": {modality: Pool}}``, as the table in the module docstring says."""
    weights_dir = Path(weights_dir)
    fit, report = {}, {}
    for m in MODALITIES:
        data = encode_split(m, "val", weights_dir / m, data_root, layout)
        keep = np.arange(len(data["labels"]))
        if m == "text" and "source" in data:  # MELD dev + as many single-label GoEmotions comments
            meld = np.flatnonzero(data["source"] == "meld")
            single = np.flatnonzero((data["source"] == "goemotions") & ~data["multi_label"])
            keep = np.sort(np.concatenate([meld, np.random.default_rng(7).choice(single, len(meld), replace=False)]))
        folds = Path(audio_folds) if audio_folds else None
        if m == "audio" and layout == "shared" and folds and (folds / f"fold{AUDIO_FOLDS - 1}").is_dir():
            fold_pools = []
            for k in range(AUDIO_FOLDS - 1):
                pool = _pool(encode_split(m, f"fold:{k}", folds / f"fold{k}", data_root, layout))
                fold_pools.append(dataclasses.replace(pool, groups=np.full(len(pool.labels), k)))
            fit[m] = Pool.concat(fold_pools)
            report[m] = _pool(data)  # actors 17-20 through the shipped encoder
            continue
        first, second = stratified_halves(data["labels"][keep], seed=11)
        fit[m], report[m] = _pool(data, keep[first]), _pool(data, keep[second])
    return {"fit": fit, "report": report}


def make_combinations(
    labels: dict[str, np.ndarray], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` label-matched combinations, classes drawn uniformly: ``(labels, {modality: pool indices})``."""
    by_class = {m: [np.flatnonzero(y == c) for c in range(NUM_CLASSES)] for m, y in labels.items()}
    classes = [c for c in range(NUM_CLASSES) if all(len(by_class[m][c]) for m in labels)]
    if not classes:
        raise ValueError("no class is present in every modality's pool")
    ys = rng.choice(classes, size=n)
    idx = {m: np.array([rng.choice(by_class[m][c]) for c in ys]) for m in labels}
    return ys, idx


def stack(pools: dict[str, Pool], idx: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``(B, 3, 256)`` and log-probabilities ``(B, 3, 7)`` in ``MODALITIES`` order."""
    emb = np.stack([pools[m].embedding[idx[m]] for m in MODALITIES], axis=1)
    lp = np.stack([pools[m].log_probs[idx[m]] for m in MODALITIES], axis=1)
    return torch.from_numpy(emb), torch.from_numpy(lp)


def subset_mask(subset: tuple[str, ...], n: int) -> torch.Tensor:
    return torch.tensor([m in subset for m in MODALITIES]).expand(n, -1)


@torch.no_grad()
def fused_probabilities(
    model: FusionModel, emb: torch.Tensor, lp: torch.Tensor, present: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated fused probabilities and contributions, as the service computes them."""
    model.eval()
    logits, contrib = model(emb, lp, present)
    return model.probabilities(logits, present).numpy(), contrib.numpy()


def served_answer(model: FusionModel, emb: torch.Tensor, lp: torch.Tensor, present: torch.Tensor) -> np.ndarray:
    """The class the service answers: one modality gives its encoder's own answer, more go through fusion."""
    fused, _ = fused_probabilities(model, emb, lp, present)
    single = present.sum(1) == 1
    own = (lp * present[..., None]).sum(1).argmax(1).numpy()
    return np.where(single.numpy(), own, fused.argmax(1))


def evaluate_combinations(
    model: FusionModel, pools: dict[str, Pool], n: int = REPORT_COMBINATIONS, seed: int = 1234
) -> dict[str, Any]:
    """Per subset: the fused answer next to the product and the mean of probabilities and each encoder alone.

    Also, for subsets of two or more: how often the fused answer overrules two modalities that agree, and the
    contribution check (removing the modality with the largest contribution changes the served answer more
    often than removing the one with the smallest).
    """
    ys, idx = make_combinations({m: p.labels for m, p in pools.items()}, n, np.random.default_rng(seed))
    emb, lp = stack(pools, idx)
    out: dict[str, Any] = {"n": n, "subsets": {}}
    for subset in SUBSETS:
        present = subset_mask(subset, n)
        probs, contrib = fused_probabilities(model, emb, lp, present)
        fused = served_answer(model, emb, lp, present)
        cols = [MODALITIES.index(m) for m in subset]
        own = lp[:, cols].argmax(-1).numpy()  # (n, k) each encoder's own answer
        product = lp[:, cols].sum(1).argmax(1).numpy()
        row: dict[str, Any] = {
            "fused": classification_report(ys, fused),
            "product": classification_report(ys, product),
            "mean": classification_report(ys, lp[:, cols].exp().mean(1).argmax(1).numpy()),
            "single": {m: classification_report(ys, own[:, j]) for j, m in enumerate(subset)},
            "mean_contributions": {m: round(float(contrib[:, MODALITIES.index(m)].mean()), 4) for m in subset},
        }
        if len(subset) > 1:
            row["fused"]["ece"] = expected_calibration_error(probs, ys)
        if len(subset) == 3:
            agree = [(a, b) for a, b in itertools.combinations(range(3), 2)]
            pair_class = np.full(n, -1)
            for a, b in agree:
                same = (own[:, a] == own[:, b]) & (pair_class < 0)
                pair_class[same] = own[same, a]
            has_pair = pair_class >= 0
            row["agreeing_pairs"] = int(has_pair.sum())
            row["overrule_rate"] = float((fused[has_pair] != pair_class[has_pair]).mean()) if has_pair.any() else 0.0
            overruled = has_pair & (product != pair_class)  # the product's own overrules, for comparison
            row["product_overrule_rate"] = float(overruled.sum() / max(has_pair.sum(), 1))
            row["product_overrules_right"] = (
                float((product[overruled] == ys[overruled]).mean()) if overruled.any() else 0.0
            )
        if len(subset) > 1:
            row["contribution_check"] = _contribution_check(model, emb, lp, present, contrib, fused, cols)
        out["subsets"]["+".join(subset)] = row
    return out


def _contribution_check(
    model: FusionModel,
    emb: torch.Tensor,
    lp: torch.Tensor,
    present: torch.Tensor,
    contrib: np.ndarray,
    fused: np.ndarray,
    cols: list[int],
) -> dict[str, Any]:
    """How often the served answer changes when the largest / smallest contributor is removed."""
    sub = contrib[:, cols]
    rows = np.arange(len(fused))
    changed = {}
    for name, pick in (("largest", sub.argmax(1)), ("smallest", sub.argmin(1))):
        without = present.clone()
        without[torch.from_numpy(rows), torch.from_numpy(np.array(cols)[pick])] = False
        changed[name] = float((served_answer(model, emb, lp, without) != fused).mean())
    return {
        "changed_removing_largest": changed["largest"],
        "changed_removing_smallest": changed["smallest"],
        "holds": changed["largest"] > changed["smallest"],
    }


@dataclass(frozen=True)
class Recipe:
    """One way to train the fusion; :func:`train_fusion` picks among :data:`RECIPES` by cross-validation."""

    name: str
    steps: int
    embedding_dropout: float = 0.5
    trainable: str = "all"  # "all", or "scales": only the per-modality trust scales and the class bias
    agreement_bonus: float = 1.0  # FusionModelConfig.agreement_bonus: one vote for each encoder's own answer
    class_mixing: bool = False  # FusionModelConfig.class_mixing: learn each encoder's class confusions too
    weight_decay: float | None = None  # AdamW weight decay for this recipe (None: the command line's)


def _votes(bonus: float) -> str:
    return f"{bonus:g} agreement votes"


# The overrule bound (MAX_OVERRULE) binds: more agreement votes hold it more surely and cost some accuracy, so each
# family runs over a grid of votes wide enough that cross-validation finds where the bound is met.
RECIPES = (
    Recipe("product of experts (no training)", 0, agreement_bonus=0.0),
    *(Recipe(f"product of experts + {_votes(b)} (no training)", 0, agreement_bonus=b) for b in (0.5, 0.75, 1.0)),
    *(
        Recipe(f"trust scales and class bias + {_votes(b)}", 300, trainable="scales", agreement_bonus=b)
        for b in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    ),
    *(
        Recipe(
            f"trust scales, class bias and class mixing + {_votes(b)}",
            300,
            trainable="scales",
            agreement_bonus=b,
            class_mixing=True,
            weight_decay=10.0,  # pulls the 147 mixing weights towards the plain product unless the data insists
        )
        for b in (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    ),
    Recipe("attention over evidence tokens", 300, embedding_dropout=1.0),
    Recipe("attention over embedding + evidence tokens", 300, embedding_dropout=0.5),
)
# trust scales and class bias, no votes: for smoke-test sized pools
TINY_RECIPE = next(r for r in RECIPES if r.trainable == "scales" and not r.class_mixing and r.agreement_bonus == 0.0)


def fit_model(recipe: Recipe, pools: dict[str, Pool], args: argparse.Namespace, seed: int) -> FusionModel:
    """Train a fresh fusion module on label-matched combinations of ``pools`` with ``recipe``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = FusionModel(
        FusionModelConfig(
            embedding_dropout=recipe.embedding_dropout,
            agreement_bonus=recipe.agreement_bonus,
            class_mixing=recipe.class_mixing,
        )
    )
    if recipe.steps == 0:
        return model.eval()
    scales = {"log_scale", "class_bias", "class_mixing"}
    params = [p for n, p in model.named_parameters() if recipe.trainable == "all" or n in scales]
    weight_decay = args.weight_decay if recipe.weight_decay is None else recipe.weight_decay
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=recipe.steps, pct_start=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    labels = {m: p.labels for m, p in pools.items()}
    for _ in range(recipe.steps):
        model.train()
        ys, idx = make_combinations(labels, args.batch_size, rng)
        emb, lp = stack(pools, idx)
        present = torch.stack([subset_mask(SUBSETS[k], 1)[0] for k in rng.integers(0, len(SUBSETS), args.batch_size)])
        logits, _ = model(emb, lp, present)
        loss = loss_fn(logits, torch.from_numpy(ys))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


MAX_OVERRULE = 0.05  # the fused answer may overrule two agreeing modalities in at most this share of answers
CV_COMBINATIONS = 4000  # per held-out fold


def cv_scores(model: FusionModel, pools: dict[str, Pool], seed: int) -> dict[str, Any]:
    """On held-out combinations: the mean served accuracy over the subsets of two or more modalities, the
    three-modality overrule rate and the number of answers it was counted on, and per subset of two or more the
    fused and the plain product's accuracy (with the product's own three-modality overrule rate)."""
    subsets = evaluate_combinations(model, pools, n=CV_COMBINATIONS, seed=seed)["subsets"]
    multi = {name: r for name, r in subsets.items() if "+" in name}
    full = subsets["+".join(MODALITIES)]
    return {
        "accuracy": float(np.mean([r["fused"]["accuracy"] for r in multi.values()])),
        "overrule_rate": float(full["overrule_rate"]),
        "agreeing_pairs": int(full["agreeing_pairs"]),
        "product_overrule_rate": float(full["product_overrule_rate"]),
        "fused": {name: float(r["fused"]["accuracy"]) for name, r in multi.items()},
        "product": {name: float(r["product"]["accuracy"]) for name, r in multi.items()},
    }


def cv_halves(pool: Pool, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The two cross-validation halves of a pool: by speaker group where it has them (the first half of its
    groups against the rest, so the held-out half's voices, and the fold models that encoded them, are new to
    the fusion as on the report side), else stratified by class."""
    if pool.groups is not None and len(np.unique(pool.groups)) > 1:
        groups = np.unique(pool.groups)
        first = np.isin(pool.groups, groups[: len(groups) // 2])
        return np.flatnonzero(first), np.flatnonzero(~first)
    return stratified_halves(pool.labels, seed=seed)


def select_recipe(
    pools: dict[str, Pool], args: argparse.Namespace
) -> tuple[Recipe, dict[str, dict[str, float]], list[str]]:
    """Two-fold cross-validation of every recipe on the fusion's training side (halves from :func:`cv_halves`).

    The most accurate recipe whose cross-validated overrule rate stays under :data:`MAX_OVERRULE` by one
    standard error (so that the bound holds on new data, not only on these folds) wins; the most accurate
    of all if none does. Then, per subset of two or more modalities, the plain product replaces the winner
    where it cross-validated at least as accurate (on three modalities only if its own overrule rate is under
    the bound by one standard error too): those subsets are returned as the third value.
    """
    halves = {m: cv_halves(p) for m, p in pools.items()}
    scores, folds_of = {}, {}
    for recipe in RECIPES:
        folds = []
        for k in range(2):
            train = {m: p.take(halves[m][k]) for m, p in pools.items()}
            held = {m: p.take(halves[m][1 - k]) for m, p in pools.items()}
            folds.append(cv_scores(fit_model(recipe, train, args, args.seed + k), held, seed=args.seed + 4 + k))
        folds_of[recipe.name] = folds
        accuracy = float(np.mean([f["accuracy"] for f in folds]))
        overrule = float(np.mean([f["overrule_rate"] for f in folds]))
        stderr = _stderr(overrule, sum(f["agreeing_pairs"] for f in folds))
        scores[recipe.name] = {
            "accuracy": round(accuracy, 4),
            "overrule_rate": round(overrule, 4),
            "overrule_stderr": round(stderr, 4),
        }
        print(
            f"fusion recipe '{recipe.name}': cross-validated accuracy {accuracy:.4f}, "
            f"overrule rate {overrule:.4f} ± {stderr:.4f}",
            flush=True,
        )
    eligible = [
        r for r in RECIPES if sum(scores[r.name][k] for k in ("overrule_rate", "overrule_stderr")) < MAX_OVERRULE
    ]
    eligible = eligible or list(RECIPES)
    best = max(eligible, key=lambda r: scores[r.name]["accuracy"])
    folds = folds_of[best.name]
    plain = []
    for name in folds[0]["fused"]:
        fused = float(np.mean([f["fused"][name] for f in folds]))
        product = float(np.mean([f["product"][name] for f in folds]))
        if name.count("+") == len(MODALITIES) - 1:
            overrule = float(np.mean([f["product_overrule_rate"] for f in folds]))
            if overrule + _stderr(overrule, sum(f["agreeing_pairs"] for f in folds)) >= MAX_OVERRULE:
                continue  # the product overrules two agreeing encoders too often to stand in here
        if product >= fused:
            plain.append(name)
        print(f"fusion subset {name}: cross-validated fused {fused:.4f}, product {product:.4f}", flush=True)
    return best, scores, plain


def _stderr(rate: float, n: int) -> float:
    return float(np.sqrt(rate * (1 - rate) / max(n, 1)))


def train_fusion(args: argparse.Namespace) -> dict[str, Any]:
    """Pick a recipe by cross-validation on the fit side, train it there, write it to ``args.out``; report it."""
    start = time.time()
    pools = load_pools(args.weights_dir, args.data_root, args.layout, getattr(args, "audio_folds", None))
    fit, calibrate = {}, {}
    tiny = min(len(p.labels) for p in pools["fit"].values()) < MIN_POOL
    for m, pool in pools["fit"].items():  # a fifth of the fit side is kept for the temperatures
        order = np.random.default_rng(5).permutation(len(pool.labels))
        cut = 0 if tiny else len(order) // 5
        calibrate[m], fit[m] = pool.take(np.sort(order[:cut] if cut else order)), pool.take(np.sort(order[cut:]))
    if tiny:  # a smoke-test sized set: no cross-validation, no separate calibration slice
        recipe, scores, plain = TINY_RECIPE, {}, []
    else:
        recipe, scores, plain = select_recipe(fit, args)
    if args.steps != RECIPES[-1].steps:  # --steps overrides the chosen recipe's length
        recipe = dataclasses.replace(recipe, steps=args.steps if recipe.steps else 0)
    model = fit_model(recipe, fit, args, args.seed)
    for name in plain:
        model.plain_product[model.subset_index(subset_mask(tuple(name.split("+")), 1))] = True
    temperatures = fit_subset_temperatures(model, calibrate)
    result = evaluate_combinations(model, pools["report"])
    full = result["subsets"]["+".join(MODALITIES)]
    metadata = {
        "version": f"fusion-{time.strftime('%Y%m%d')}-{weights_digest(model)}",
        "command": args.command,
        "data": "label-matched combinations of data the encoders never trained on; see training/fusion.py",
        **({"recipe": str(args.recipe)} if getattr(args, "recipe", None) else {}),
        "fusion_recipe": dataclasses.asdict(recipe),
        "recipe_cross_validation": scores,
        "plain_product_subsets": plain,
        "encoders": {
            m: str(read_config(Path(args.weights_dir) / m)["metadata"].get("version", "unversioned"))
            for m in MODALITIES
        },
        "train_seconds": round(time.time() - start, 1),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
        "temperatures": temperatures,
        "report_fused_all_accuracy": round(full["fused"]["accuracy"], 4),
        "report_product_all_accuracy": round(full["product"]["accuracy"], 4),
    }
    save_model(model, args.out, metadata)
    print(
        f"fusion ({recipe.name}): all three {full['fused']['accuracy']:.4f} "
        f"(product {full['product']['accuracy']:.4f}, "
        f"best single {max(r['accuracy'] for r in full['single'].values()):.4f})"
    )
    return result


def fit_subset_temperatures(model: FusionModel, pools: dict[str, Pool], n: int = 2000) -> dict[str, float]:
    """Fit one temperature per modality subset on held-apart combinations; store them in the model."""
    ys, idx = make_combinations({m: p.labels for m, p in pools.items()}, n, np.random.default_rng(99))
    emb, lp = stack(pools, idx)
    fitted = {}
    for subset in SUBSETS:
        present = subset_mask(subset, n)
        with torch.no_grad():
            logits, _ = model(emb, lp, present)
        t = fit_temperature(logits, torch.from_numpy(ys))
        model.temperature[model.subset_index(present[:1])] = t
        fitted["+".join(subset)] = round(t, 4)
    return fitted
