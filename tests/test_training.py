"""Dataset readers, and an end-to-end CPU training run (with resume) on a tiny seed-layout set."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_model, weights_digest
from models.labels import EMOTIONS, MODALITIES, NUM_CLASSES
from tests.synth import SHARED_DATA, image_png, tone_wav
from training import train
from training.datasets import ravdess_label, read_meld, read_ravdess, read_seed_layout
from training.state import load_state


def test_ravdess_file_names_map_to_classes() -> None:
    assert EMOTIONS[ravdess_label("03-01-05-02-01-01-17.flac")] == "angry"
    assert EMOTIONS[ravdess_label("03-01-02-01-01-01-17.flac")] == "neutral"  # calm -> neutral
    assert ravdess_label("03-01-02-01-01-01-17.flac", calm_as=None) is None
    assert EMOTIONS[ravdess_label("03-01-08-01-01-01-17.flac")] == "surprise"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real datasets) is not present")
def test_shared_readers_keep_splits_apart() -> None:
    train_actors = {Path(p).stem[-2:] for p, _ in read_ravdess(SHARED_DATA, "train")}
    val_actors = {Path(p).stem[-2:] for p, _ in read_ravdess(SHARED_DATA, "val")}
    assert train_actors.isdisjoint(val_actors) and val_actors == {"17", "18", "19", "20"}
    dev = read_meld(SHARED_DATA, "val")
    assert len(dev) == 1109 and {y for _, y in dev} == set(range(7))


def _seed_layout(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, emotion in enumerate(EMOTIONS):
            folder = root / split / emotion
            folder.mkdir(parents=True)
            for k in range(2):
                (folder / f"{k}.wav").write_bytes(tone_wav(seconds=0.6, freq=150 + 60 * i + 7 * k))
                (folder / f"{k}.txt").write_text(f"sample {k} feeling {emotion}")
                (folder / f"{k}.png").write_bytes(image_png(rng.integers(0, 255, (48, 48), dtype=np.uint8)))


# A training run on the 14-example seed layout that _seed_layout writes under ./data, on one CPU thread.
SEED_RUN = ["--layout", "seed", "--data-root", "data", "--threads", "1"]


def test_seed_layout_reader(tmp_path: Path) -> None:
    _seed_layout(tmp_path)
    texts = read_seed_layout(tmp_path, "train", "text")
    assert len(texts) == 14 and texts[0] == ("sample 0 feeling angry", 0)
    assert len(read_seed_layout(tmp_path, "val", "audio")) == 14
    assert all(p.endswith(".png") for p, _ in read_seed_layout(tmp_path, "val", "video"))


def test_audio_training_runs_on_cpu_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # feature caches and run state go under the temp dir
    common = [*SEED_RUN, "--modality", "audio", "--out", "weights", "--batch-size", "7", "--patience", "5"]
    train.main([*common, "--epochs", "1"])
    model, config = load_model(tmp_path / "weights")
    assert config["model_type"] == "audio" and config["metadata"]["best_epoch"] == 1
    # the options this run was given, not those of the process that called train.main (crossval, pytest)
    assert config["metadata"]["command"] == "python -m training.train " + shlex.join([*common, "--epochs", "1"])
    assert config["metadata"]["temperature"] > 0
    train.main([*common, "--epochs", "2", "--resume"])
    state = json.loads((tmp_path / "runs" / "audio" / "state.json").read_text())
    assert [h["epoch"] for h in state["info"]["history"]] == [1, 2]
    optimizer = torch.optim.AdamW(model.parameters())
    assert load_state(tmp_path / "runs" / "audio", model, optimizer)["epoch"] == 2
    assert optimizer.state  # the optimizer's moments came back too


def test_fusion_trains_on_label_matched_triplets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.checkpoint import DEFAULT_WEIGHTS_DIR
    from models.inference import FusionPipeline

    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train.main(
        [
            *SEED_RUN,
            "--modality",
            "fusion",
            "--out",
            "fusion",
            "--weights-dir",
            str(DEFAULT_WEIGHTS_DIR),
            "--steps",
            "20",
            "--batch-size",
            "16",
        ]
    )
    meta = json.loads((tmp_path / "fusion" / "config.json").read_text())["metadata"]
    assert meta["fusion_recipe"]["steps"] == 20 and meta["fusion_recipe"]["trainable"] == "scales"  # tiny set: no CV
    assert 0 <= meta["report_fused_all_accuracy"] <= 1
    fusion_model, _ = load_model(tmp_path / "fusion")
    assert meta["version"].endswith("-" + weights_digest(fusion_model))  # two fusions of one day differ by name
    assert set(meta["temperatures"]) == {
        "text",
        "audio",
        "video",
        "text+audio",
        "text+video",
        "audio+video",
        "text+audio+video",
    }
    sure_happy, unsure = np.full(7, 0.01), np.full(7, 1 / 7)
    sure_happy[3] = 0.94
    fused = FusionPipeline(tmp_path / "fusion").fuse(
        {"text": np.ones(256), "video": np.zeros(256)}, {"text": sure_happy, "video": unsure}
    )
    assert set(fused.contributions) == {"text", "video"}
    assert sum(fused.contributions.values()) == pytest.approx(1.0)
    assert fused.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_video_training_with_wider_frame_cnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train.main(
        [
            *SEED_RUN,
            "--modality",
            "video",
            "--out",
            "weights",
            "--epochs",
            "1",
            "--batch-size",
            "7",
            "--bf16",
            "--video-channels",
            "8,16,24",
            "--mirror-average",
        ]
    )
    model, config = load_model(tmp_path / "weights")
    assert tuple(config["config"]["channels"]) == (8, 16, 24)
    assert config["config"]["mirror_average"] is True and model.config.mirror_average  # written by training
    assert model.frame_cnn[2][0].out_channels == 24  # the third conv block was built as asked


@pytest.mark.parametrize("bad", ["8,16", "8,16,x", "8,0,24"])
def test_video_channels_must_be_three_positive_widths(bad: str) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--modality", "video", "--video-channels", bad])
    assert train.parse_args(["--modality", "video"]).video_channels is None  # the model's own default


def test_ema_training_exports_the_average_and_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    common = [*SEED_RUN, "--modality", "audio", "--out", "weights", "--batch-size", "7", "--patience", "5"]
    common += ["--ema", "0.9"]
    train.main([*common, "--epochs", "1"])
    state = tmp_path / "runs" / "audio" / "state.safetensors"
    stored = load_file(str(state))
    assert int(stored["ema.n_averaged"]) == 2  # 14 samples in batches of 7: one update per step
    exported = load_file(str(tmp_path / "weights" / "model.safetensors"))
    name = "embed.1.weight"  # the embedding layer's Linear
    assert torch.allclose(exported[name], stored[f"ema.module.{name}"])  # the average is what ships...
    assert not torch.allclose(exported[name], stored[f"model.{name}"])  # ...not the last raw weights
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    assert config["metadata"]["ema_decay"] == 0.9
    train.main([*common, "--epochs", "2", "--resume"])
    assert int(load_file(str(state))["ema.n_averaged"]) == 4  # the average carried on


def test_init_from_starts_at_saved_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.checkpoint import stored_state

    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    common = [*SEED_RUN, "--modality", "audio", "--batch-size", "7", "--epochs", "1"]
    train.main([*common, "--out", "first"])
    first, _ = load_model(tmp_path / "first")
    # lr 0: the second run cannot move, so it must export exactly the weights it started from
    train.main([*common, "--out", "second", "--run-dir", "runs2", "--init-from", "first", "--lr", "0"])
    second, config = load_model(tmp_path / "second")
    assert config["metadata"]["initialised_from"] == "first"
    a, b = dict(first.named_parameters()), stored_state(second)  # parameters only: BN statistics move with lr 0
    assert all(np.allclose(a[k].detach().numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("bad", ["1", "-0.1", "x"])
def test_ema_decay_must_be_below_one(bad: str) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--modality", "audio", "--ema", bad])


def test_training_device_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.parse_args(["--modality", "audio"]).device == torch.device("cpu")
    assert train.parse_args(["--modality", "audio", "--device", "auto"]).device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.parse_args(["--modality", "audio", "--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err
    model = torch.nn.Linear(2, 2)
    assert train.model_device(model) == torch.device("cpu")


class _FixedLogits(torch.nn.Module):
    """A stand-in teacher that answers the same logits for every input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([logits]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.logits.expand(len(x), -1)


def test_distiller_averages_teachers_and_blends_losses() -> None:
    from training.distill import Distiller

    a, b = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    hard = torch.nn.CrossEntropyLoss()
    distiller = Distiller([_FixedLogits(a), _FixedLogits(b)], hard, weight=1.0, temperature=2.0)
    x, y = torch.zeros(3, 5), torch.tensor([0, 1, 2])
    targets = distiller.soft_targets(x)
    expected = (torch.softmax(torch.tensor(a) / 2, -1) + torch.softmax(torch.tensor(b) / 2, -1)) / 2
    assert torch.allclose(targets, expected.expand(3, -1))
    # a student that already matches the ensemble (at T=2) has zero distillation loss...
    matching = 2.0 * expected.log().expand(3, -1)
    assert distiller(matching, y, targets).item() == pytest.approx(0.0, abs=1e-6)
    # ...and one that copies a single teacher does not
    assert distiller(torch.tensor([a] * 3), y, targets).item() > 0.01
    distiller.weight = 0.0  # weight 0 is plain hard-label training
    logits = torch.randn(3, 7)
    assert distiller(logits, y, targets).item() == pytest.approx(hard(logits, y).item())
    distiller.train()
    assert not any(t.training for t in distiller.teachers)  # teachers keep eval-mode BatchNorm/dropout


def test_video_distillation_keeps_the_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    common = [*SEED_RUN, "--modality", "video", "--batch-size", "7"]
    train.main([*common, "--epochs", "1", "--out", "teacher"])
    train.main(
        [
            *common,
            "--epochs",
            "3",
            "--out",
            "student",
            "--run-dir",
            "runs2",
            "--distill-from",
            "teacher",
            "--distill-weight",
            "0.5",
            "--keep",
            "last",
            "--patience",
            "1",
        ]
    )
    metadata = json.loads((tmp_path / "student" / "config.json").read_text())["metadata"]
    assert metadata["distilled_from"] == ["teacher"] and metadata["distill_weight"] == 0.5
    # --keep last: the final epoch ships whatever its validation score, and patience does not stop the run
    assert metadata["kept"] == "last" and metadata["best_epoch"] == 3 and metadata["epochs_trained"] == 3
    assert "history" not in metadata  # the weights keep headline figures; the run state keeps the epochs


def test_holdout_is_stratified_disjoint_and_stable() -> None:
    from training.datasets import split_holdout

    samples = [(f"{label}-{i}.png", label) for label in range(7) for i in range(20 + 10 * label)]
    train_part, held = split_holdout(samples, 0.1)
    assert set(train_part).isdisjoint(held) and sorted(train_part + held) == sorted(samples)
    per_class = [sum(1 for _, y in held if y == label) for label in range(7)]
    assert per_class == [round(0.1 * (20 + 10 * label)) for label in range(7)]  # 10 % of every class
    assert split_holdout(samples, 0.1) == (train_part, held)  # the same split on a rerun or resume
    with pytest.raises(ValueError):
        split_holdout(samples, 1.0)


def test_holdout_selection_never_reads_the_val_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed_layout(tmp_path / "data")
    for image in (tmp_path / "data" / "val").rglob("*.png"):
        image.write_bytes(b"not an image")  # any read of the val split's faces would now fail
    monkeypatch.chdir(tmp_path)
    train.main(
        [
            *SEED_RUN,
            "--modality",
            "video",
            "--batch-size",
            "7",
            "--epochs",
            "2",
            "--out",
            "weights",
            "--holdout",
            "0.5",
            "--select-on",
            "accuracy",
        ]
    )
    metadata = json.loads((tmp_path / "weights" / "config.json").read_text())["metadata"]
    assert metadata["selected_on"] == "accuracy" and metadata["selection_split"].startswith("holdout: 0.5")
    history = json.loads((tmp_path / "runs" / "video" / "state.json").read_text())["info"]["history"]
    chosen = max(history, key=lambda h: h["accuracy"])  # first best epoch by accuracy
    assert metadata["best_epoch"] == chosen["epoch"]


def _card_report(split: str | None, set_name: str, acc: float = 0.7) -> dict:
    r = {
        "dataset": "d",
        "temperature": 1.5,
        "sets": {
            set_name: {
                "n": 100,
                "accuracy": acc,
                "macro_f1": 0.6,
                "weighted_f1": 0.65,
                "ece_uncalibrated": 0.1,
                "ece_calibrated": 0.05,
            }
        },
    }
    if split is not None:
        r["selection_split"] = split
    return r


def test_card_table_says_where_each_temperature_was_fitted() -> None:
    """The calibration line names the split each temperature came from, so a holdout fit is not called optimistic."""
    from training.evaluate import card_table

    table = card_table(
        {
            "text": _card_report(None, "meld_dev"),
            "audio": _card_report("val", "actors_17_20"),
            "video": _card_report("holdout: 0.05 of each class", "publictest"),
        }
    )
    calib = table.splitlines()[-1]
    assert "text MELD dev 0.100 -> 0.050 (T=1.5, fitted on the validation split)" in calib
    assert "audio RAVDESS actors 17-20 0.100 -> 0.050 (T=1.5, fitted on the validation split)" in calib
    assert "video FER2013 PublicTest 0.100 -> 0.050 (T=1.5, fitted on a training holdout)" in calib
    assert "| video | FER2013 PublicTest | 100 | 0.700 | 0.600 | 0.650 | accuracy >= 0.66 | yes |" in table
    assert "| audio | RAVDESS actors 17-20 | 100 | 0.700 | 0.600 | 0.650 | accuracy >= 0.72 | no |" in table


def test_card_table_does_not_round_a_miss_up_to_the_target() -> None:
    """0.6595 against a 0.66 target is shown as 0.6595 (not 0.660) next to 'no'; other figures keep 3 decimals."""
    from training.evaluate import card_table

    miss = card_table({"video": _card_report(None, "publictest", 0.65953)})
    hit = card_table({"video": _card_report(None, "publictest", 0.6612)})
    assert "| video | FER2013 PublicTest | 100 | 0.6595 | 0.600 | 0.650 | accuracy >= 0.66 | no |" in miss
    assert "| video | FER2013 PublicTest | 100 | 0.661 | 0.600 | 0.650 | accuracy >= 0.66 | yes |" in hit


def test_holdout_split_names_the_selection_slice_and_never_reaches_the_card() -> None:
    """'holdout:F' reads the training split's held-out slice; evaluating on it cannot rewrite the card."""
    from training.embeddings import parse_split
    from training.evaluate import main as evaluate_main

    assert parse_split("val") == ("val", 0.0)
    assert parse_split("holdout:0.05") == ("train", 0.05)
    with pytest.raises(ValueError, match="holdout fraction"):
        parse_split("holdout:1.5")
    for argv in (["--split", "holdout:0.05", "--modality", "video"], ["--split", "holdout:0.05", "--no-card"]):
        with pytest.raises(SystemExit):
            evaluate_main(argv)


def _pools(n: int, accuracy: dict[str, float], seed: int = 0) -> dict:
    """Synthetic encoder outputs: each modality right with probability ``accuracy[m]``, sure when right."""
    from training.fusion import Pool

    rng = np.random.default_rng(seed)
    pools = {}
    for m, acc in accuracy.items():
        labels = rng.integers(0, 7, n)
        right = rng.random(n) < acc
        guess = np.where(right, labels, rng.integers(0, 7, n))
        logits = rng.normal(0, 1, (n, 7))
        logits[np.arange(n), guess] += np.where(right, 4.0, 1.0)
        log_probs = torch.log_softmax(torch.from_numpy(logits).float(), -1).numpy()
        pools[m] = Pool(rng.normal(0, 1, (n, 256)).astype(np.float32), log_probs, labels)
    return pools


def test_fusion_report_compares_the_served_answer_with_the_product_and_each_encoder() -> None:
    """An untrained fusion without agreement votes is the product of experts, so the report must show fused ==
    product on every subset of two or more, single subsets answer with the encoder itself, and the checks are
    computed, not assumed; the agreement votes then cut the overrule rate."""
    from models.fusion import FusionModel, FusionModelConfig
    from training.evaluate import fusion_checks
    from training.fusion import evaluate_combinations

    torch.manual_seed(0)
    pools = _pools(400, {"text": 0.4, "audio": 0.6, "video": 0.7})
    result = evaluate_combinations(FusionModel(FusionModelConfig(agreement_bonus=0.0)).eval(), pools, n=500)
    for name, row in result["subsets"].items():
        if "+" in name:
            assert row["fused"]["accuracy"] == pytest.approx(row["product"]["accuracy"])
        else:
            assert row["fused"]["accuracy"] == pytest.approx(row["single"][name]["accuracy"])
    full = result["subsets"]["text+audio+video"]
    assert full["fused"]["accuracy"] > max(r["accuracy"] for r in full["single"].values())
    assert 0 <= full["overrule_rate"] < 0.2 and full["agreeing_pairs"] > 0
    check = full["contribution_check"]
    assert check["holds"] == (check["changed_removing_largest"] > check["changed_removing_smallest"])
    assert check["holds"]  # the product's most confident expert is the one whose removal matters most
    checks = fusion_checks(result)
    assert checks["text+audio+video: fused >= product"] and "text+audio+video: overrule rate < 5 %" in checks
    voting = evaluate_combinations(FusionModel(FusionModelConfig(agreement_bonus=2.0)).eval(), pools, n=500)
    assert voting["subsets"]["text+audio+video"]["overrule_rate"] < full["overrule_rate"]


def test_fusion_cross_validation_keeps_speaker_groups_apart() -> None:
    """Audio carries its leave-actors-out fold as a group: each CV half holds whole groups (new voices to the
    fusion trained on the other half), through ``take`` and ``concat``; a pool without groups is split by class."""
    import dataclasses

    from training.fusion import Pool, cv_halves

    pools = _pools(400, {"text": 0.4, "audio": 0.6})
    audio = Pool.concat(
        [dataclasses.replace(pools["audio"].take(np.arange(k, 400, 4)), groups=np.full(100, k)) for k in range(4)]
    )
    first, second = cv_halves(audio)
    assert len(first) + len(second) == 400
    assert set(audio.groups[first]) == {0, 1} and set(audio.groups[second]) == {2, 3}
    assert set(audio.take(second).groups) == {2, 3}
    first, second = cv_halves(pools["text"])
    assert pools["text"].groups is None and len(first) + len(second) == 400
    for c in range(7):  # stratified: each class split evenly
        n_first, n_second = (np.sum(pools["text"].labels[h] == c) for h in (first, second))
        assert abs(n_first - n_second) <= 1


def test_class_mixing_recipe_learns_an_encoders_confusion() -> None:
    """Audio that answers class c + 1 whenever the truth is c: the product cannot undo that, the class-mixing
    recipe learns it from the combinations and beats the product on text + audio."""
    import argparse

    from training.fusion import RECIPES, evaluate_combinations, fit_model

    pools = _pools(600, {"text": 0.4, "audio": 0.8, "video": 0.6}, seed=3)
    audio = pools["audio"]
    audio.log_probs = np.roll(audio.log_probs, 1, axis=1)  # every class moves to the next one
    recipe = next(r for r in RECIPES if r.class_mixing)
    args = argparse.Namespace(lr=1e-2, weight_decay=1e-2, label_smoothing=0.0, batch_size=128, seed=0)
    model = fit_model(recipe, pools, args, seed=0)
    assert model.class_mixing is not None
    mixing, classes = model.class_mixing.detach()[MODALITIES.index("audio")], torch.arange(NUM_CLASSES)
    assert bool((mixing[classes, (classes + 1) % NUM_CLASSES] > 0.05).all())  # class c reads audio's column c + 1
    assert bool((mixing[classes, classes] < -0.05).all())  # ... instead of its own
    row = evaluate_combinations(model, pools, n=1000)["subsets"]["text+audio"]
    assert row["fused"]["accuracy"] > row["product"]["accuracy"] + 0.05


def test_speech_degradations_do_what_they_say() -> None:
    """10 dB noise is 10 dB below the speech; the telephone band and 8 kHz path remove what they should."""
    from training.audio_augment import WaveAugment, degrade

    sr, gen = 16000, torch.Generator().manual_seed(0)
    t = torch.arange(sr) / sr
    low, mid, high = (torch.sin(2 * torch.pi * f * t) * 0.3 for f in (100.0, 1000.0, 6000.0))
    noisy = degrade(mid, sr, "noise10db", gen)
    snr = 10 * torch.log10(mid.pow(2).sum() / (noisy - mid).pow(2).sum())
    assert float(snr) == pytest.approx(10.0, abs=0.2)

    def kept(signal: torch.Tensor, condition: str) -> float:
        return float(degrade(signal, sr, condition, gen)[2000:].pow(2).mean() / signal[2000:].pow(2).mean())

    assert kept(mid, "telephone") > 0.7 and kept(low, "telephone") < 0.2 and kept(high, "telephone") < 0.1
    assert kept(mid, "resample8k") > 0.9 and kept(high, "resample8k") < 0.01
    augment = WaveAugment({"speed", "noise", "band", "reverb"}, sr)
    a, b = augment(mid, random.Random(3)), augment(mid, random.Random(3))
    assert torch.equal(a, b) and a.abs().max() <= 1.0  # the run's seeded RNG decides every draw
    with pytest.raises(ValueError, match="unknown augmentation"):
        WaveAugment({"pitch"}, sr)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real datasets) is not present")
