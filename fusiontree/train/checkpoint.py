"""Atomic training checkpoints: DeepSpeed engine state + per-rank trainer state + metadata.

Layout under `<run>/checkpoints/`:

    step_00000100/
        engine/                   DeepSpeed's files (module, ZeRO optimizer shards)
        trainer_rank00000.pt      per rank: loader state, RNG states, counters
        model.pt                  the model's weights, consolidated (for eval / generate / pruning)
        config.yaml               the resolved run config
        meta.json                 step, tokens, world size, tokenizer, every file with its size

A save is written into `.tmp-step_XXXXXXXX/` and renamed into place only after every rank
has written and every file is flushed to disk, so a crash during a save never damages the
latest good checkpoint; `latest_valid()` ignores temporaries and any directory whose
meta.json is missing or lists a file that is absent or has the wrong size.

Loading never unpickles arbitrary objects: every file is read with
`torch.load(weights_only=True)`; DeepSpeed's optimizer files contain three plain classes of
its own (loss scaler, ZeRO stage enum, fragment address), which are allowlisted by name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"


def _ds_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location="cpu"):
    with torch.serialization.safe_globals(_ds_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def install_safe_loader(engine) -> None:
    """Make DeepSpeed read its checkpoint files with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine.checkpoint_engine.config_params) \
        if hasattr(engine.checkpoint_engine, "config_params") else SafeTorchCheckpointEngine()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, root: str | Path, rank: int, world_size: int, keep: int = 3):
        self.root = Path(root)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    def _final(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, engine, step: int, trainer_state: dict, config_yaml: str, meta: dict,
             model_state: dict | None = None) -> Path:
        """Collective: every rank calls it. `model_state` (rank 0's consolidated weights) goes
        to model.pt, the portable file that evaluation, generation and pruning read.
        Returns the checkpoint directory."""
        final = self._final(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        torch.save(trainer_state, tmp / f"trainer_rank{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            if model_state is not None:
                torch.save(model_state, tmp / "model.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time(), "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)  # make the rename itself durable
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").exists())
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def is_valid(path: Path) -> bool:
        try:
            meta = json.loads((path / "meta.json").read_text())
            return all((path / f).is_file() and (path / f).stat().st_size == size
                       for f, size in meta["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def latest_valid(self) -> Path | None:
        if not self.root.is_dir():
            return None
        for path in sorted(self.root.glob("step_*"), reverse=True):
            if self.is_valid(path):
                return path
            log.warning("skipping incomplete or damaged checkpoint %s", path)
        return None

    def load(self, engine, path: Path) -> tuple[dict, dict]:
        """Collective. Loads the engine state in place; returns (this rank's trainer state, meta)."""
        path = Path(path)
        if not self.is_valid(path):
            raise ValueError(f"checkpoint {path} is incomplete or damaged (meta.json missing or a file "
                             "has the wrong size); pass another --resume path or --resume auto")
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {meta['world_size']} processes, this run "
                             f"has {self.world_size}; resume with the same number of processes")
        install_safe_loader(engine)
        load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the engine state from {path / ENGINE_TAG}")
        state = safe_load(path / f"trainer_rank{self.rank:05d}.pt")
        return state, meta
