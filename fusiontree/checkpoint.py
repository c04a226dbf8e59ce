"""The checkpoint format, in one place: atomic training checkpoints (DeepSpeed engine state +
per-rank trainer state + metadata), and loading their portable part (weights, resolved
config, metadata) for evaluation, generation and pruning.

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

Asynchronous saves (`async_save=True`): the training loop waits only while every tensor of the
state is copied to host memory (pinned and reused from one save to the next); a background
thread per rank then writes that snapshot into the same temporary directory, flushes it and
leaves a marker, and rank 0's thread renames the directory into place once every rank's
marker is there. The guarantees stay those of a synchronous save: a checkpoint is complete or
ignored. At most one save is in flight per rank: the next save, and the end of training,
wait for it.

Loading never unpickles arbitrary objects: every file is read with
`torch.load(weights_only=True)`; DeepSpeed's optimizer files contain three plain classes of
its own (loss scaler, ZeRO stage enum, fragment address), which are allowlisted by name.

A model checkpoint (`write_model_checkpoint`: a pruned copy, for instance) holds only the
portable files (model.pt, config.yaml, meta.json and extras): it loads for evaluation and
inference (`load_checkpoint`), not for resuming training. A run directory (`out_dir`) or its
`checkpoints/` folder may be given wherever a checkpoint is read: the latest valid checkpoint
in it is used (`resolve_checkpoint`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from fusiontree.config import RunConfig, load_config
from fusiontree.models import HybridLanguageModel
from fusiontree.ops import reference_kernels, resolve_kernels

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"
MODEL_FILE, CONFIG_FILE, META_FILE = "model.pt", "config.yaml", "meta.json"


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


class _HostSnapshot:
    """Copies of state dicts in host memory, made while the training loop waits, written to
    files later. Device tensors go to pinned buffers that are reused by the next save (same
    shapes every time), so a save after the first costs one device-to-host copy."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.used: list[tuple[tuple, torch.Tensor]] = []

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t.detach().clone()
        key = (tuple(t.shape), t.dtype)
        pool = self.free.setdefault(key, [])
        buf = pool.pop() if pool else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.used.append((key, buf))
        buf.copy_(t.detach(), non_blocking=True)
        return buf

    def copy(self, obj):
        """`obj` with every tensor replaced by a host copy; containers are rebuilt, other
        leaves deep-copied (they may change once training goes on)."""
        if isinstance(obj, torch.Tensor):
            return self._host(obj)
        if isinstance(obj, dict):
            out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
            for k, v in obj.items():
                out[k] = self.copy(v)
            return out
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            return type(obj)(self.copy(v) for v in obj)
        return copy.deepcopy(obj)

    def synchronize(self) -> None:
        if torch.cuda.is_available() and self.used:
            torch.cuda.synchronize()  # deliberate sync: the copies must be complete before training goes on

    def release(self) -> None:
        """The snapshot has been written: its buffers serve the next one."""
        for key, buf in self.used:
            self.free[key].append(buf)
        self.used = []


