"""Re-run the API examples' curl commands (``docs/api.md``) against a running service and paste their real output.

    serve run deploy/serve_config.yaml &          # then, once /api/health says ok:
    python deploy/refresh_readme_examples.py      # rewrites the ```json block after each ```bash curl block

Only the text between ``docs/api.md``'s ``<!-- section:api -->`` markers is touched, and only ``bash`` blocks
holding a single ``curl`` command that are followed by a ``json`` block. Run it from the repository root (the
examples upload ``tests/fixtures/*``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
START, END = "<!-- section:api -->", "<!-- /section:api -->"
EXAMPLE = re.compile(r"(```bash\n(curl [^\n]+)\n```\n\n```json\n)(.*?)(\n```)", re.DOTALL)


def refresh(text: str, url: str) -> tuple[str, int]:
    """Return ``text`` with every example's JSON replaced by the live answer, and how many were run."""
    count = 0

    def run(match: re.Match[str]) -> str:
        nonlocal count
        command = match.group(2).replace("localhost:8000", url)
        out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, check=True).stdout
        count += 1
        return match.group(1) + json.dumps(json.loads(out), indent=2) + match.group(4)

    return EXAMPLE.sub(run, text), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8000", help="host:port of the running service")
    args = parser.parse_args()
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    section, tail = rest.split(END, 1)
    section, count = refresh(section, args.url)
    DOC.write_text(head + START + section + END + tail)
    print(f"refreshed {count} examples in {DOC}")


if __name__ == "__main__":
    main()
