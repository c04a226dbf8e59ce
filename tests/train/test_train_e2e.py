"""launch/train.py end to end: launchers, exact resume after SIGKILL, NaN skipping, artifacts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fusiontree.checkpoint import CheckpointManager, safe_load
from tests.train.conftest import (HANG_TIMEOUT_S, ROOT, Background, env, losses, metrics, run, run_side_by_side,
                                  shm_leftovers, train_cmd, write_config)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# The trainer-level compile tests trace with the aot_eager backend: the same Dynamo capture,
# recompilation and AOT-autograd graphs as Inductor, without its C++ code generation, which
# costs minutes per graph on a cold 2-core CPU. Inductor's kernels are tested against eager at
# the model level (tests/models/test_compile.py) and, on a GPU, through the trainer
# (tests/train/test_train_gpu.py).
COMPILE = {"compile": True, "compile_backend": "aot_eager"}


# Synchronous saves at ZeRO-0, background saves at ZeRO-2 (ZeRO-2 sharded optimizer files and
# the background writer together); the random-kill test of the checkpoint module covers both
# save modes at every moment of a save. The ZeRO-2 case runs torch's fused AdamW (the CUDA
# default), whose state saves and resumes through DeepSpeed's sharded files as well.
@pytest.mark.parametrize("zero,async_save,optimizer", [(0, False, "auto"), (2, True, "fused")])
def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path, train_shards, zero, async_save, optimizer):
    """SIGKILL mid-run, then --resume auto: bitwise the uninterrupted losses. With background
    saves the kill may land while the step-6 checkpoint is still being written: then the
    resume starts from step 3, and must still give the same losses."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    kw = dict(async_checkpoint=async_save, optimizer_impl=optimizer)
    cfg = write_config(tmp_path / "cut.yaml", train_shards, cut_dir, **kw)
    # The uninterrupted run goes side by side with the run that is killed: neither reads the other.
    with Background(train_cmd(write_config(tmp_path / "full.yaml", train_shards, full_dir, **kw), zero=zero)) as full:
        proc = subprocess.Popen(train_cmd(cfg, zero=zero), env=env(), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + HANG_TIMEOUT_S
        while time.time() < deadline:  # kill once step 7 is logged: after the step-6 checkpoint
            if (cut_dir / "metrics.jsonl").exists() and max(losses(cut_dir) or [0]) >= 7:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _ok(full.result())
    want = losses(full_dir)
    assert sorted(want) == list(range(1, 11))
    _check_stall_parts(full_dir, async_save)
    # killed mid-run, it still left no shared-memory buffers behind (they are unlinked at start)
    assert shm_leftovers(proc.args) == []
    done = max(losses(cut_dir))
    assert 7 <= done < 10, f"the run was not interrupted mid-way (reached step {done})"
    latest = CheckpointManager(cut_dir / "checkpoints", 0, 2).latest_valid()
    resumable = ("step_00000006", "step_00000009") + (("step_00000003",) if async_save else ())
    assert latest is not None and latest.name in resumable

    res = run(train_cmd(cfg, zero=zero, extra=["--resume", "auto"]))
    _ok(res)
    assert f"resumed from {latest}" in res.stderr
    assert f"optimizer: torch AdamW, {'fused' if optimizer == 'fused' else 'multi-tensor'}" in res.stderr
    got = losses(cut_dir)
    assert got == want  # bitwise: same floats at every step
    # and the same final state: weights, every rank's RNG, loader and gate statistics
    end_full, end_cut = full_dir / "checkpoints/step_00000010", cut_dir / "checkpoints/step_00000010"
    w_full, w_cut = safe_load(end_full / "model.pt"), safe_load(end_cut / "model.pt")
    assert w_full.keys() == w_cut.keys() and all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
    for rank in (0, 1):
        t_full = safe_load(end_full / f"trainer_rank{rank:05d}.pt")
        t_cut = safe_load(end_cut / f"trainer_rank{rank:05d}.pt")
        for t in (t_full, t_cut):  # the run directories differ, the checkpoints' names do not
            t["state"]["last_checkpoint"] = os.path.basename(t["state"]["last_checkpoint"])
        assert t_full["state"] == t_cut["state"] and t_full["loader"] == t_cut["loader"]
        assert _same(t_full["rng"], t_cut["rng"]) and _same(t_full["gate_monitor"], t_cut["gate_monitor"])
        if rank == 0:  # the rank that gathers the gate statistics
            assert any(layer["updates"] for layer in t_full["gate_monitor"]["layers"])
    # the curriculum moved to seq_len 128 after 5120 tokens, in both runs
    assert [m["seq_len"] for m in metrics(cut_dir) if "seq_len" in m] == [64] * 5 + [128] * 5


def _check_stall_parts(run_dir, async_save: bool) -> None:
    """Each saving step's row has the training loop's wait for the save and its parts, which
    add up to no more than the whole; a part's shares ("part/share") add up to the part. With
    background saves, the first step's row has the wait for preparing their host buffers (a
    collective dry run of the engine's save), which left nothing beside the checkpoints."""
    parts = {"model_state", "previous_save", "engine_state"} | (
        {"buffer_allocation_wait", "trainer_state_and_copies"} if async_save
        else {"trainer_and_model_files", "finalize"})
    shares = {} if not async_save else {
        "engine_state": {"pinned_alloc", "d2h_enqueue", "state_walk", "deepspeed"},
        "trainer_state_and_copies": {"pinned_alloc", "d2h_enqueue", "d2h_wait", "state_walk"}}
    rows = metrics(run_dir)
    saved = [r for r in rows if "checkpoint_stall_s" in r]
    assert [r["step"] for r in saved] == [3, 6, 9]
    for r in saved:
        got = {k.split("/", 1)[1][:-2]: v for k, v in r.items() if k.startswith("checkpoint_stall/")}
        top = {k: v for k, v in got.items() if "/" not in k}
        assert set(top) == parts, got
        assert {k for k in got if "/" in k} == {f"{p}/{s}" for p in shares for s in shares[p]}, got
        assert all(v >= 0 for v in got.values()) and sum(top.values()) <= r["checkpoint_stall_s"] + 1e-6, r
        for part in shares:
            assert abs(sum(v for k, v in got.items() if k.startswith(part + "/")) - got[part]) < 1e-6, r
        if async_save:  # CPU tensors: no pinned buffers
            assert r["checkpoint_buffers/new_pinned_bytes"] == 0, r
    prepared = [r["step"] for r in rows if "checkpoint_prepare_s" in r]
    assert prepared == ([1] if async_save else []), prepared
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["step_00000006", "step_00000009", "step_00000010"]


def _same(a, b) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_run_artifacts_and_checkpoint_contents(tmp_path, train_shards):
    out = tmp_path / "run"
    res = run(train_cmd(write_config(tmp_path / "c.yaml", train_shards, out, steps=6, profile_steps=[4]),
                        launcher="python"))
    _ok(res)
    # the profiled step: its wall time and the trainer's phases, one of each per micro-batch
    prof = (out / "profile" / "step_4.txt").read_text()
    assert prof.startswith("optimizer step 4\nwall ")
    for phase in ("forward", "loss", "backward", "engine_step"):  # 1024 tokens in micro-batches of 256
        assert f"fusiontree.{phase}: 4 x, host " in prof, (phase, prof[:600])
    # the start-up clock: the first step's parts add up to it, and the phases to the whole
    first = metrics(out)[0]
    parts = [first[f"startup/first_{p}_s"] for p in ("forward", "loss", "backward", "engine_step", "step_rest")]
    assert abs(sum(parts) - first["startup/first_step_s"]) < 1e-6 and min(parts) >= 0
    phases = ("imports", "distributed", "data", "model_and_engine", "first_step")
    assert abs(sum(first[f"startup/{p}_s"] for p in phases) - first["startup_s"]) < 1e-3, first
    for name in ("metrics.jsonl", "loss_curve.png", "config.yaml", "pruning_plan.json", "sample.txt", "logs/rank000.log"):
        assert (out / name).is_file(), name
    rows = metrics(out)
    assert any("val_loss" in r for r in rows) and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert {"grad_norm", "lr", "tokens_per_s", "mfu", "mem_gib", "skipped_steps"} <= set(rows[0])
    ckpt = CheckpointManager(out / "checkpoints", 0, 1).latest_valid()
    assert ckpt.name == "step_00000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["tokens_seen"] == 6 * 1024 and meta["tokenizer"].endswith("tokenizer.model")
    trainer = safe_load(ckpt / "trainer_rank00000.pt")
    assert trainer["state"]["step"] == 6 and "loader" in trainer and "rng" in trainer
    weights = safe_load(ckpt / "model.pt")
    assert "embed.weight" in weights
    # resuming a finished run into the same directory without --resume is refused (no data lost)
    res = run(train_cmd(write_config(tmp_path / "c.yaml", train_shards, out, steps=6), launcher="python"))
    assert res.returncode != 0 and "already holds checkpoints" in res.stderr


def test_torchrun_launch_with_zero3_and_activation_checkpointing(tmp_path, train_shards):
    out, ref = tmp_path / "run", tmp_path / "ref"
    res, ref_res = run_side_by_side(
        train_cmd(write_config(tmp_path / "c.yaml", train_shards, out, steps=3, activation_checkpointing=True),
                  launcher="torchrun", zero=3),
        train_cmd(write_config(tmp_path / "r.yaml", train_shards, ref, steps=3), zero=2))
    _ok(res)
    _ok(ref_res)
    got, want = losses(out), losses(ref)
    assert sorted(got) == [1, 2, 3]
    for s in want:  # ZeRO-3 + recomputation change the arithmetic order only
        assert abs(got[s] - want[s]) < 1e-4, (s, got[s], want[s])


# The host decision, and the decision left on the device (fused AdamW skips the update itself).
@pytest.mark.parametrize("optimizer", [{}, {"optimizer_impl": "fused", "skip_on_device": True}])
def test_nan_step_is_skipped_counted_and_training_continues(tmp_path, train_shards, optimizer):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", train_shards, out, steps=5, inject_nan_steps=[3], checkpoint_every_steps=1,
                       **optimizer)
    res = run(train_cmd(cfg, nproc=2, zero=2))
    _ok(res)
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}  # strict JSON: the NaN loss is null
    assert rows[3]["loss"] is None and rows[3]["skipped_steps"] == 1
    assert rows[2]["skipped_steps"] == 0 and rows[5]["skipped_steps"] == 1
    assert all(math.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 5))
    assert "step 3 skipped" in res.stderr
    # no checkpoint was written for the bad step; the weights it would hold equal step 2's
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert "step_00000003" not in steps
    # the lr schedule did not advance on the skipped step
    assert rows[4]["lr"] == rows[3]["lr"]


