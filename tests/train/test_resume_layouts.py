"""Resuming on another number of processes: a checkpoint of one layout (data-parallel size,
tensor-parallel size, ZeRO stage) continues under another with the uninterrupted run's
losses, gradient norms and final weights (to fp32 round-off: the reductions are ordered
differently), the loader reading the samples the uninterrupted run reads."""

from __future__ import annotations

import torch

from fusiontree.checkpoint import safe_load
from tests.train.conftest import losses, metrics, run, train_cmd, write_config

# TP=2 needs Mamba groups that split; a global batch of 2 micro-batches: one per rank on two
# data-parallel ranks, two accumulated on one. A constant learning rate after warm-up, so
# that a segment's train.steps (how far it runs) does not change the schedule.
EXTRA = ["--model.ssm_groups=2", "--data.global_batch_tokens=512", "--train.lr_decay=constant",
         "--generate.max_new_tokens=2"]

# Runs of two processes start through torchrun, which starts the ranks from its own process (the
# deepspeed launcher imports DeepSpeed in two processes first); what is resumed does not depend
# on the launcher, and the deepspeed launcher's runs are tested in test_train_e2e.py.
# (processes, ZeRO stage, tensor_parallel, last step): every stage is read and written across
# a change of size: 2 -> 1 (ZeRO-0 -> 2), 1 -> 2 (2 -> 3), DP 2 -> TP 2 (3 -> 1), TP 2 -> 1 (1 -> 0)
SEGMENTS = [(2, 0, 1, 2), (1, 2, 1, 4), (2, 3, 1, 5), (2, 1, 2, 6), (1, 0, 1, 7)]


def _ok(res) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_resume_across_data_and_tensor_parallel_sizes_and_zero_stages(tmp_path, train_shards):
    steps = SEGMENTS[-1][-1]
    ref, chain = tmp_path / "ref", tmp_path / "chain"
    common = dict(steps=steps, eval_every_steps=100, checkpoint_every_steps=100, gate_stats_every_steps=2)
    _ok(run(train_cmd(write_config(tmp_path / "ref.yaml", train_shards, ref, **common), launcher="torchrun",
                      nproc=2, zero=2, extra=EXTRA)))
    cfg = write_config(tmp_path / "chain.yaml", train_shards, chain, **common)
    previous = None
    for procs, zero, tp, last in SEGMENTS:
        extra = [*EXTRA, f"--train.steps={last}", f"--parallel.tensor_parallel={tp}"]
        if previous is not None:
            extra += ["--resume", "auto", "--allow_config_change", "train.steps"]
        res = run(train_cmd(cfg, launcher="torchrun" if procs > 1 else "python", nproc=procs, zero=zero,
                            extra=extra))
        _ok(res)
        if previous is not None:
            assert "resharded" in res.stderr and f"ZeRO-{previous[1]}" in res.stderr, res.stderr[-3000:]
        previous = (procs, zero, tp)

    want, got = {r["step"]: r for r in metrics(ref) if "loss" in r}, {r["step"]: r for r in metrics(chain) if "loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for s in want:
        assert abs(got[s]["loss"] - want[s]["loss"]) < 1e-4, (s, got[s]["loss"], want[s]["loss"])
        # a uniform gradient-scale error (sum vs mean over ranks or micro-batches) shows here
        assert abs(got[s]["grad_norm"] - want[s]["grad_norm"]) < 1e-3 * want[s]["grad_norm"], s
    assert losses(chain)[steps] != losses(chain)[1]  # it trained
    w_ref = safe_load(ref / f"checkpoints/step_{steps:08d}/model.pt")
    w_chain = safe_load(chain / f"checkpoints/step_{steps:08d}/model.pt")
    assert w_ref.keys() == w_chain.keys()
    for k in w_ref:  # the Adam moments came along: weights after several steps agree
        torch.testing.assert_close(w_chain[k], w_ref[k], rtol=1e-3, atol=1e-4, msg=k)
