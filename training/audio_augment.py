"""Speech waveform perturbations with torchaudio: random augmentation for training, fixed degradations for testing.

Training draws, per clip, any of the switched-on perturbations (:data:`AUGMENTATIONS`); the degraded
validation set (:data:`DEGRADATIONS`, built by ``python -m training.degrade``) applies one fixed channel
condition to every validation clip, so robustness is measured on the same speakers as the clean figure.
"""

from __future__ import annotations

import random

import torch
import torchaudio.functional as AF

AUGMENTATIONS = ("speed", "noise", "band", "reverb", "specaug")
DEGRADATIONS = ("noise10db", "telephone", "resample8k")


def add_noise(wave: torch.Tensor, snr_db: float, generator: torch.Generator, pink: bool = False) -> torch.Tensor:
    """``wave`` plus white (or pink, 1/f power) noise at ``snr_db`` dB signal-to-noise ratio."""
    noise = torch.randn(wave.shape, generator=generator)
    if pink:
        spectrum = torch.fft.rfft(noise)
        freqs = torch.arange(spectrum.shape[-1]).clamp_min(1).float()
        noise = torch.fft.irfft(spectrum / freqs.sqrt(), n=wave.shape[-1])
    return AF.add_noise(wave[None], noise[None], torch.tensor([snr_db]))[0]


def band_limit(wave: torch.Tensor, sample_rate: int, low_hz: float, high_hz: float) -> torch.Tensor:
    """Second-order high-pass at ``low_hz`` and low-pass at ``high_hz`` (biquads, as a telephone channel)."""
    return AF.lowpass_biquad(AF.highpass_biquad(wave, sample_rate, low_hz), sample_rate, high_hz)


def resample_through(wave: torch.Tensor, sample_rate: int, through_hz: int) -> torch.Tensor:
    """Down to ``through_hz`` and back: what survives a narrow-band codec's sampling rate."""
    return AF.resample(AF.resample(wave, sample_rate, through_hz), through_hz, sample_rate)


def synthetic_reverb(wave: torch.Tensor, sample_rate: int, rt60: float, generator: torch.Generator) -> torch.Tensor:
    """Convolution with an exponentially decaying noise impulse response of reverberation time ``rt60`` s."""
    n = int(rt60 * sample_rate)
    t = torch.arange(n) / sample_rate
    rir = torch.randn(n, generator=generator) * torch.exp(-6.9 * t / rt60)  # -60 dB at rt60
    rir[0] = 1.0
    out = AF.fftconvolve(wave, rir / rir.norm())[: wave.shape[-1]]
    return out * (wave.abs().max() / out.abs().max().clamp_min(1e-8))


def degrade(wave: torch.Tensor, sample_rate: int, condition: str, generator: torch.Generator) -> torch.Tensor:
    """One fixed condition of the degraded validation set (see :data:`DEGRADATIONS`)."""
    if condition == "noise10db":
        return add_noise(wave, 10.0, generator)
    if condition == "telephone":
        return band_limit(wave, sample_rate, 300.0, 3400.0)
    if condition == "resample8k":
        return resample_through(wave, sample_rate, 8000)
    raise ValueError(f"unknown degradation {condition!r}; choose from {DEGRADATIONS}")


class WaveAugment:
    """Random waveform perturbations, each switched on by name; randomness from the run's seeded ``rng``.

    - ``speed``: 0.9x / 1.0x / 1.1x by resampling (tempo and pitch move together, as in Kaldi's recipe)
    - ``band``: half the clips band-limited (random high-pass 80-400 Hz and low-pass 2.8-6 kHz) or sent through 8 kHz
    - ``noise``: half the clips get white or pink noise at a random SNR of 5-30 dB
    - ``reverb``: a quarter of the clips convolved with a synthetic room response (RT60 0.2-0.7 s)
    """

    def __init__(self, kinds: set[str], sample_rate: int) -> None:
        unknown = kinds - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; choose from {AUGMENTATIONS}")
        self.kinds, self.sample_rate = kinds, sample_rate

    def __call__(self, wave: torch.Tensor, rng: random.Random) -> torch.Tensor:
        sr = self.sample_rate
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        if "speed" in self.kinds:
            factor = rng.choice((0.9, 1.0, 1.1))
            if factor != 1.0:
                wave = AF.resample(wave, int(sr * factor), sr)
        if "reverb" in self.kinds and rng.random() < 0.25:
            wave = synthetic_reverb(wave, sr, rng.uniform(0.2, 0.7), generator)
        if "band" in self.kinds and rng.random() < 0.5:
            if rng.random() < 0.3:
                wave = resample_through(wave, sr, 8000)
            else:
                wave = band_limit(wave, sr, rng.uniform(80, 400), rng.uniform(2800, 6000))
        if "noise" in self.kinds and rng.random() < 0.5:
            wave = add_noise(wave, rng.uniform(5.0, 30.0), generator, pink=rng.random() < 0.5)
        return wave.clamp(-1.0, 1.0)
