"""Content hashes of checkpoint files: recorded while writing (synchronous and background
saves), checked on resume and in evaluation; damage that keeps a file's size is found."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fusiontree.checkpoint import (ENGINE_TAG, MODEL_FILE, CheckpointManager, file_record, load_weights_file,
                                   resolve_checkpoint, safe_load)
from tests.train.test_checkpoint_async import FakeEngine


def _save(root: Path, step: int, async_save: bool) -> Path:
    gen = torch.Generator().manual_seed(step)
    engine = FakeEngine(torch.randn(4096, generator=gen))
    ckpt = CheckpointManager(root, rank=0, world_size=1, async_save=async_save)
    path = ckpt.save(engine, step, {"state": {"step": step}}, "model: {}\n", {"tokens_seen": step},
                     model_state={"w": torch.randn(4096, generator=gen)})
    ckpt.wait()
    return path


def _flip(path: Path, offset: int = 2000, n: int = 64) -> None:
    """Damage `n` bytes in the middle of a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("async_save", [False, True])
def test_every_file_is_recorded_with_the_sha256_of_its_content(tmp_path, async_save, monkeypatch):
    import fusiontree.checkpoint as C

    reread = []  # files hashed by reading them back after writing: none of the state files
    real_record = C.file_record
    monkeypatch.setattr(C, "file_record", lambda p: reread.append(Path(p).name) or real_record(p))
    path = _save(tmp_path / "checkpoints", 1, async_save)
    assert not [n for n in reread if n.endswith(".pt")], reread
    monkeypatch.undo()
    files = json.loads((path / "meta.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(files) == on_disk and f"{ENGINE_TAG}/model_states.pt" in files and MODEL_FILE in files
    for name, record in files.items():
        assert record == file_record(path / name), name
    assert not list(path.glob(".records_rank*"))  # the per-rank records went into meta.json


@pytest.mark.parametrize("async_save", [False, True])
def test_a_damaged_file_of_the_same_size_is_skipped_by_auto_and_refused_by_name(tmp_path, async_save, caplog):
    root = tmp_path / "checkpoints"
    good, bad = _save(root, 1, async_save), _save(root, 2, async_save)
    damaged = bad / ENGINE_TAG / "model_states.pt"
    size = damaged.stat().st_size
    _flip(damaged)
    assert damaged.stat().st_size == size and CheckpointManager.is_valid(bad)  # sizes alone cannot tell

    ckpt = CheckpointManager(root, rank=0, world_size=1)
    problems = ckpt.verify(bad)
    assert len(problems) == 1 and str(damaged) in problems[0] and "sha256" in problems[0]
    assert ckpt.verify(good) == []
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume_path("auto") == good
    assert f"skipping checkpoint {bad}" in caplog.text and str(damaged) in caplog.text
    with pytest.raises(ValueError, match=rf"--resume {bad}: {damaged} does not have the content it was saved with"):
        ckpt.resume_path(str(bad))
    assert ckpt.resume_path(str(good)) == good


def test_evaluation_skips_a_damaged_model_pt_in_a_run_and_names_it_when_chosen(tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    good, bad = _save(root, 1, False), _save(root, 2, False)
    _flip(bad / MODEL_FILE)
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path / "run") == good
    assert str(bad / MODEL_FILE) in caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint {bad}: {bad / MODEL_FILE} does not have the content"):
        resolve_checkpoint(bad)


def test_a_truncated_weights_file_is_an_error_that_names_it(tmp_path):
    path = tmp_path / MODEL_FILE
    torch.save({"w": torch.zeros(4096)}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"{path} cannot be read as a weights file .* truncated or damaged"):
        load_weights_file(path)


def _save_forever(root: str, async_save: bool, started) -> None:
    """A child process: checkpoints of steps 1, 2, 3, ... whose content is a function of the step."""
    ckpt = CheckpointManager(root, rank=0, world_size=1, keep=2, async_save=async_save)
    step = 0
    started.set()
    while True:
        step += 1
        w = torch.full((1 << 14,), float(step))
        ckpt.save(FakeEngine(w), step, {"state": {"step": step}}, "model: {}\n", {"tokens_seen": step},
                  model_state={"w": w.clone()})
    # never returns: killed


@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_at_random_moments_of_saves_never_leaves_a_checkpoint_that_resumes_wrongly(tmp_path, async_save):
    """20 SIGKILLs at random moments of a process that does nothing but save: afterwards, the
    checkpoint a resume picks is intact and holds the state of its step, and every directory
    that counts as a checkpoint passes its content check."""
    import multiprocessing
    import os
    import random
    import signal
    import time

    # Forked: the parent's imports, so that a save starts at once. The tensors stay below torch's
    # parallel grain size: a forked child must not enter the parent's OpenMP thread pool.
    ctx = multiprocessing.get_context("fork")
    FakeEngine(torch.zeros(1))  # DeepSpeed's checkpoint engine imported before the forks
    rng = random.Random(1234)
    root = tmp_path / "checkpoints"
    mid_save = resumed = 0
    for kill in range(20):
        started = ctx.Event()
        child = ctx.Process(target=_save_forever, args=(str(root), async_save, started))
        child.start()
        assert started.wait(600)
        deadline = time.monotonic() + 600
        while not any(root.glob("step_*")) and time.monotonic() < deadline:  # a first checkpoint, however loaded
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        mid_save += any(root.glob(".tmp-step_*"))  # killed while a save was being written
        ckpt = CheckpointManager(root, rank=0, world_size=1)
        for path in sorted(root.glob("step_*")):
            if CheckpointManager.is_valid(path):
                assert ckpt.verify(path) == [], (kill, path)
        path = ckpt.resume_path("auto")
        if path is None:
            continue
        step = json.loads((path / "meta.json").read_text())["step"]
        assert path.name == f"step_{step:08d}"
        state = safe_load(path / ENGINE_TAG / "model_states.pt")["module"]["w"]
        assert torch.equal(state, torch.full((1 << 14,), float(step)))
        assert torch.equal(safe_load(path / MODEL_FILE)["w"], state)
        assert safe_load(path / "trainer_rank00000.pt")["state"]["step"] == step
        resumed += 1
    print(f"{mid_save} of 20 kills during a save, {resumed} resumed")
    # The child does nothing but save: kills land inside one (9-17 of 20 measured, fewer on a
    # loaded machine), and always after a first complete checkpoint.
    assert mid_save >= 1 and resumed == 20, (mid_save, resumed)
