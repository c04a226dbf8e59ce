"""Mistakes of a command line's user end in one line on stderr and exit status 2, before any
heavy start-up; FusionTree's own bugs and a library's errors keep their traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusiontree.cli import USAGE_ERROR_STATUS, run_main
from fusiontree.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="default")
    env.pop("FUSIONTREE_TRACEBACK", None)
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def _one_line_error(res: subprocess.CompletedProcess, script: str, match: str) -> str:
    """The run ended in exactly one stderr line `<script>: error: ...` that contains `match`."""
    assert res.returncode == USAGE_ERROR_STATUS, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"{Path(script).name}: error: ") and match in lines[0], lines[0]
    return lines[0]


def test_train_config_mistakes_are_one_line(tmp_path):
    res = _run("launch/train.py", "--generate.top_p=0", f"--out_dir={tmp_path / 'run'}")
    _one_line_error(res, "launch/train.py", "generate.top_p=0.0 must lie in (0, 1]")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n lr_peak: 1\n")
    res = _run("launch/train.py", "--config", str(bad))
    _one_line_error(res, "launch/train.py", f"{bad}:3:")
    # refused on GPUs before anything starts (the rule: tests/train/test_startup_checks.py)
    res = _run("launch/train.py", "--train.device=cuda", "--train.compile=true", "--parallel.tensor_parallel=2",
               "--model.ssm_groups=2",
               f"--out_dir={tmp_path / 'run'}")
    _one_line_error(res, "launch/train.py", "set train.compile=false for tensor parallelism")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_eval_names_a_truncated_model_pt(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = load_config(None, ["--model.preset=debug", "--model.vocab_size=512"])
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    torch.save({"w": torch.zeros(100_000)}, ckpt / "model.pt")
    (ckpt / "model.pt").write_bytes((ckpt / "model.pt").read_bytes()[:50_000])
    res = _run("launch/eval.py", "--checkpoint", str(ckpt), "--tasks", "ppl", "--device", "cpu")
    _one_line_error(res, "launch/eval.py", f"{ckpt / 'model.pt'} cannot be read as a weights file")


def test_data_tool_mistakes_are_one_line(tmp_path):
    res = _run("data_pipeline/build_shards.py", "--input", str(tmp_path / "nothing_here"),
               "--output", str(tmp_path / "out"))
    _one_line_error(res, "data_pipeline/build_shards.py", str(tmp_path / "nothing_here"))


def test_only_own_value_errors_are_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("FUSIONTREE_TRACEBACK", raising=False)
    status = run_main(lambda argv: load_config(None, ["--model.d_model=big"]) and 0)
    assert status == USAGE_ERROR_STATUS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: model.d_model='big' must be an integer" in err
    # a library's ValueError is not the user's mistake: its traceback stays
    with pytest.raises(json.JSONDecodeError):
        run_main(lambda argv: json.loads("{"))
    # nor is an internal error of another kind
    with pytest.raises(KeyError):
        run_main(lambda argv: {}["missing"])
    monkeypatch.setenv("FUSIONTREE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="must be an integer"):
        run_main(lambda argv: load_config(None, ["--model.d_model=big"]))
