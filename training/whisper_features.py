"""Frozen Whisper-base encoder states of every training clip, computed once and cached on disk.

``python -m training.whisper_features --data-root ../shared/data --versions 0,1,2`` encodes each RAVDESS
(actors 01-20) and TESS clip with the serving front end (ffmpeg decode, silence trim, Whisper log-mel) and
keeps every layer's hidden states, time-pooled as the head pools them, as float16. Version 0 is the clean
clip; version ``k > 0`` is the clip through :class:`training.audio_augment.WaveAugment` (speed, band, noise)
with a seed derived from ``k`` and the clip. Each version is written in parts of ``--part-size`` clips under
``.cache/whisper/``, so an interrupted run resumes at the first missing part.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.audio.whisper import WhisperFrontEnd
from models.audio.whisper_model import WhisperAudioModel, WhisperAudioModelConfig
from training.audio_augment import WaveAugment
from training.datasets import read_tess
from training.features import audio_waves

CACHE = Path(".cache/whisper")
AUGMENT = {"speed", "band", "noise"}


def corpus_files(data_root: str) -> dict[str, list[str]]:
    """The clips whose states are cached: RAVDESS actors 01-20 (calm included) and TESS, in a fixed order."""
    ravdess = sorted(str(p) for p in (Path(data_root) / "ravdess_speech").glob("Actor_*/*.flac"))
    return {"ravdess": ravdess, "tess": [p for p, _ in read_tess(data_root)]}


def _part_path(corpus: str, version: int, part: int) -> Path:
    return CACHE / f"{corpus}-v{version}-p{part:03d}.safetensors"


def load_states(corpus: str, version: int, count: int, part_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All cached states of ``corpus`` version ``version``: (frames, num_states, 512) float16 and offsets (N+1,)."""
    chunks, lengths = [], []
    for part in range((count + part_size - 1) // part_size):
        tensors = load_file(str(_part_path(corpus, version, part)))
        chunks.append(tensors["states"])
        lengths.append(tensors["lengths"])
    lens = torch.cat(lengths)
    if len(lens) != count:
        raise RuntimeError(f"{corpus} v{version}: {len(lens)} cached clips, expected {count}")
    offsets = torch.zeros(count + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    return torch.cat(chunks), offsets


def encode_version(files: list[str], corpus: str, version: int, part_size: int, model: WhisperAudioModel) -> None:
    """Write the missing parts of ``corpus`` version ``version``."""
    frontend = WhisperFrontEnd()
    augment = WaveAugment(AUGMENT, 16000)
    waves = audio_waves([(f, 0) for f in files], 16000)
    for part in range((len(files) + part_size - 1) // part_size):
        path = _part_path(corpus, version, part)
        if path.is_file():
            continue
        start = time.perf_counter()
        states, lengths = [], []
        for i in range(part * part_size, min(len(files), (part + 1) * part_size)):
            wave = frontend.trim(waves[i])
            if version > 0:
                wave = augment(wave, random.Random(f"{version}:{files[i]}"))
            mel = frontend.log_mel(wave)
            with torch.inference_mode():
                pooled, n = model.encoder_states(mel[None], torch.tensor([mel.shape[1]]))
            states.append(pooled[0, : int(n[0])].half())  # (T, S, 512)
            lengths.append(int(n[0]))
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"states": torch.cat(states).contiguous(), "lengths": torch.tensor(lengths)}, str(tmp))
        tmp.replace(path)
        print(
            f"{corpus} v{version} part {part}: {len(lengths)} clips in {time.perf_counter() - start:.0f} s", flush=True
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--versions", default="0,1,2", help="comma-separated: 0 clean, k > 0 augmented draw k")
    p.add_argument("--corpora", default="ravdess,tess")
    p.add_argument("--part-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = corpus_files(args.data_root)
    model = WhisperAudioModel(WhisperAudioModelConfig()).eval()
    for version in (int(v) for v in args.versions.split(",")):
        for corpus in args.corpora.split(","):
            encode_version(files[corpus], corpus, version, args.part_size, model)


if __name__ == "__main__":
    main()
