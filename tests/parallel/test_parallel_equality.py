"""Tensor-, sequence- and data-parallel model == single-device model, across real processes.

The ranks are spawned once per world size (start-up, not the scenarios, dominates the cost on
two CPU cores) and run every scenario of `workers.SCENARIOS` for that size; each test below
reads one scenario's result. CPU + gloo by default; NCCL on GPUs (see workers.py).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.parallel.workers import SCENARIOS, run_rank

DEVICE = os.environ.get("FT_PARALLEL_DEVICE") or ("cuda" if torch.cuda.device_count() >= 2 else "cpu")
DTYPE = os.environ.get("FT_PARALLEL_DTYPE", "fp32")
# A guard against a hung rank, not a time budget: on two cores shared with other test runs the
# scenarios take many times their idle time.
TIMEOUT_S = float(os.environ.get("FT_PARALLEL_TIMEOUT_S", "1800"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int) -> dict:
    names = [n for n, (procs, fp32_only, _) in SCENARIOS.items()
             if procs == world and not (fp32_only and DTYPE != "fp32")]
    if DEVICE == "cuda" and torch.cuda.device_count() < world:
        return {"__skip__": f"{world} ranks need {world} GPUs, {torch.cuda.device_count()} visible"}
    # DeepSpeed builds its CPU comm op once per venv, not once per run (the Makefile sets the same).
    venv = Path(__file__).resolve().parents[2] / ".venv"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(venv / "torch_extensions"))
    os.environ.setdefault("DS_ACCELERATOR", DEVICE)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        ctx = mp.start_processes(run_rank, args=(world, _free_port(), names, out, DEVICE, DTYPE), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    break
        except mp.ProcessExitedException:
            pass  # a rank ended early: its results file says why
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        per_rank = []
        for r in range(world):
            f = Path(out) / f"results_{r}.json"
            per_rank.append(json.loads(f.read_text()) if f.exists() else {})
    print(f"\n{world} ranks on {DEVICE} ({DTYPE}): {time.perf_counter() - t0:.1f} s")
    merged = {}
    for name in names:
        got = [pr.get(name) for pr in per_rank]
        if any(g is None for g in got):
            earlier = [e for pr in per_rank for g in pr.values() if not g["ok"] for e in g["errors"]]
            merged[name] = {"ok": False, "errors": ["did not run on every rank (a rank ended or hung); earlier "
                                                    "failures:"] + earlier[:5]}
        else:
            worst = {}
            for g in got:
                for k, (e_max, e_norm) in g.get("worst", {}).items():
                    w = worst.get(k, (0.0, 0.0))
                    worst[k] = (max(w[0], e_max), max(w[1], e_norm))
            worst = {k: f"{a:.1e}/{b:.1e}" for k, (a, b) in worst.items()}
            merged[name] = {"ok": all(g["ok"] for g in got), "errors": [e for g in got for e in g["errors"]],
                            "worst": worst, "seconds": max(g["seconds"] for g in got)}
        print(f"  {name}: {'ok' if merged[name]['ok'] else 'FAIL'} {merged[name].get('seconds', 0):.1f} s "
              f"worst relative errors (max/norm) {merged[name].get('worst')}")
    return merged


_cache: dict[int, dict] = {}


def _result(name: str) -> dict:
    world, fp32_only, _ = SCENARIOS[name]
    if fp32_only and DTYPE != "fp32":
        pytest.skip(f"{name} runs in fp32 only (DeepSpeed keeps fp32 master weights; the reference does not)")
    if world not in _cache:
        _cache[world] = _run_world(world)
    res = _cache[world]
    if "__skip__" in res:
        pytest.skip(res["__skip__"])
    return res[name]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parallel_matches_single_device(name):
    res = _result(name)
    assert res["ok"], "\n".join(res["errors"])
