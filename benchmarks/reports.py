"""Writing a benchmark's report: the JSON (every number) and the Markdown table side by side, each atomically."""
from __future__ import annotations

from pathlib import Path

from invdiff.io import atomic_open, atomic_write_json


def write_json_and_markdown(out: Path, stem: str, report, markdown_text: str, *, json_default=None) -> Path:
    """``out/<stem>.json`` and ``out/<stem>.md`` (``out`` created if missing); returns the JSON path. A reader never
    sees half a file: each is written to a temporary name and renamed. ``json_default``: as ``json.dumps``'s
    ``default`` (e.g. ``str``)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out / f"{stem}.json", report, default=json_default)
    with atomic_open(out / f"{stem}.md", "w") as handle:
        handle.write(markdown_text)
    return json_path
