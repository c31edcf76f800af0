"""Forward shapes of every model and the fusion's handling of missing modalities."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.audio import AudioModel, AudioModelConfig
from models.common import cast_for_autocast, forward_in_precision, prepare_for_inference
from models.fusion import FusionModel, FusionModelConfig
from models.labels import EMOTIONS, MODALITIES, NUM_CLASSES
from models.text import TextModel, TextModelConfig, TextPreprocessor
from models.video import VideoModel, VideoModelConfig


@pytest.fixture(scope="module")
def fusion() -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(FusionModelConfig()).eval()


def test_text_model_shapes_and_truncation() -> None:
    model = TextModel(TextModelConfig(max_length=16)).eval()
    tok = TextPreprocessor(max_length=16)(["I am thrilled!", "word " * 40])
    assert tok.truncated == [False, True]
    assert tok.input_ids.shape[1] == 16
    emb, logits = model(tok.input_ids, tok.attention_mask)
    assert emb.shape == (2, 256) and logits.shape == (2, NUM_CLASSES)


def test_audio_model_shapes_and_padding_invariance() -> None:
    torch.manual_seed(0)
    model = AudioModel(AudioModelConfig()).eval()
    short = torch.randn(1, 1, 64, 120)
    padded = torch.cat([short, torch.zeros(1, 1, 64, 200)], dim=3)
    with torch.no_grad():
        emb1, logits1 = model(short, torch.tensor([120]))
        emb2, _ = model(padded, torch.tensor([120]))
    assert emb1.shape == (1, 256) and logits1.shape == (1, NUM_CLASSES)
    # Padding beyond the true length must not change the result.
    torch.testing.assert_close(emb1, emb2, atol=1e-4, rtol=1e-4)


def test_video_model_shapes_and_frame_mask() -> None:
    torch.manual_seed(0)
    model = VideoModel(VideoModelConfig()).eval()
    clip = torch.randn(1, 4, 1, 48, 48)
    padded = torch.cat([clip, torch.randn(1, 12, 1, 48, 48)], dim=1)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :4] = True
    with torch.no_grad():
        emb1, logits = model(clip, torch.ones(1, 4, dtype=torch.bool))
        emb2, _ = model(padded, mask)
    assert emb1.shape == (1, 256) and logits.shape == (1, NUM_CLASSES)
    torch.testing.assert_close(emb1, emb2, atol=1e-4, rtol=1e-4)


def test_video_mirror_average_is_mirror_invariant_at_inference_only() -> None:
    torch.manual_seed(0)
    model = VideoModel(VideoModelConfig(mirror_average=True)).eval()
    clip, mask = torch.randn(2, 3, 1, 48, 48), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        emb, _ = model(clip, mask)
        emb_mirrored, _ = model(clip.flip(-1), mask)
    torch.testing.assert_close(emb, emb_mirrored, atol=1e-5, rtol=1e-5)  # a face and its mirror image agree
    other = VideoModel(VideoModelConfig(mirror_average=False)).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(clip, mask)[0] - other(clip.flip(-1), mask)[0]).abs().max() > 1e-4
    model.train()  # training sees one view (its augmentation flips faces anyway): no longer mirror-invariant
    model.embed[0].p = 0.0
    model.frame_cnn[4].p = 0.0
    model.head.dropout.p = 0.0
    assert (model(clip, mask)[0] - model(clip.flip(-1), mask)[0]).abs().max() > 1e-4


def _conv_model_and_inputs(modality: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A seeded, eval-mode audio or video model (the ones with conv layers) and a batch of inputs for it."""
    torch.manual_seed(0)
    if modality == "audio":
        return AudioModel(AudioModelConfig()).eval(), (torch.randn(2, 1, 64, 120), torch.tensor([120, 80]))
    return VideoModel(VideoModelConfig()).eval(), (torch.randn(2, 3, 1, 48, 48), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_cast_for_autocast_is_bit_identical_to_autocast(modality: str) -> None:
    model, inputs = _conv_model_and_inputs(modality)
    cpu = torch.device("cpu")
    before = forward_in_precision(model, inputs, "bfloat16", cpu)
    float32 = forward_in_precision(model, inputs, "float32", cpu)
    cast_for_autocast(model, "bfloat16")
    linear_dtypes = {w.dtype for m in model.modules() if isinstance(m, torch.nn.Linear) for w in m.parameters()}
    assert linear_dtypes == {torch.bfloat16}
    after = forward_in_precision(model, inputs, "bfloat16", cpu)
    for b, a, f in zip(before, after, float32, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)
        assert (a - f).abs().max() > 0  # it really ran in bfloat16


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("modality", ["audio", "video"])
def test_prepare_for_inference_is_channels_last_and_keeps_outputs(modality: str, precision: str) -> None:
    model, inputs = _conv_model_and_inputs(modality)
    cpu = torch.device("cpu")
    with torch.no_grad():
        for m in model.modules():  # non-trivial batch-norm statistics, so the layouts really differ in work
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    plain = forward_in_precision(model, inputs, precision, cpu)
    prepare_for_inference(model, precision)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    tol = 1e-5 if precision == "float32" else 3e-2
    for a, b in zip(forward_in_precision(model, inputs, precision, cpu), plain, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _log_probs(batch: int) -> torch.Tensor:
    return torch.log_softmax(torch.randn(batch, 3, NUM_CLASSES) * 2, dim=-1)


@pytest.mark.parametrize("subset", [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)])
def test_fusion_accepts_every_subset(fusion: FusionModel, subset: tuple[int, ...]) -> None:
    present = torch.zeros(2, 3, dtype=torch.bool)
    present[:, list(subset)] = True
    with torch.no_grad():
        logits, contributions = fusion(torch.randn(2, 3, 256), _log_probs(2), present)
        probs = fusion.probabilities(logits, present)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(contributions.sum(1), torch.ones(2))
    assert torch.all(contributions[~present] == 0)
    assert torch.all(contributions[present] > 0)


def test_untrained_fusion_is_the_product_of_experts(fusion: FusionModel) -> None:
    """Before training (zero query: uniform attention; unit scales; no bias) and without the agreement bonus the fused
    logits are the sum of the encoders' log-probabilities, i.e. the product of experts, for every subset."""
    fusion = FusionModel(FusionModelConfig(agreement_bonus=0.0)).eval()
    log_probs = _log_probs(4)
    for subset in [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]:
        present = torch.zeros(4, 3, dtype=torch.bool)
        present[:, list(subset)] = True
        with torch.no_grad():
            logits, _ = fusion(torch.randn(4, 3, 256), log_probs, present)
        torch.testing.assert_close(logits, (log_probs * present[..., None]).sum(1), atol=1e-5, rtol=1e-5)


def test_class_mixing_starts_at_the_plain_fusion_and_moves_evidence_between_classes() -> None:
    """Zero mixing matrices leave the answer as without them; a matrix that swaps audio's "happy" and "fear"
    turns an audio-only "happy" into "fear", and leaves the other modalities' evidence where it was."""
    torch.manual_seed(0)
    plain = FusionModel(FusionModelConfig(agreement_bonus=0.0)).eval()
    mixing = FusionModel(FusionModelConfig(agreement_bonus=0.0, class_mixing=True)).eval()
    mixing.load_state_dict(plain.state_dict(), strict=False)
    log_probs, present = _log_probs(4), torch.ones(4, 3, dtype=torch.bool)
    emb = torch.randn(4, 3, 256)
    with torch.no_grad():
        torch.testing.assert_close(mixing(emb, log_probs, present)[0], plain(emb, log_probs, present)[0])
        happy, fear = EMOTIONS.index("happy"), EMOTIONS.index("fear")
        audio = MODALITIES.index("audio")
        for a, b in ((happy, fear), (fear, happy)):  # (I + D) is the permutation that swaps the two
            mixing.class_mixing[audio, a, a] = -1.0
            mixing.class_mixing[audio, a, b] = 1.0
        only_audio = torch.zeros(1, 3, dtype=torch.bool)
        only_audio[0, audio] = True
        says_happy = torch.full((1, 3, NUM_CLASSES), 0.02).log()
        says_happy[0, :, happy] = torch.tensor(0.88).log()
        assert plain(emb[:1], says_happy, only_audio)[0].argmax().item() == happy
        assert mixing(emb[:1], says_happy, only_audio)[0].argmax().item() == fear
        only_text = torch.zeros(1, 3, dtype=torch.bool)
        only_text[0, MODALITIES.index("text")] = True
        assert mixing(emb[:1], says_happy, only_text)[0].argmax().item() == happy


def test_two_agreeing_encoders_outvote_a_sure_third(fusion: FusionModel) -> None:
    """Text and audio both say sad (50 %); video says happy at 90 %: the product picks happy, the fusion sad."""

    def probs(top: int, p: float) -> torch.Tensor:
        row = torch.full((NUM_CLASSES,), (1 - p) / (NUM_CLASSES - 1))
        row[top] = p
        return row.log()

    log_probs = torch.stack([probs(5, 0.5), probs(5, 0.5), probs(3, 0.9)])[None]
    present = torch.ones(1, 3, dtype=torch.bool)
    assert log_probs.sum(1).argmax().item() == 3
    with torch.no_grad():
        logits, _ = fusion(torch.zeros(1, 3, 256), log_probs, present)
    assert logits.argmax().item() == 5


def test_contributions_follow_confidence(fusion: FusionModel) -> None:
    """A near-certain encoder next to a near-uniform one gets most of the contribution."""
    sure = torch.log_softmax(torch.tensor([8.0, 0, 0, 0, 0, 0, 0]), -1)
    unsure = torch.log_softmax(torch.tensor([0.1, 0, 0, 0, 0, 0, 0.2]), -1)
    log_probs = torch.stack([sure, unsure, unsure])[None]
    present = torch.tensor([[True, True, False]])
    with torch.no_grad():
        _, contributions = fusion(torch.zeros(1, 3, 256), log_probs, present)
    assert contributions[0, 0] > 0.8 and contributions[0, 2] == 0


def test_fusion_ignores_missing_modalities(fusion: FusionModel) -> None:
    x, log_probs = torch.randn(1, 3, 256), _log_probs(1)
    present = torch.tensor([[True, False, True]])
    other, other_lp = x.clone(), log_probs.clone()
    other[0, 1] = torch.randn(256) * 100  # whatever sits in the missing slot must not matter
    other_lp[0, 1] = torch.log_softmax(torch.randn(NUM_CLASSES) * 10, -1)
    with torch.no_grad():
        a, ca = fusion(x, log_probs, present)
        b, cb = fusion(other, other_lp, present)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ca, cb)