def test_clipping_inside_the_fused_adamw_trains_as_deepspeeds_clipping(tmp_path, train_shards):
    """Fused AdamW under ZeRO-1, a clip bound every step exceeds: with the decision and the
    clipping on the device (the optimizer divides by DeepSpeed's clip factor) the trainer takes
    the steps DeepSpeed's own clipping takes; without clipping the losses move away."""
    runs = {}
    for name, train in (("host", {"skip_on_device": False}), ("device", {"skip_on_device": True}),
                        ("unclipped", {"skip_on_device": True, "grad_clip": 0.0})):
        runs[name] = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", train_shards, runs[name], steps=4, optimizer_impl="fused",
                           eval_every_steps=100, save_checkpoints=False,
                           **{"grad_clip": 0.05, **train})
        runs[name] = (runs[name], train_cmd(cfg, launcher="python", zero=1))
    results = run_side_by_side(*(cmd for _, cmd in runs.values()))
    for res in results:
        _ok(res)
    host, device, unclipped = (losses(d) for d, _ in runs.values())
    assert sorted(host) == sorted(device) == [1, 2, 3, 4]
    assert "inside the fused AdamW" in results[1].stderr and "inside the fused AdamW" not in results[0].stderr
    gap = max(abs(host[s] - device[s]) for s in host)
    # Adam undoes most of a constant clip factor, so the unclipped run moves away by ~1e-3 only
    assert gap < 1e-5 and abs(unclipped[4] - host[4]) > 30 * max(gap, 1e-5), (host, device, unclipped)


