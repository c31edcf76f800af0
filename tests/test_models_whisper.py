"""Whisper-base assembled from its two PyPI packages: checks, the weight mapping, the front end and the head."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio import whisper
from models.audio.whisper import (
    MODEL_BIN_SHA256,
    PIP_COMMAND,
    WhisperEncoderBackbone,
    WhisperLogMel,
    WhisperPackageError,
)
from models.audio.whisper_model import WhisperAudioModel, WhisperAudioModelConfig
from models.checkpoint import load_model, save_model
from models.labels import NUM_CLASSES
from models.media import decode_audio

FIXTURE = Path(__file__).parent / "fixtures" / "speech.wav"


@pytest.fixture(scope="module")
def backbone() -> WhisperEncoderBackbone:
    return WhisperEncoderBackbone().load_pretrained().eval()


@pytest.fixture(scope="module")
def fixture_mel() -> torch.Tensor:
    return WhisperLogMel()(torch.from_numpy(decode_audio(FIXTURE.read_bytes(), 16000)))


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        whisper.importlib.util, "find_spec", lambda name: None if name.endswith("part2") else real(name)
    )
    with pytest.raises(WhisperPackageError) as error:
        whisper.package_dirs()
    assert PIP_COMMAND in str(error.value) and "part2" in str(error.value)


def test_a_changed_byte_fails_the_pinned_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part1, part2 = whisper.package_dirs()
    bad = bytearray((part2 / "model.bin.part2").read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "model.bin.part2").write_bytes(bytes(bad))
    monkeypatch.setattr(whisper, "package_dirs", lambda: (part1, tmp_path))
    with pytest.raises(WhisperPackageError, match=MODEL_BIN_SHA256):
        whisper.read_model_bin()


def test_every_encoder_tensor_is_mapped_with_its_shape() -> None:
    state = whisper.whisper_encoder_state()
    expected = WhisperEncoderBackbone().state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].shape == tensor.shape, name
    # Whisper's key projection has no bias: the fused CTranslate2 bias holds zeros there.
    qkv_bias = whisper.ct2_variables(whisper.read_model_bin(), "encoder/layer_0/self_attention/linear_0/bias")
    assert np.all(next(iter(qkv_bias.values()))[512:1024] == 0)


def test_front_end_matches_faster_whisper(fixture_mel: torch.Tensor) -> None:
    audio = pytest.importorskip("faster_whisper.feature_extractor", reason="faster-whisper is not installed")
    wave = decode_audio(FIXTURE.read_bytes(), 16000)
    theirs = audio.FeatureExtractor()(wave)
    n = min(theirs.shape[1], fixture_mel.shape[1])
    assert abs(theirs.shape[1] - fixture_mel.shape[1]) <= 1
    np.testing.assert_allclose(fixture_mel[:, :n].numpy(), theirs[:, :n], atol=1e-3)


def test_encoder_matches_ctranslate2(backbone: WhisperEncoderBackbone, fixture_mel: torch.Tensor) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (faster-whisper) is not installed")
    mel = torch.zeros(1, 80, 3000)
    mel[0, :, : fixture_mel.shape[1]] = fixture_mel
    model = ctranslate2.models.Whisper(str(whisper.whisper_model_folder()), device="cpu", compute_type="float32")
    theirs = np.array(model.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))
    with torch.no_grad():
        states, lengths = backbone(mel, torch.tensor([3000]))
    assert int(lengths[0]) == 1500
    np.testing.assert_allclose(states[-1].numpy(), theirs, atol=2e-3)


def test_a_clip_gives_the_same_states_alone_and_padded_in_a_batch(
    backbone: WhisperEncoderBackbone, fixture_mel: torch.Tensor
) -> None:
    mel = fixture_mel[:, :300][None]
    padded = torch.nn.functional.pad(mel, (0, 120), value=-1.0)
    with torch.no_grad():
        alone, n_alone = backbone(mel, torch.tensor([300]))
        batch, n_batch = backbone(torch.cat([padded, torch.randn_like(padded)]), torch.tensor([300, 420]))
    assert alone[-1].shape[1] == 150 and n_alone.tolist() == [150] and n_batch.tolist() == [150, 210]
    torch.testing.assert_close(alone[-1][0], batch[-1][0, :150], atol=1e-4, rtol=1e-4)
    assert len(alone) == 7  # the stem and 6 layers


def test_head_pools_time_without_reading_the_padding() -> None:
    torch.manual_seed(0)
    model = WhisperAudioModel(WhisperAudioModelConfig(pretrained=False)).eval()
    states = torch.randn(1, 33, 7, 512)
    padded = torch.cat([states, 100 * torch.randn(1, 9, 7, 512)], dim=1)
    pooled, lengths = model.pool_time(states, torch.tensor([33]))
    assert pooled.shape == (1, 17, 7, 512) and lengths.tolist() == [17]
    torch.testing.assert_close(pooled[0, 0], states[0, :2].mean(0))
    torch.testing.assert_close(pooled[0, 16], states[0, 32])  # a last, unpaired state stays itself
    with torch.no_grad():
        emb1, logits1 = model.forward_states(*model.pool_time(states, torch.tensor([33])))
        emb2, _ = model.forward_states(*model.pool_time(padded, torch.tensor([33])))
    assert emb1.shape == (1, 256) and logits1.shape == (1, NUM_CLASSES)
    torch.testing.assert_close(emb1, emb2, atol=1e-5, rtol=1e-5)


def test_statistics_are_each_states_mean_and_spread_over_the_frames_present() -> None:
    states = torch.randn(2, 10, 7, 512)
    stats = WhisperAudioModel.pooled_statistics(states, torch.tensor([10, 6]))
    assert stats.shape == (2, 7, 1024)
    torch.testing.assert_close(stats[1, :, :512], states[1, :6].mean(0))
    torch.testing.assert_close(stats[1, :, 512:], states[1, :6].std(0, unbiased=False), atol=1e-4, rtol=1e-4)


def test_layer_weights_mix_the_encoder_states() -> None:
    model = WhisperAudioModel(WhisperAudioModelConfig(pretrained=False)).eval()
    states = torch.randn(2, 5, 7, 512)
    with torch.no_grad():
        model.layer_logits.fill_(-30.0)
        model.layer_logits[3] = 30.0  # all weight on one state: the rest must not matter
        emb1, _ = model.forward_states(states, torch.tensor([5, 4]))
        emb2, _ = model.forward_states(states * (torch.arange(7) == 3)[None, None, :, None], torch.tensor([5, 4]))
    torch.testing.assert_close(emb1, emb2, atol=1e-5, rtol=1e-5)


def test_checkpoint_keeps_the_head_and_rebuilds_the_encoder_from_the_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = WhisperAudioModel(WhisperAudioModelConfig(pretrained=True)).eval()
    save_model(model, tmp_path)
    stored = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "model.safetensors"))
    assert stored and not any(k.startswith("backbone.") for k in stored)
    loaded, config = load_model(tmp_path)
    assert config["model_type"] == "audio_whisper"
    mel = torch.randn(2, 80, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(mel, torch.tensor([160, 100])), model(mel, torch.tensor([160, 100])))


def test_fine_tuned_top_layers_are_stored() -> None:
    model = WhisperAudioModel(WhisperAudioModelConfig(pretrained=False, trainable_layers=2))
    names = model.trainable_parameter_names()
    assert any(n.startswith("backbone.layers.5.") for n in names)
    assert any(n.startswith("backbone.layers.4.") for n in names)
    assert not any(n.startswith(("backbone.layers.3.", "backbone.conv")) for n in names)


def test_an_ensemble_averages_its_heads_and_survives_a_checkpoint(tmp_path: Path) -> None:
    """``WhisperAudioModel.ensemble``: the embedding and logits are the members' means, saved and loaded intact."""
    torch.manual_seed(0)
    config = WhisperAudioModelConfig(layer_mix="concat", pretrained=False)
    members = [WhisperAudioModel(config).eval() for _ in range(3)]
    for m in members:
        m.stats_mean.copy_(members[0].stats_mean)
    ensemble = WhisperAudioModel.ensemble(members).eval()
    stats = torch.randn(4, config.num_states, 2 * config.state_dim)
    with torch.no_grad():
        outputs = [m.forward_statistics(stats) for m in members]
        embedding, logits = ensemble.forward_statistics(stats)
        torch.testing.assert_close(embedding, torch.stack([e for e, _ in outputs]).mean(0))
        torch.testing.assert_close(logits, torch.stack([lg for _, lg in outputs]).mean(0))
        assert (logits - outputs[0][1]).abs().max() > 1e-4  # not just the first head
    save_model(ensemble, tmp_path)
    loaded, config_json = load_model(tmp_path, {"pretrained": False})
    assert config_json["config"]["members"] == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_statistics(stats)[1], logits)
