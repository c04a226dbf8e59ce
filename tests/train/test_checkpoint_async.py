"""Asynchronous checkpoints: the state is the one of the moment of the save, the directory is
complete or absent, and a failed write is an error in the training thread."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from fusiontree.checkpoint import ENGINE_TAG, CheckpointManager, safe_load


class FakeEngine:
    """The part of DeepSpeed's engine a save uses: `save_checkpoint` hands each state dict to
    `checkpoint_engine.save`."""

    def __init__(self, weights: torch.Tensor):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()
        self.weights = weights

    def save_checkpoint(self, save_dir, tag, save_latest):
        import os

        os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.weights}, "step": 1}, f"{save_dir}/{tag}/model_states.pt")


def test_async_save_writes_the_state_of_the_moment_of_the_save(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32)
    engine = FakeEngine(weights)
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)
    trainer = {"state": {"step": 3}, "rng": torch.tensor([1, 2, 3])}
    path = ckpt.save(engine, 3, trainer, "config: yes\n", {"tokens_seen": 30},
                     model_state={"w": weights.clone()}, extra_files={"pruning_plan.json": "{}"})
    # training goes on and changes everything the save was given
    weights.add_(1.0)
    trainer["state"]["step"] = 4
    trainer["rng"].zero_()
    ckpt.wait()
    assert CheckpointManager.is_valid(path) and ckpt.latest_valid() == path
    saved = safe_load(path / ENGINE_TAG / "model_states.pt")
    torch.testing.assert_close(saved["module"]["w"], torch.arange(1000, dtype=torch.float32))
    t = safe_load(path / "trainer_rank00000.pt")
    assert t["state"]["step"] == 3 and t["rng"].tolist() == [1, 2, 3]
    assert (path / "pruning_plan.json").read_text() == "{}" and (path / "config.yaml").is_file()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")) and not list(path.glob(".done_rank*"))


def test_an_unfinished_async_save_is_not_a_checkpoint(tmp_path, monkeypatch):
    """While the files are written, nothing under checkpoints/ counts as a checkpoint; the
    previous one stays the latest."""
    engine = FakeEngine(torch.zeros(10))
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)
    first = ckpt.save(engine, 1, {"s": 1}, "c\n", {})
    ckpt.wait()
    gate = threading.Event()
    real_save = torch.save

    def slow_save(obj, path, *a, **k):
        gate.wait(10)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", slow_save)
    second = ckpt.save(engine, 2, {"s": 2}, "c\n", {})
    assert not second.exists() and ckpt.latest_valid() == first
    gate.set()
    ckpt.wait()
    assert ckpt.latest_valid() == second


def test_a_failed_async_write_is_raised_by_the_next_wait(tmp_path, monkeypatch):
    engine = FakeEngine(torch.zeros(10))
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)

    def broken_save(obj, path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    ckpt.save(engine, 1, {"s": 1}, "c\n", {})
    with pytest.raises(RuntimeError, match="writing a checkpoint failed: .*No space left"):
        ckpt.wait()
    assert ckpt.latest_valid() is None


def test_model_state_for_an_async_save_is_never_a_live_host_tensor():
    from fusiontree.models.config import model_preset
    from fusiontree.parallel.reshard import consolidated_model_state

    module = torch.nn.Linear(4, 3)
    cfg = model_preset("debug")
    for on_device in (False, True):
        sd = consolidated_model_state(module, cfg, 1, 1, True, on_device=on_device)
        assert all(v.data_ptr() != p.data_ptr() for v, p in zip(sd.values(), module.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device weights go through pinned buffers: needs a GPU")
@pytest.mark.parametrize("prepared", [False, True])
def test_async_save_copies_device_weights_of_the_moment_into_a_host_model_file(tmp_path, prepared):
    from fusiontree.checkpoint import MODEL_FILE

    weights = torch.arange(1 << 20, dtype=torch.bfloat16, device="cuda")
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)
    if prepared:
        ckpt.prepare(FakeEngine(weights), {"w": weights.detach()})
    for step in (1, 2):  # the second save reuses the first one's pinned buffers
        path = ckpt.save(FakeEngine(weights), step, {"state": {"step": step}}, "c: 1\n", {},
                         model_state={"w": weights.detach()})
        assert ckpt.last_save_buffers["new_pinned_bytes"] == (2 << 20 if step == 1 and not prepared else 0)
        want = weights.cpu()
        weights.add_(1.0)  # training goes on
        ckpt.wait()
        got = safe_load(path / MODEL_FILE)["w"]
        assert got.device.type == "cpu" and torch.equal(got, want)
        assert torch.equal(safe_load(path / ENGINE_TAG / "model_states.pt")["module"]["w"].cpu(), want)


def test_a_tensor_in_two_files_of_one_snapshot_is_copied_once():
    from fusiontree.checkpoint import _HostSnapshot

    weights = torch.arange(64, dtype=torch.float32)
    snap = _HostSnapshot()
    a, b = snap.copy({"w": weights, "view": weights[:8]}), snap.copy({"w": weights})
    assert a["w"] is b["w"] and a["view"] is not a["w"]  # same source view: one copy
    snap.begin()
    assert snap.copy({"w": weights})["w"] is not a["w"]  # a new snapshot copies anew


# ------------------------------------------------------------------------------ pinned buffers, on CPU

class FakeZeroEngine(FakeEngine):
    """Also a ZeRO optimizer file (two state tensors of one shape, and the fp32 weights: the
    module file's tensor again), DeepSpeed's recovery script beside the tag's directory, and
    DeepSpeed's own work (`work_s`) before it hands the state over."""

    def __init__(self, weights: torch.Tensor, work_s: float = 0.0):
        super().__init__(weights)
        gen = torch.Generator().manual_seed(0)
        self.exp_avg, self.exp_avg_sq = torch.randn(300, generator=gen), torch.rand(300, generator=gen)
        self.work_s = work_s

    def save_checkpoint(self, save_dir, tag, save_latest):
        time.sleep(self.work_s)
        super().save_checkpoint(save_dir, tag, save_latest)
        (Path(save_dir) / "zero_to_fp32.py").write_text("# recovery script\n")
        state = {"state": {0: {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": 5}},
                 "fp32": [self.weights]}
        self.checkpoint_engine.save({"optimizer_state_dict": state}, f"{save_dir}/{tag}/zero_pp_rank_0_optim_states.pt")


ALLOC_S = 0.02  # each fake pinned allocation: long enough to be measured


def fake_pinned(monkeypatch, fail_first: bool = False, alloc_s: float = ALLOC_S) -> list[tuple]:
    """Every tensor counts as a device tensor, and pinned buffers are plain host tensors whose
    allocation takes `alloc_s` (CPU-only torch has no pinned memory). Returns the allocations'
    (shape, dtype), appended as they happen."""
    import fusiontree.checkpoint as C

    calls: list[tuple] = []

    def allocate(shape, dtype):
        time.sleep(alloc_s)
        if fail_first and not calls:
            calls.append(None)
            raise RuntimeError("out of pinned memory")
        calls.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(C, "_buffered", lambda t: True)
    monkeypatch.setattr(C, "_allocate_pinned", allocate)
    monkeypatch.setattr(C, "_fast_pinning", lambda: None)  # a CUDA allocator setting
    return calls


def _state() -> tuple[FakeZeroEngine, dict, dict]:
    """An engine, a trainer state and model.pt's weights (one of them the engine's tensor)."""
    engine = FakeZeroEngine(torch.arange(1000, dtype=torch.float32), work_s=0.05)
    return engine, {"state": {"step": 1}}, {"w": engine.weights, "head": torch.full((7,), 2.0)}


# The engine's files hold 3 distinct tensors (the weights once), model.pt one more.
ENGINE_BYTES, MODEL_BYTES = (1000 + 300 + 300) * 4, 7 * 4


def test_an_async_save_reports_its_waits_shares_and_new_buffers(tmp_path, monkeypatch):
    calls = fake_pinned(monkeypatch)
    engine, trainer, model_state = _state()
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)
    shares = {"engine_state": {"pinned_alloc", "d2h_enqueue", "state_walk", "deepspeed"},
              "trainer_state_and_copies": {"pinned_alloc", "d2h_enqueue", "d2h_wait", "state_walk"}}
    for step in (1, 2):
        ckpt.save(engine, step, trainer, "c\n", {}, model_state=model_state)
        parts = ckpt.last_save_parts
        assert {k for k in parts if "/" not in k} == {"previous_save", "buffer_allocation_wait", *shares}, parts
        for part, names in shares.items():
            got = {k.split("/")[1]: v for k, v in parts.items() if k.startswith(part + "/")}
            assert set(got) == names and all(v >= 0 for v in got.values()), got
            assert sum(got.values()) == pytest.approx(parts[part], abs=1e-9)
        assert parts["engine_state/deepspeed"] >= engine.work_s
        if step == 1:  # 3 buffers for the engine's files, 1 for model.pt
            assert parts["engine_state/pinned_alloc"] >= 3 * ALLOC_S
            assert parts["trainer_state_and_copies/pinned_alloc"] >= ALLOC_S
            assert ckpt.last_save_buffers == {"new_pinned_bytes": ENGINE_BYTES + MODEL_BYTES, "new_pinned_buffers": 4}
        else:  # the first save's buffers serve the second
            assert parts["engine_state/pinned_alloc"] == 0 and parts["trainer_state_and_copies/pinned_alloc"] == 0
            assert ckpt.last_save_buffers == {"new_pinned_bytes": 0, "new_pinned_buffers": 0}
        ckpt.wait()
    assert len(calls) == 4


def _contents(path: Path) -> dict[str, object]:
    """Every file of a checkpoint but meta.json (which holds the time of the save): the .pt
    files loaded, the others as text."""
    return {str(p.relative_to(path)): safe_load(p) if p.suffix == ".pt" else p.read_text()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "meta.json"}


def test_prepare_allocates_the_first_saves_buffers_ahead_and_changes_no_file(tmp_path, monkeypatch):
    from tests.train.test_train_e2e import _same

    # Slow allocations: the save comes while prepare's allocation still runs, and waits for it.
    alloc_s = 0.1
    calls = fake_pinned(monkeypatch, alloc_s=alloc_s)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    saved = {}
    for prepared in (False, True):
        root = tmp_path / f"prepared_{prepared}" / "checkpoints"
        ckpt = CheckpointManager(root, rank=0, world_size=1, async_save=True)
        engine, trainer, model_state = _state()
        assert ckpt.prepare_pending
        n_calls = len(calls)
        if prepared:
            ckpt.prepare(engine, model_state)
            assert not ckpt.prepare_pending
            # the dry run of the engine's save wrote nothing where checkpoints live, and left nothing
            assert not root.exists() and list(scratch.iterdir()) == []
            assert ckpt.last_prepare["pinned_buffers"] == 4
            assert ckpt.last_prepare["pinned_bytes"] == ENGINE_BYTES + MODEL_BYTES
            with pytest.raises(ValueError, match="prepare runs once, before the first save"):
                ckpt.prepare(engine, model_state)
        saved[prepared] = ckpt.save(engine, 1, trainer, "c\n", {}, model_state=model_state)
        ckpt.wait()
        assert not ckpt.prepare_pending
        if prepared:  # the save found every buffer allocated, after waiting for the allocation
            assert ckpt.last_save_buffers["new_pinned_bytes"] == 0 and ckpt.last_save_buffers["new_pinned_buffers"] == 0
            assert ckpt.last_save_parts["engine_state/pinned_alloc"] == 0
            assert ckpt.last_save_parts["buffer_allocation_wait"] >= alloc_s
            assert ckpt.last_save_buffers["prepared_alloc_s"] >= 4 * alloc_s
        else:
            assert ckpt.last_save_buffers["new_pinned_buffers"] == 4
        assert len(calls) - n_calls == 4  # prepare's, or the save's
    plain, ahead = _contents(saved[False]), _contents(saved[True])
    assert plain.keys() == ahead.keys() and "zero_to_fp32.py" in plain and "model.pt" in plain
    assert all(_same(plain[k], ahead[k]) for k in plain), [k for k in plain if not _same(plain[k], ahead[k])]
    records = [json.loads((saved[p] / "meta.json").read_text())["files"] for p in (False, True)]
    assert records[0] == records[1]  # byte for byte: the same sizes and sha256


def test_prepare_is_refused_for_synchronous_saves(tmp_path):
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=False)
    assert not ckpt.prepare_pending
    with pytest.raises(ValueError, match="this manager saves synchronously"):
        ckpt.prepare(FakeEngine(torch.zeros(4)))


def test_a_failed_allocation_ahead_is_a_warning_and_the_save_allocates_for_itself(tmp_path, monkeypatch, caplog):
    calls = fake_pinned(monkeypatch, fail_first=True)
    engine, trainer, model_state = _state()
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)
    ckpt.prepare(engine, model_state)
    with caplog.at_level(logging.WARNING):
        path = ckpt.save(engine, 1, trainer, "c\n", {}, model_state=model_state)
    ckpt.wait()
    assert "allocating checkpoint host buffers ahead of the first save failed (out of pinned memory)" in caplog.text
    assert ckpt.last_save_buffers["new_pinned_buffers"] == 4 and len(calls) == 5
    assert CheckpointManager.is_valid(path)
