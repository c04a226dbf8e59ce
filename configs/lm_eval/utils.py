"""Datasets of the local task pack: jsonl files written by launch/lm_eval_tasks.py.

The files are read from `data_dir` (lm_eval --metadata '{"data_dir": "..."}'), else the
FUSIONTREE_LM_EVAL_DATA environment variable, else data/lm_eval in the repository. Nothing is
downloaded: the tasks run offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "lm_eval"


def _load(file: str, data_dir: str | None = None, **_):
    import datasets

    root = Path(data_dir or os.environ.get("FUSIONTREE_LM_EVAL_DATA") or DEFAULT_DIR)
    path = root / file
    if not path.is_file():
        raise ValueError(f"{path} does not exist; write the task data first: python launch/lm_eval_tasks.py "
                         f"--shards data/shards --out {root}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty; rebuild it with launch/lm_eval_tasks.py")
    return {"test": datasets.Dataset.from_list(rows)}


def nextline(**kwargs):
    return _load("nextline.jsonl", **kwargs)


def code_choice(**kwargs):
    return _load("code_choice.jsonl", **kwargs)


def heldout_text(**kwargs):
    return _load("heldout_text.jsonl", **kwargs)
