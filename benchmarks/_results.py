"""What every benchmark script does last: name the commit and write its JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(given: str = "") -> str:
    """`given` when set (a run on a copy without git history), else the checkout's short hash."""
    return given or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()


def write_results(path: str | Path, meta: dict, **sections) -> Path:
    """Write {"meta": meta, **sections} (by default sections = rows=[...]) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **sections}, indent=2))
    return path
