"""Decoding and preprocessing of real short clips/images, and typed errors for bad media."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.audio.preprocessing import AudioFeatureConfig, LogMelExtractor
from models.media import (
    DecodeLimits,
    EmptyMediaError,
    MediaDecodeError,
    MediaTimeoutError,
    NoAudioStreamError,
    NoVideoStreamError,
    decode_audio,
    decode_frames,
)
from models.video.preprocessing import FaceCropper, faces_to_tensor
from tests.synth import SHARED_DATA, image_png, pattern_mp4, still_video, tone_wav

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real datasets) is not present")


def test_decode_audio_resamples_to_16k_mono() -> None:
    wave = decode_audio(tone_wav(seconds=1.5))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 24000) < 400
    assert 0.1 < np.abs(wave).max() <= 1.0  # ffmpeg's sine source has amplitude 1/8


@pytest.mark.parametrize("width", [1, 2, 4])
def test_plain_wav_is_read_in_process_with_ffmpeg_s_samples(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import wave as wavelib

    from models import media

    samples = np.random.default_rng(width).integers(0, 256**width, 8000, dtype=np.int64)
    raw = (samples - (0 if width == 1 else 256**width // 2)).astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width])
    buf = io.BytesIO()
    with wavelib.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(raw.tobytes())
    data = buf.getvalue()
    fast = decode_audio(data)
    assert media._read_plain_wav(data, 16000, 30.0) is not None  # the in-process path was taken
    monkeypatch.setattr(media, "_read_plain_wav", lambda *args: None)
    np.testing.assert_array_equal(fast, decode_audio(data))  # the same samples as the ffmpeg path
    assert len(decode_audio(data, limits=DecodeLimits(max_audio_seconds=0.25))) == 4000


def test_other_wavs_go_to_ffmpeg() -> None:
    from models import media

    stereo_44k = _ffmpeg_wav(["-ac", "2", "-ar", "44100"])
    assert media._read_plain_wav(stereo_44k, 16000, 30.0) is None
    assert abs(len(decode_audio(stereo_44k)) - 16000) < 400  # resampled and downmixed by ffmpeg


def _ffmpeg_wav(args: list[str]) -> bytes:
    from tests.synth import _ffmpeg

    return _ffmpeg(["-f", "lavfi", "-i", "sine=frequency=300:duration=1", *args, "-f", "wav"])


def test_decode_audio_reads_the_audio_track_of_a_video() -> None:
    wave = decode_audio(pattern_mp4(seconds=1.0, with_audio=True))
    assert abs(len(wave) - 16000) < 2000


def test_logmel_features_are_64_bins_and_normalised() -> None:
    feats = LogMelExtractor()(decode_audio(tone_wav(seconds=2.0)))
    assert feats.shape[0] == 64 and 150 <= feats.shape[1] <= 201
    assert abs(float(feats.mean())) < 1e-3 and abs(float(feats.std()) - 1.0) < 1e-2


@needs_data
def test_real_speech_clip_is_trimmed_and_featurised() -> None:
    clip = next((SHARED_DATA / "ravdess_speech" / "Actor_17").glob("*.flac"))
    wave = decode_audio(clip.read_bytes())
    feats = LogMelExtractor()(wave)
    # RAVDESS clips have about a second of silence around the sentence; trimming removes most of it.
    assert feats.shape[0] == 64
    assert 50 < feats.shape[1] < len(wave) / 160


def test_speech_under_a_noise_floor_is_trimmed_to_the_speech() -> None:
    """A 1 s "sentence" (a warbling tone) between 1.5 s of silence on each side: with digital silence or under
    white noise at 20 dB SNR, the features keep about the sentence's second and not the 3 s around it."""
    sr, gen = 16000, torch.Generator().manual_seed(0)
    t = torch.arange(sr) / sr
    speech = 0.3 * torch.sin(2 * torch.pi * (300 + 100 * torch.sin(2 * torch.pi * 3 * t)) * t)
    clip = torch.cat([torch.zeros(int(1.5 * sr)), speech, torch.zeros(int(1.5 * sr))])
    noise = torch.randn(clip.shape, generator=gen)
    noisy = clip + noise * (speech.pow(2).mean() / noise.pow(2).mean() / 10**2).sqrt()  # 20 dB below the speech
    extractor = LogMelExtractor()
    for wave in (clip, noisy):
        frames = extractor(wave.numpy()).shape[1]
        assert 90 <= frames <= 115, frames  # 100 frames of 10 ms, give or take the windows at the edges
    plain = LogMelExtractor(AudioFeatureConfig(floor_margin_db=-1000.0))  # the loudest - 40 dB rule alone
    assert plain(noisy.numpy()).shape[1] > 300  # keeps the noise around the sentence
    assert plain(clip.numpy()).shape == extractor(clip.numpy()).shape


def test_decode_frames_samples_uniformly() -> None:
    frames = decode_frames(pattern_mp4(seconds=2.0, with_audio=False), num_frames=16)
    assert frames.shape == (16, 240, 320) and frames.dtype == np.uint8
    assert len({f.tobytes() for f in frames}) > 8  # distinct moments, not one frame repeated


def test_still_image_is_a_one_frame_video() -> None:
    img = (np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)
    frames = decode_frames(image_png(img), num_frames=16)
    assert frames.shape == (1, 64, 80)
    assert np.abs(frames[0].astype(int) - img).max() <= 1


def test_centre_crop_fallback_when_no_face() -> None:
    frames = decode_frames(pattern_mp4(seconds=1.0, with_audio=False), num_frames=4)
    crops = FaceCropper().crop(frames)
    assert crops.face_detected is False
    assert crops.faces.shape == (4, 48, 48)
    tensor = faces_to_tensor(crops.faces)
    assert tensor.shape == (4, 1, 48, 48) and float(tensor.min()) >= -1 and float(tensor.max()) <= 1


@needs_data
def test_real_face_is_detected_in_a_video() -> None:
    image = SHARED_DATA / "fer2013" / "val" / "happy"
    # Not every 48x48 FER crop is a findable face (profiles, hands over the face): most of a few must be.
    found = []
    for path in sorted(image.iterdir())[:10]:
        crops = FaceCropper().crop(decode_frames(still_video(path), num_frames=16))
        assert crops.faces.shape[1:] == (48, 48)
        found.append(crops.face_detected)
    assert sum(found) >= 8, found


@pytest.mark.parametrize(
    "payload,error",
    [
        (b"", EmptyMediaError),
        (b"this is not media at all" * 20, MediaDecodeError),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(200), MediaDecodeError),
    ],
)
def test_bad_audio_raises_typed_errors(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_audio(payload)


def test_truncated_video_and_missing_streams() -> None:
    video = pattern_mp4(seconds=1.0, with_audio=False)
    with pytest.raises(NoAudioStreamError):
        decode_audio(video)
    with pytest.raises(NoVideoStreamError):
        decode_frames(tone_wav(seconds=0.5))
    with pytest.raises((MediaDecodeError, NoVideoStreamError)):
        decode_frames(video[: len(video) // 20])
    with pytest.raises(MediaDecodeError):
        decode_frames(b"\x00\x01garbage" * 100)


def test_decode_timeout_is_enforced() -> None:
    with pytest.raises(MediaTimeoutError):
        decode_frames(pattern_mp4(seconds=8.0, with_audio=False), limits=DecodeLimits(timeout_s=0.01))


def test_extractor_accepts_tensors_too() -> None:
    wave = torch.from_numpy(decode_audio(tone_wav(seconds=0.5)))
    assert LogMelExtractor()(wave).shape[0] == 64