def test_fusion_rejects_empty_input(fusion: FusionModel) -> None:
    with pytest.raises(ValueError, match="at least one modality"):
        fusion(torch.randn(1, 3, 256), _log_probs(1), torch.zeros(1, 3, dtype=torch.bool))


def test_a_subset_marked_plain_product_gets_the_product_and_the_others_do_not() -> None:
    """``plain_product`` switches one subset to the product of experts; every other subset keeps its weighting."""
    torch.manual_seed(0)
    fusion = FusionModel(FusionModelConfig(agreement_bonus=1.0, class_mixing=True)).eval()
    with torch.no_grad():
        fusion.log_scale.copy_(torch.tensor([0.5, -0.3, 0.2]))
        fusion.class_bias.normal_()
    log_probs, emb = _log_probs(4), torch.randn(4, 3, 256)
    text_audio = torch.tensor([[True, True, False]]).expand(4, -1)
    everything = torch.ones(4, 3, dtype=torch.bool)
    product = (log_probs * text_audio[..., None]).sum(1)
    with torch.no_grad():
        before_all = fusion(emb, log_probs, everything)[0]
        assert (fusion(emb, log_probs, text_audio)[0] - product).abs().max() > 1e-3
        fusion.plain_product[fusion.subset_index(text_audio[:1])] = True
        logits, contributions = fusion(emb, log_probs, text_audio)
        torch.testing.assert_close(logits, product)
        torch.testing.assert_close(contributions.sum(1), torch.ones(4))
        torch.testing.assert_close(fusion(emb, log_probs, everything)[0], before_all)
