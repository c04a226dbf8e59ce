"""launch/eval.py on a tiny checkpoint: every task, and pruning before/after in one report."""

import json

import pytest
import torch

from launch.eval import main
from tests.eval.conftest import write_checkpoint


def test_eval_cli_runs_every_task_and_compares_a_pruned_copy(tmp_path, eval_shards):
    ckpt, _ = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", eval_shards, seed=2)
    state = torch.load(ckpt / "model.pt")
    state["layers.1.gate.bias"].fill_(40.0)  # layer 1 (global): Mamba off
    torch.save(state, ckpt / "model.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["model.pt"] = (ckpt / "model.pt").stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"prune": [{"layer": 1, "branch": "mamba"}]}))
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tmp_path / "run"), "--tasks", "ppl,needle,nextline,system", "--out", str(out),
            "--device", "cpu", "--prune", str(plan), "--ppl.max_batches=1", "--ppl.files_max_tokens=1000",
            "--needle.contexts=[96,128]", "--needle.depths=[0,1]", "--needle.trials=2",
            "--nextline.samples=4", "--nextline.max_new_tokens=8",
            "--system.contexts=[64]", "--system.decode_steps=3", "--system.train_seq_len=64",
            "--system.train_micro_batch=1"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["checkpoint"] == str(ckpt)  # the run directory resolved to its latest checkpoint
    orig, pruned = res["models"]["original"], res["models"]["pruned"]
    assert set(orig) == set(pruned) == {"ppl", "needle", "nextline", "system"}
    assert res["pruning"]["removed"] == ["1:mamba"]
    assert res["pruning"]["params_after"] < res["pruning"]["params_before"]
    # the branch was off: perplexity agrees to round-off, the pruned model is smaller
    assert pruned["ppl"]["ppl"] == pytest.approx(orig["ppl"]["ppl"], rel=1e-4)
    assert pruned["system"]["params"] < orig["system"]["params"]
    assert (out / "needle_heatmap.png").is_file() and (out / "pruned" / "needle_heatmap.png").is_file()
    report = (out / "report.md").read_text()
    assert "| original |" in report and "| pruned |" in report and "## Pruning" in report


def test_eval_cli_reports_a_missing_plan(tmp_path, eval_shards):
    ckpt, _ = write_checkpoint(tmp_path / "ck", eval_shards)
    with pytest.raises(ValueError, match="the checkpoint has none"):
        main(["--checkpoint", str(ckpt), "--tasks", "ppl", "--prune", "auto", "--out", str(tmp_path / "e")])