def test_leave_actors_out_folds_cover_actors_once_and_fold_4_is_the_report_split() -> None:
    from training.datasets import ravdess_fold_actors

    held = [a for k in range(5) for a in ravdess_fold_actors(k)]
    assert sorted(held) == list(range(1, 21))
    assert ravdess_fold_actors(4) == (17, 18, 19, 20)
    train_part = read_ravdess(SHARED_DATA, "train", None, fold=1)
    val_part = read_ravdess(SHARED_DATA, "val", None, fold=1)
    assert {int(Path(p).stem[-2:]) for p, _ in val_part} == {5, 6, 7, 8}
    assert len(train_part) == 16 * 52 and len(val_part) == 4 * 52  # calm dropped
    assert not {p for p, _ in train_part} & {p for p, _ in val_part}


def _text_corpora(tmp_path: Path) -> None:
    """A tiny MELD (12 lines a split) and GoEmotions (30 comments a split, a third with two labels)."""
    (tmp_path / "meld_text").mkdir()
    (tmp_path / "goemotions_ekman").mkdir()
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n"
    for name in ("train_sent_emo.csv", "dev_sent_emo.csv"):
        rows = "".join(f"{i},line {i},A,{e},neutral,{i},0\n" for i, e in enumerate(["joy", "anger", "neutral"] * 4))
        (tmp_path / "meld_text" / name).write_text(header + rows)
    for name in ("train.csv", "val.csv"):
        rows = "".join(f"comment {i},{labels}\n" for i, labels in enumerate(["happy", "sad surprise", "fear"] * 10))
        (tmp_path / "goemotions_ekman" / name).write_text("text,labels\n" + rows)