def test_consecutive_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, train_shards):
    out = tmp_path / "run"
    """train.max_bad_steps=2: the second bad step in a row stops the run (steps 3 and 4 of 3-5)."""
    cfg = write_config(tmp_path / "c.yaml", train_shards, out, steps=8, inject_nan_steps=[3, 4, 5],
                       max_bad_steps=2, checkpoint_every_steps=2)
    res = run(train_cmd(cfg, launcher="python", zero=0))
    assert res.returncode != 0
    assert "stopping: 2 consecutive steps with non-finite loss" in res.stderr
    assert 5 not in losses(out)
    latest = CheckpointManager(out / "checkpoints", 0, 1).latest_valid()
    assert latest.name == "step_00000002"
    w = safe_load(latest / "model.pt")
    assert all(torch.isfinite(t).all() for t in w.values())


# TP=2 needs Mamba groups that split; a curriculum change of length after step 2.
TP_EXTRA = ["--model.ssm_groups=2", "--data.global_batch_tokens=512",
            "--data.curriculum=[{seq_len: 64, until_tokens: 1024}, {seq_len: 128, until_tokens: 0}]"]
TP_CASES = [(1, True), (3, False)]  # (ZeRO stage, compiled blocks)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, train_shards) -> dict:
    """The tensor-parallel runs and their reference, 4 eager steps in one process (ZeRO-0), side
    by side: none reads another's output. (zero, compile) -> (result, run dir); "one" -> run dir."""
    root = tmp_path_factory.mktemp("tp_runs")
    one = root / "one"
    cmds = [train_cmd(write_config(root / "one.yaml", train_shards, one, steps=4), launcher="python", zero=0,
                      extra=TP_EXTRA)]
    for zero, compile in TP_CASES:
        cmds.append(train_cmd(write_config(root / f"tp{zero}.yaml", train_shards, root / f"tp{zero}", steps=4,
                                           **(COMPILE if compile else {})),
                              zero=zero,
                              extra=TP_EXTRA + ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"]))
    one_res, *tp_res = run_side_by_side(*cmds)
    _ok(one_res)
    out = {"one": one}
    for (zero, compile), res in zip(TP_CASES, tp_res):
        out[zero, compile] = (res, root / f"tp{zero}")
    return out


@pytest.mark.parametrize("zero,compile", TP_CASES)
def test_tensor_and_sequence_parallel_training_matches_one_process(tp_runs, zero, compile):
    """launch/train.py with TP=2 + sequence parallelism (ZeRO-1 with compiled blocks, or ZeRO-3,
    over a data-parallel size of 1) gives the single-process eager run's losses to fp32
    round-off, across a curriculum change of length after step 2 (compiled: a second graph),
    and its model.pt is the plain model."""
    one = tp_runs["one"]
    res, tp = tp_runs[zero, compile]
    _ok(res)
    if compile:
        assert int(res.stderr.split("train.compile: ")[1].split(" graphs")[0]) >= 2, res.stderr[-2000:]
    assert "tensor parallel 2 (+ sequence parallel) x data parallel 1" in res.stderr
    want, got = losses(one), losses(tp)
    assert sorted(got) == [1, 2, 3, 4]
    assert [r["seq_len"] for r in metrics(tp) if "tokens_per_s" in r] == [64, 64, 128, 128]
    for s in want:
        assert abs(got[s] - want[s]) < 1e-4, (s, got[s], want[s])
    w_one = safe_load(one / "checkpoints/step_00000004/model.pt")
    w_tp = safe_load(tp / "checkpoints/step_00000004/model.pt")
    assert json.loads((tp / "checkpoints/step_00000004/meta.json").read_text())["zero_stage"] == zero
    assert w_one.keys() == w_tp.keys()
    for k in w_one:
        torch.testing.assert_close(w_tp[k], w_one[k], rtol=1e-3, atol=1e-4, msg=k)