def _snapshot_engine(base_engine, snapshot: _HostSnapshot, pending: list):
    """A DeepSpeed checkpoint engine that snapshots each state dict instead of writing it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SnapshotCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            pending.append((snapshot.copy(state_dict), path))

    engine = SnapshotCheckpointEngine(base_engine.config_params) if hasattr(base_engine, "config_params") \
        else SnapshotCheckpointEngine()
    return engine


class CheckpointManager:
    def __init__(self, root: str | Path, rank: int, world_size: int, keep: int = 3, async_save: bool = False):
        self.root = Path(root)
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.async_save = async_save
        self._snapshot = _HostSnapshot()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _final(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, engine, step: int, trainer_state: dict, config_yaml: str, meta: dict,
             model_state: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
        """Collective: every rank calls it. `model_state` (rank 0's consolidated weights) goes
        to model.pt, the portable file that evaluation, generation and pruning read;
        `extra_files` (rank 0: name -> text) go into the checkpoint beside it.
        Returns the checkpoint directory (there once `wait()` returns, for an asynchronous save)."""
        self.wait()
        extra_files = extra_files or {}
        final = self._final(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        if not self.async_save:
            engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
            torch.save(trainer_state, tmp / f"trainer_rank{self.rank:05d}.pt")
            if self.rank == 0 and model_state is not None:
                torch.save(model_state, tmp / MODEL_FILE)
            _barrier()
            if self.rank == 0:
                self._finalize(tmp, final, step, {CONFIG_FILE: config_yaml, **extra_files}, meta)
            _barrier()
            return final
        pending: list = []
        saved_engine = engine.checkpoint_engine
        engine.checkpoint_engine = _snapshot_engine(saved_engine, self._snapshot, pending)
        try:
            engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        finally:
            engine.checkpoint_engine = saved_engine
        pending.append((self._snapshot.copy(trainer_state), str(tmp / f"trainer_rank{self.rank:05d}.pt")))
        if self.rank == 0 and model_state is not None:
            pending.append((model_state, str(tmp / MODEL_FILE)))  # already a host copy
        self._snapshot.synchronize()
        texts = {CONFIG_FILE: config_yaml, **extra_files}
        self._thread = threading.Thread(target=self._write, args=(pending, tmp, final, step, texts, meta),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return final

    def _write(self, pending: list, tmp: Path, final: Path, step: int, texts: dict[str, str], meta: dict) -> None:
        try:
            for state, path in pending:
                torch.save(state, path)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            self._snapshot.release()
            (tmp / f".done_rank{self.rank:05d}").touch()
            if self.rank == 0:
                markers = [tmp / f".done_rank{r:05d}" for r in range(self.world_size)]
                while not all(m.exists() for m in markers):  # the other ranks' writers
                    time.sleep(0.05)
                for m in markers:
                    m.unlink()
                self._finalize(tmp, final, step, texts, meta)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until this rank's asynchronous save (and, on rank 0, its renaming into place)
        is done; raise what went wrong in it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def _finalize(self, tmp: Path, final: Path, step: int, texts: dict[str, str], meta: dict) -> None:
        """Rank 0, once every rank's files are in `tmp`: the text files (config, pruning plan),
        meta.json with every file's size, flush, rename into place, drop old checkpoints."""
        for name, text in texts.items():
            (tmp / name).write_text(text)
        meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time(), "files": _files(tmp)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)  # make the rename itself durable
        self._prune()

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


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its meta.json)."""
    return int(json.loads((Path(path) / META_FILE).read_text())["step"])


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != META_FILE}


def write_model_checkpoint(out: str | Path, model_state: dict, config_yaml: str,
                           meta: dict | Callable[[Path], dict], extra_files: dict[str, str] | None = None) -> Path:
    """A checkpoint of weights only (model.pt, config.yaml, the text files of `extra_files`,
    meta.json listing every file with its size). `meta`: a dict, or a function of the written
    directory that returns it (to record sizes of the files). Returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, out / MODEL_FILE)
    (out / CONFIG_FILE).write_text(config_yaml)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    meta = meta(out) if callable(meta) else meta
    (out / META_FILE).write_text(json.dumps({**meta, "files": _files(out)}, indent=2))
    return out


# ------------------------------------------------------------------------------ loading for evaluation