def test_text_task_mixes_both_corpora_with_soft_multi_label_targets(tmp_path: Path) -> None:
    from training.tasks import TaskOptions, TextTask

    _text_corpora(tmp_path)
    task = TextTask(TaskOptions(data_root=str(tmp_path), goemotions_per_epoch=6, batch_size=64))
    assert len(task.train) == 12 + 30 and task.epoch_size == 12 + 6
    two = next(i for i, (_, labels, _) in enumerate(task.items) if len(labels) == 2)
    assert task.targets[two].tolist() == pytest.approx([0, 0, 0, 0, 0, 0.5, 0.5])  # sad + surprise
    torch.testing.assert_close(task.targets.sum(1), torch.ones(len(task.train)))
    ((inputs, targets),) = list(task.train_batches(0, random.Random(0)))
    assert targets.shape == (18, 7) and inputs[0].shape[0] == 18
    weights = task.class_weights()
    assert weights[1] > weights[3]  # disgust (absent here) weighs more than the common happy


def test_text_sources_limit_what_is_trained_and_selected_on(tmp_path: Path) -> None:
    from training.tasks import TaskOptions, TextTask

    _text_corpora(tmp_path)
    opts = TaskOptions(data_root=str(tmp_path), text_sources=("goemotions",), holdout=0.2, goemotions_per_epoch=99)
    task = TextTask(opts)
    assert set(task.source) == set(task.val_source) == {"goemotions"}
    assert len(task.train) + len(task.val) == 30 and task.epoch_size == len(task.train)
    assert "of each class of GoEmotions train" in task.selection_split
    assert task.metadata()["data"] == "GoEmotions train"
    parsed = train.parse_args(["--modality", "text", "--text-sources", " goemotions, meld ,goemotions"])
    assert parsed.text_sources == ("goemotions", "meld")


