"""Build the degraded speech validation set: ``python -m training.degrade --data-root ../shared/data``.

Every validation clip (RAVDESS actors 17-20; calm left out, as in every report) is written once per channel
condition of :data:`training.audio_augment.DEGRADATIONS` as a 16 kHz 16-bit WAV under
``<out>/<condition>/``, with the clip's original name (so its label stays readable):

- ``noise10db``: white noise at 10 dB SNR (seeded per clip, so the set is the same on every machine)
- ``telephone``: band-limited to 300-3,400 Hz
- ``resample8k``: resampled to 8 kHz and back

``python -m training.evaluate`` scores the audio encoder on it next to the clean clips.
"""

from __future__ import annotations

import argparse
import wave
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.media import decode_audio
from training.audio_augment import DEGRADATIONS, degrade
from training.datasets import Sample, read_ravdess

DEFAULT_OUT = Path(".cache") / "ravdess_degraded"
SAMPLE_RATE = 16000


def write_wav(path: Path, wave_data: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a float waveform in [-1, 1] as mono 16-bit PCM."""
    pcm = (wave_data.clamp(-1.0, 1.0).numpy() * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sample_rate)
        fh.writeframes(pcm.tobytes())


def build_degraded(
    data_root: str | Path, out: str | Path = DEFAULT_OUT, calm_as: str | None = None, condition: str | None = None
) -> dict[str, list[Sample]]:
    """Write (if missing) and list the degraded clips: ``{condition: [(wav path, label), ...]}``."""
    clean = read_ravdess(data_root, "val", calm_as)
    conditions = [condition] if condition else list(DEGRADATIONS)
    sets: dict[str, list[Sample]] = {}
    for cond in conditions:
        folder = Path(out) / cond
        folder.mkdir(parents=True, exist_ok=True)
        sets[cond] = []
        for path, label in tqdm(clean, desc=f"degrade {cond}", leave=False):
            target = folder / (Path(path).stem + ".wav")
            if not target.is_file():
                wave_data = torch.from_numpy(decode_audio(Path(path).read_bytes(), SAMPLE_RATE)).float()
                generator = torch.Generator().manual_seed(zlib.crc32(Path(path).name.encode()))
                write_wav(target, degrade(wave_data, SAMPLE_RATE, cond, generator))
            sets[cond].append((str(target), label))
    return sets


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    sets = build_degraded(args.data_root, args.out)
    for cond, samples in sets.items():
        labels = np.array([y for _, y in samples])
        print(f"{cond}: {len(samples)} clips, {len(np.unique(labels))} classes -> {Path(args.out) / cond}")


if __name__ == "__main__":
    main()
