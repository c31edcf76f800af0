"""Render ``deploy/kubernetes/rayservice.yaml`` from its template and ``deploy/serve_config.gpu.yaml``.

The RayService's ``serveConfigV2`` must be the same Serve application as the GPU config used by
``serve deploy`` and ``cluster.yaml``, so it is not written by hand: this script pastes the GPU config,
verbatim, into the template's ``serveConfigV2: |`` block, and the Ray-wide switches of ``python -m serve.launch``
(``serve.launch.FAST_INGRESS_ENV``) into the environment of every Ray container (``- __FAST_INGRESS_ENV__``).
``tests/test_ops_config.py`` re-renders and compares.

Run from anywhere::

    python deploy/render_rayservice.py           # rewrite deploy/kubernetes/rayservice.yaml
    python deploy/render_rayservice.py --check   # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from serve.launch import FAST_INGRESS_ENV

DEPLOY_DIR = Path(__file__).resolve().parent
SERVE_CONFIG = DEPLOY_DIR / "serve_config.gpu.yaml"
TEMPLATE = DEPLOY_DIR / "kubernetes" / "rayservice.template.yaml"
OUTPUT = DEPLOY_DIR / "kubernetes" / "rayservice.yaml"
PLACEHOLDER = "__SERVE_CONFIG__"
ENV_PLACEHOLDER = "- __FAST_INGRESS_ENV__"
INDENT = " " * 4  # the block scalar under `  serveConfigV2: |`


def render(serve_config: Path = SERVE_CONFIG, template: Path = TEMPLATE) -> str:
    """The RayService manifest text with ``serve_config`` embedded as ``serveConfigV2``."""
    config_text = serve_config.read_text()
    parsed = yaml.safe_load(config_text)
    if not isinstance(parsed, dict) or not parsed.get("applications"):
        raise ValueError(f"{serve_config} is not a Serve config with `applications`")
    if "\t" in config_text:
        raise ValueError(f"{serve_config} contains tabs, which YAML block scalars cannot hold")
    block = "\n".join(INDENT + line if line.strip() else "" for line in config_text.strip("\n").splitlines())
    template_text = template.read_text()
    if template_text.count(PLACEHOLDER) != 1:
        raise ValueError(f"{template} must contain {PLACEHOLDER} exactly once")
    lines = []
    for line in template_text.replace(PLACEHOLDER, block).splitlines():
        if line.strip() == ENV_PLACEHOLDER:
            pad = line[: len(line) - len(line.lstrip())]
            lines += [f"{pad}- {{name: {k}, value: {json.dumps(v)}}}" for k, v in FAST_INGRESS_ENV.items()]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def serve_config_of(manifest_text: str) -> dict[str, Any]:
    """The parsed ``serveConfigV2`` of a RayService manifest."""
    manifest = yaml.safe_load(manifest_text)
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is out of date")
    args = parser.parse_args(argv)
    text = render()
    if serve_config_of(text) != yaml.safe_load(SERVE_CONFIG.read_text()):  # guards the indentation logic
        raise RuntimeError("rendered serveConfigV2 does not parse back to the GPU serve config")
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python deploy/render_rayservice.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
