"""Where the benchmarks write their results: every ``--out``, ``--result-json``, ``--result-csv`` and ``--plot``
path goes through ``output_path``, which makes the missing parent folders first (a fresh clone has no
``results/``, and a benchmark must not crash at its very end, after the whole run, for want of a folder)."""
from __future__ import annotations

import json
from pathlib import Path


def output_path(path: str | Path) -> Path:
    """``path`` as a Path, with its parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, payload) -> None:
    """A benchmark's result (a dict or list, e.g. ``asdict(result)``) as indented JSON at ``path``."""
    output_path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
