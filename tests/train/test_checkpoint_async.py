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