@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: RunConfig
    meta: dict
    model: HybridLanguageModel


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def resolve_checkpoint(path: str | Path, engine_only_ok: bool = False) -> Path:
    """A checkpoint directory from a checkpoint, run or checkpoints directory (the latest valid
    one). Its weights are model.pt; `engine_only_ok`: or only DeepSpeed's engine files (a
    tensor-parallel checkpoint whose model.pt was not written, read by consolidating them)."""
    p = Path(path)

    def has_weights(d: Path) -> bool:
        return (d / MODEL_FILE).is_file() or (engine_only_ok and (d / ENGINE_TAG).is_dir())

    if has_weights(p) and (p / CONFIG_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and any(root.glob("step_*")):
            latest = CheckpointManager(root, 0, 1).latest_valid()
            if latest is not None and has_weights(latest):
                return latest
    raise ValueError(f"{path} is not a checkpoint (no model.pt + config.yaml) and holds no valid "
                     "checkpoints/step_* directory; pass a directory written by launch/train.py or "
                     "fusiontree.eval.pruning.apply_pruning")


def load_model_weights(model, path: str | Path) -> Path:
    """Load the model.pt of a checkpoint (or the latest of a run directory) into `model`, a plain
    model of the same config; returns the checkpoint directory. A mismatch is an error that
    names the config to use."""
    ckpt = resolve_checkpoint(path)
    try:
        model.load_state_dict(safe_load(ckpt / MODEL_FILE))
    except RuntimeError as e:
        raise ValueError(f"the weights of {ckpt} do not fit this run's model config ({str(e)[:300]}); use the "
                         f"model section of {ckpt / CONFIG_FILE}") from e
    return ckpt


def _check_files(ckpt: Path) -> None:
    """A checkpoint given directly (not picked by `latest_valid`) is checked the same way: when
    it has a meta.json, every file it lists must be there with its recorded size."""
    if (ckpt / META_FILE).is_file() and not CheckpointManager.is_valid(ckpt):
        raise ValueError(f"checkpoint {ckpt} is incomplete or damaged (meta.json unreadable, or a file it lists "
                         "is missing or has another size); pass an intact checkpoint, or the run directory to "
                         "take its latest valid one")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", kernels: str | None = None,
                    overrides: list[str] | None = None) -> LoadedCheckpoint:
    """Build the model of the checkpoint's config, load its weights, put it in eval mode.
    `kernels`: "reference" forces the PyTorch reference ops; None picks what the config says
    (`auto` resolves per device). `overrides`: dotted config overrides (e.g. --data.shards_dir=...).
    A missing, incomplete or unreadable checkpoint is a ValueError that names it."""
    ckpt = resolve_checkpoint(path)
    _check_files(ckpt)
    cfg = load_config(ckpt / CONFIG_FILE, overrides)
    device = torch.device(device)
    kern = reference_kernels() if kernels == "reference" else resolve_kernels(cfg.kernels, device)
    model = HybridLanguageModel(cfg.model, kern)
    try:
        state = safe_load(ckpt / MODEL_FILE)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # a truncated or overwritten file
        raise ValueError(f"{ckpt / MODEL_FILE} cannot be read ({str(e).splitlines()[0]}); the checkpoint is "
                         "damaged: pass another one, or the run directory to take its latest valid one") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / MODEL_FILE} does not match its config.yaml (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}); was the config edited after saving?")
    return LoadedCheckpoint(ckpt, cfg, read_meta(ckpt), model.to(device).eval())


def checkpoint_tokenizer(ckpt: LoadedCheckpoint, override: str | Path = ""):
    """The tokenizer of a checkpoint: `override` (a .model or tokenizer.json), else the one
    its run trained with (meta.json), else the one its shards' manifest names. It must match the
    checkpoint: as many ids as the model's vocabulary, and the very tokenizer the run trained
    with when meta.json records its sha256 (ValueError otherwise: ids would silently mean other
    text)."""
    from fusiontree.data.tokenizer import load_tokenizer_file, tokenizer_from_build

    if override:
        tok = load_tokenizer_file(override)
    else:
        path = Path(ckpt.meta.get("tokenizer") or "")
        # The run's tokenizer moved with its shards: the manifest's, checked below like any other.
        tok = load_tokenizer_file(path) if path.is_file() else \
            tokenizer_from_build(ckpt.cfg.data.shards_dir, ckpt.cfg.data.tokenizer)
    if tok.vocab_size() != ckpt.cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size()} ids but the checkpoint's model has "
                         f"{ckpt.cfg.model.vocab_size} (model.vocab_size); pass the tokenizer it was trained with")
    want, got = ckpt.meta.get("tokenizer_sha256"), tok.sha256
    if want and got != want:
        raise ValueError(f"tokenizer {tok.name} is not the one {ckpt.path} was trained with (sha256 {got[:12]}, "
                         f"recorded {want[:12]}); pass the run's tokenizer ({ckpt.meta.get('tokenizer', 'see meta.json')})")
    return tok
