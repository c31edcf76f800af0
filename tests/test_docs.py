"""The user documents stay short, their links resolve, and the commands they show answer ``--help``.

Covers ``README.md``, ``models/MODEL_CARD.md`` and ``docs/*.md``. No Ray is started: ``serve run`` needs a
cluster and is exempt; every ``python -m <module>`` of this repository that the README or the model card shows
is run with ``--help`` (a few seconds each, two at a time).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CARD = REPO / "models" / "MODEL_CARD.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LIMITS = {README: 15_000, CARD: 13_500}  # the card: more for the text teacher and context rows

FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
PYTHON_M = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")
HISTORY = re.compile(
    r"\b(previously|used to|earlier (session|run|weights|version)s?|we tried|no longer)\b", re.IGNORECASE
)
GENERATED = re.compile(r"<!-- (bench:table|metrics:start) -->.*?<!-- (/bench:table|metrics:end) -->", re.DOTALL)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are examples, not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def _relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("path", list(LIMITS), ids=lambda p: p.name)
def test_document_fits_its_size_limit(path: Path) -> None:
    size = len(path.read_bytes())
    assert size <= LIMITS[path], f"{path.relative_to(REPO)} is {size} bytes, over {LIMITS[path]}"


def test_docs_folder_exists_with_pages() -> None:
    assert DOCS, "docs/ holds no pages"


@pytest.mark.parametrize("path", [README, CARD, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(path: Path) -> None:
    links = _relative_links(path)
    broken = []
    for target in links:
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists() or not resolved.is_relative_to(REPO):
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(REPO)}: {broken}"


def test_readme_shows_the_ui_screenshot() -> None:
    assert "reports/ui.png" in _relative_links(README)


def _entry_points() -> list[str]:
    """``python -m`` modules of this repository shown in the README and the model card."""
    found = {m for p in (README, CARD) for m in PYTHON_M.findall(p.read_text())}
    return sorted(m for m in found if (REPO / m.split(".")[0]).is_dir())


def test_readme_shows_the_main_entry_points() -> None:
    shown = set(_entry_points())
    for module in (
        "bench.run",
        "bench.soak",
        "training.train",
        "training.whisper_head",
        "training.degrade",
        "training.evaluate",
    ):
        assert module in shown, module


def test_every_python_m_entry_point_answers_help() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def run(module: str) -> tuple[str, int, str]:
        command = [sys.executable, "-m", module, "--help"]
        done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        return module, done.returncode, done.stdout + done.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, _entry_points()))
    failed = [f"{m}: exit {rc}\n{out[-500:]}" for m, rc, out in results if rc != 0 or "usage" not in out.lower()]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("path", [README, CARD], ids=lambda p: p.name)
def test_document_speaks_of_the_present(path: Path) -> None:
    text = GENERATED.sub("", path.read_text())
    assert not HISTORY.findall(text), [m.group(0) for m in HISTORY.finditer(text)]


def test_model_card_names_the_shipped_weights() -> None:
    card = CARD.read_text()
    for config in sorted((REPO / "models" / "weights").glob("*/config.json")):
        meta = json.loads(config.read_text()).get("metadata", {})
        assert meta.get("version") and f"`{meta['version']}`" in card, (config, meta.get("version"))
        assert f"{round(meta['train_seconds']):,} s" in card, (config, meta.get("train_seconds"))


def test_regenerated_sections_keep_their_markers() -> None:
    """``bench.run --update-readme``, ``training.evaluate``, the API example refresher and the README
    metrics-table test all find their markers."""
    from bench.report import README_TABLE_END, README_TABLE_START
    from training.evaluate import END, START

    readme = README.read_text()
    assert readme.count(README_TABLE_START) == 1 and readme.count(README_TABLE_END) == 1
    assert readme.count("<!-- section:ops -->") == 1 and readme.count("<!-- /section:ops -->") == 1
    card = CARD.read_text()
    assert card.count(START) == 1 and card.count(END) == 1
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import refresh_readme_examples as refresher
    finally:
        sys.path.remove(str(REPO / "deploy"))
    api = refresher.DOC.read_text()
    section = api.split(refresher.START)[1].split(refresher.END)[0]
    assert len(refresher.EXAMPLE.findall(section)) >= 5


def test_readme_soak_figures_match_the_report() -> None:
    """The reliability table quotes ``reports/soak.json`` (``python -m bench.soak``); it must say what the file says."""
    soak = json.loads((REPO / "reports" / "soak.json").read_text())
    section = README.read_text().split("## Reliability")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if re.match(r"^\| [\d,]+ \|", line))
    cells = [c.strip() for c in row.strip("|").split("|")]
    by_status = soak["answers_by_status"]
    refused = sum(n for status, n in by_status.items() if status.startswith("4"))
    assert cells[0] == f"{soak['requests_sent']:,}"
    assert cells[1] == f"{by_status.get('200', 0):,}"
    assert cells[2] == f"{refused:,}"
    assert cells[3].startswith(f"{soak['lost_requests']} ")
    gaps = soak["longest_gap_without_answer_s"]
    assert (
        f"{gaps['/api/predict']} s on `/api/predict`" in cells[4] and f"{gaps['/predict']} s on `/predict`" in cells[4]
    )
