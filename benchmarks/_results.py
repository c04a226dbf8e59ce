"""Helpers the GPU benchmark scripts share: time a span of calls, name the commit, write JSON,
know a card's memory bandwidth."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# HBM bandwidth by card name (TB/s, the vendors' figures).
HBM_TB_PER_S = {"H200": 4.8, "H100 80GB HBM3": 3.35}


def hbm_tb_per_s(card_name: str) -> float | None:
    """The bandwidth of a card named like `torch.cuda.get_device_name()`, None if not known."""
    return next((tb for key, tb in HBM_TB_PER_S.items() if key in card_name), None)


def cuda_span_ms(fn, repeats: int) -> float:
    """Mean GPU time per call of `repeats` back-to-back calls of `fn`, between two CUDA events
    around the whole span (calls overlap their host work with the GPU as in real use)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


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
