"""Asynchronous checkpoints: the state is the one of the moment of the save, the directory is
complete or absent, and a failed write is an error in the training thread."""

from __future__ import annotations

import threading

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
def test_async_save_copies_device_weights_of_the_moment_into_a_host_model_file(tmp_path):
    from fusiontree.checkpoint import MODEL_FILE

    weights = torch.arange(1 << 20, dtype=torch.bfloat16, device="cuda")
    ckpt = CheckpointManager(tmp_path / "checkpoints", rank=0, world_size=1, async_save=True)
    for step in (1, 2):  # the second save reuses the first one's pinned buffers
        path = ckpt.save(FakeEngine(weights), step, {"state": {"step": step}}, "c: 1\n", {},
                         model_state={"w": weights.detach()})
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