@pytest.mark.parametrize("bad", ["", "reddit", "meld,twitter"])
def test_text_sources_must_name_known_corpora(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--modality", "text", "--text-sources", bad])
    assert "--text-sources" in capsys.readouterr().err


def test_length_buckets_batch_similar_lengths_in_random_order() -> None:
    from training.tasks import length_bucketed

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    batches = length_bucketed(order, lengths, size=32, window=10, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))  # every text once
    assert max(len(b) for b in batches) == 32 and len(batches) == 32  # 1000 = 31 x 32 + 8

    def padded(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    random_batches = [order[k : k + 32] for k in range(0, 1000, 32)]
    assert padded(batches) < 0.75 * padded(random_batches)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts)  # the batches themselves come in random order
    assert batches == length_bucketed(order, lengths, size=32, window=10, rng=random.Random(1))


RECIPES = ["text", "text_goemotions_only", "audio", "video", "fusion"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_files_parse_and_command_line_options_win(name: str) -> None:
    recipe = Path(__file__).resolve().parents[1] / "training" / "recipes" / f"{name}.yaml"
    args = train.parse_args(["--recipe", str(recipe), "--seed", "99"])
    modality = name.split("_")[0]
    assert args.modality == modality and args.seed == 99  # the recipe sets the modality; the command line wins
    if modality == "audio":
        assert args.keep == "last" and "noise" in args.augment and args.audio_channels == (64, 128)
    if name == "text_goemotions_only":
        assert args.text_sources == ("goemotions",) and args.length_buckets == 50


def test_recipe_with_an_unknown_option_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("modality: text\nlearning-rate: 1e-3\n")
    with pytest.raises(SystemExit, match="unknown options"):
        train.parse_args(["--recipe", str(tmp_path / "bad.yaml")])


def test_face_augmentation_follows_the_run_seed(tmp_path: Path) -> None:
    from training.tasks import TaskOptions, VideoTask

    _seed_layout(tmp_path)
    task = VideoTask(TaskOptions(data_root=str(tmp_path), layout="seed", batch_size=7))

    def views(seed: int) -> torch.Tensor:
        next(task.train_batches(0, train.seed_everything(seed)))  # the epoch draws its augmentation generator
        return task.make_batch([0, 1, 2], train=True, epoch=0)[0]  # the same three faces, augmented

    first, again, other = views(1), views(1), views(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    ("argv", "foreign"),
    [
        (["--modality", "fusion", "--epochs", "3"], "--epochs"),
        (["--modality", "text", "--augment", "noise"], "--augment"),
        (["--modality", "audio", "--video-channels", "8,16,24"], "--video-channels"),
    ],
)
def test_a_run_refuses_options_of_another_modality(
    argv: list[str], foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert foreign in capsys.readouterr().err


def test_video_recipe_writes_its_inference_option() -> None:
    recipe = Path(__file__).resolve().parents[1] / "training" / "recipes" / "video.yaml"
    assert train.parse_args(["--recipe", str(recipe)]).mirror_average is True
    assert train.parse_args(["--modality", "video"]).mirror_average is False


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_trains_a_few_steps(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.checkpoint import DEFAULT_WEIGHTS_DIR

    recipe = Path(__file__).resolve().parents[1] / "training" / "recipes" / f"{name}.yaml"
    modality = name.split("_")[0]
    _seed_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    small = (
        ["--steps", "20", "--weights-dir", str(DEFAULT_WEIGHTS_DIR)]
        if modality == "fusion"
        else ["--epochs", "1", "--holdout", "0"]
    )  # a few steps on the 14 seed-layout examples
    train.main([*SEED_RUN, "--recipe", str(recipe), "--out", "weights", "--batch-size", "7", *small])
    _, config = load_model(tmp_path / "weights")
    assert config["model_type"] == modality
    assert config["metadata"]["recipe"] == str(recipe)  # the weights name the recipe that made them
    assert "history" not in config["metadata"]
