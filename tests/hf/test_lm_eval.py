"""lm-evaluation-harness: `--model fusiontree` on a checkpoint and `--model hf` on its export score
the local task pack (configs/lm_eval) the same, request by request, fully offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusiontree.eval.perplexity import heldout_files
from fusiontree.hf.task_data import build_task_data
from tests.hf.conftest import ROOT, train_env

TASKS = ("fusiontree_nextline", "fusiontree_code_choice", "fusiontree_heldout_text")


def lm_eval(runs: dict[str, list[str]], data: Path, tmp_path: Path) -> dict[str, dict]:
    """Runs of lm-eval (name -> command), side by side: each spends most of its time starting up
    on one core. Each writes under tmp_path / name; returns name -> its results and samples."""
    procs = {}
    try:
        for name, args in runs.items():
            env = dict(train_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       HF_HOME=str(tmp_path / f"hf_home_{name}"), TOKENIZERS_PARALLELISM="false")
            common = ["--tasks", "fusiontree_local", "--include_path", str(ROOT / "configs/lm_eval"),
                      "--device", "cpu", "--batch_size", "3", "--metadata", json.dumps({"data_dir": str(data)}),
                      "--output_path", str(tmp_path / name), "--log_samples"]
            with open(tmp_path / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen([*args, *common], env=env, stdout=log, stderr=subprocess.STDOUT,
                                               cwd=tmp_path, stdin=subprocess.DEVNULL)
        for p in procs.values():
            p.wait(timeout=600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: " + (tmp_path / f"{name}.log").read_text()[-6000:]
    return {name: _read_results(tmp_path / name) for name in runs}


def _read_results(out: Path) -> dict:
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in TASKS:
        rows = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        samples[task] = {r["doc_id"]: r["resps"] for r in rows}
    return {"results": results, "samples": samples}


@pytest.fixture(scope="module")
def task_data(hf_shards, tmp_path_factory) -> Path:
    files = heldout_files(str(hf_shards))
    assert files, "the test shards put no .py file in the val split"
    out = tmp_path_factory.mktemp("lm_eval_data")
    counts = build_task_data(files, out, samples=6, texts=2, context_chars=400, text_chars=1200, seed=1)
    assert counts["nextline"] == counts["code_choice"] == 6 and counts["heldout_text"] == 2
    return out


def test_native_backend_and_export_score_the_same(layout_exports, task_data, tmp_path):
    ckpt, hf = layout_exports["parallel-token"]
    runs = lm_eval({"native": [sys.executable, str(ROOT / "launch/lm_harness.py"), "--model", "fusiontree",
                               "--model_args", f"checkpoint={ckpt}"],
                    "hf": [sys.executable, "-m", "lm_eval", "--model", "hf",
                           "--model_args", f"pretrained={hf},trust_remote_code=True"]}, task_data, tmp_path)
    native, export = runs["native"], runs["hf"]

    # the generations: the same text for every question, and not trivially empty
    gen_native, gen_hf = native["samples"]["fusiontree_nextline"], export["samples"]["fusiontree_nextline"]
    assert gen_native == gen_hf
    assert sum(bool(r[0][0]) for r in gen_native.values()) >= 3, gen_native
    # every loglikelihood (sums over up to hundreds of tokens) to fp32 round-off, greedy flags equal
    for task in ("fusiontree_code_choice", "fusiontree_heldout_text"):
        a, b = native["samples"][task], export["samples"][task]
        assert a.keys() == b.keys()
        for doc in a:
            assert len(a[doc]) == len(b[doc])
            for ra, rb in zip(a[doc], b[doc]):
                # one response per choice: [[loglikelihood, is_greedy]]; rolling: [loglikelihood]
                ra, rb = (r[0] if isinstance(r[0], list) else r for r in (ra, rb))
                assert math.isclose(float(ra[0]), float(rb[0]), rel_tol=1e-5, abs_tol=1e-3), (task, doc, ra, rb)
                assert ra[1:] == rb[1:], (task, doc, ra, rb)
    # the scores
    for task in TASKS:
        ra, rb = native["results"][task], export["results"][task]
        for metric in ("exact_match,none", "acc,none", "acc_norm,none"):
            if metric in ra:
                assert ra[metric] == rb[metric], (task, metric)
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            if metric in ra:
                assert math.isclose(ra[metric], rb[metric], rel_tol=1e-4), (task, metric, ra[metric], rb[metric])
    assert "exact_match,none" in native["results"]["fusiontree_nextline"]
    assert "acc,none" in native["results"]["fusiontree_code_choice"]
    assert "bits_per_byte,none" in native["results"]["fusiontree_heldout_text"]


def test_backend_refuses_bad_arguments(layout_exports):
    from fusiontree.hf.lm_eval_backend import FusionTreeLM

    ckpt, _ = layout_exports["parallel-channel"]
    with pytest.raises(ValueError, match="unknown fusiontree model_args"):
        FusionTreeLM(checkpoint=str(ckpt), device="cpu", pretrained="x")
    with pytest.raises(ValueError, match="batch_size auto"):
        FusionTreeLM(checkpoint=str(ckpt), device="cpu", batch_size="auto")
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="pass --device cpu"):
            FusionTreeLM(checkpoint=str(ckpt), device="cuda:0")


def test_task_data_needs_usable_lines(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="usable lines"):
        build_task_data([empty], tmp_path / "out")
