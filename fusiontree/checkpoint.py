"""The checkpoint format, in one place: atomic training checkpoints (DeepSpeed engine state +
per-rank trainer state + metadata), and loading their portable part (weights, resolved
config, metadata) for evaluation, generation and pruning.

Layout under `<run>/checkpoints/`:

    step_00000100/
        engine/                   DeepSpeed's files (module, ZeRO optimizer shards)
        trainer_rank00000.pt      per rank: loader state, RNG states, counters
        model.pt                  the model's weights, consolidated (for eval / generate / pruning)
        config.yaml               the resolved run config
        meta.json                 step, tokens, world size, tokenizer, every file with its size and sha256
        tokenizer.model           the run's tokenizer (tokenizer.json for a Hugging Face one): a
                                  checkpoint moved away from its shards still reads its own text

A save is written into `.tmp-step_XXXXXXXX/` and renamed into place only after every rank
has written and every file is flushed to disk, so a crash during a save never damages the
latest good checkpoint; `latest_valid()` ignores temporaries and any directory whose
meta.json is missing or lists a file that is absent or has the wrong size.

Every file's sha256 is computed while it is written (the bytes are hashed on their way to
the file, in the writer: the background thread for asynchronous saves), so the hash costs no
second pass over the data. A resume (`CheckpointManager.resume_path`) and evaluation
(`resolve_checkpoint`) check the hashes of the files they read: damage that keeps a file's
size (a flipped block on a disk or a network filesystem) is found like a missing or
truncated file. `--resume auto` then takes the previous intact checkpoint with a warning; a
checkpoint named explicitly is an error that names the damaged file.

Asynchronous saves (`async_save=True`): the training loop waits only while every tensor of the
state is copied to host memory (pinned and reused from one save to the next); a background
thread per rank then writes that snapshot into the same temporary directory, flushes it and
leaves a marker, and rank 0's thread renames the directory into place once every rank's
marker is there. The guarantees stay those of a synchronous save: a checkpoint is complete or
ignored. At most one save is in flight per rank: the next save, and the end of training,
wait for it. The first save would allocate the pinned buffers (gigabytes for a large model);
`CheckpointManager.prepare`, called once after the first optimizer step, learns their shapes
from a dry run of DeepSpeed's save (nothing copied, nothing written under `<run>/checkpoints/`)
and allocates them in a background thread. Each save reports where the training loop's wait
went (`last_save_parts`, with the engine state's share for allocating buffers, for enqueuing
the device-to-host copies and for DeepSpeed's own work) and the bytes it newly allocated.

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
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from fusiontree.config import RunConfig, load_config
from fusiontree.host import cpu_count
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


def safe_load(path: str | Path, map_location="cpu", deepspeed_classes: bool = True, mmap: bool = False):
    """torch.load with weights_only=True. `deepspeed_classes`: allow DeepSpeed's three plain
    classes (its engine files hold them; importing DeepSpeed is slow and logs, so a file that
    cannot hold them, such as model.pt, is read without). `mmap`: map the file's tensors
    instead of reading them (zip-format files only)."""
    if not deepspeed_classes:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    with torch.serialization.safe_globals(_ds_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


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


def _all_ranks(items: list) -> list:
    """Every rank's `items`, concatenated in rank order (collective when a process group runs)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, items)
        return [x for part in gathered for x in part]
    return list(items)


# ------------------------------------------------------------------------------ file records

HASH_CHUNK_BYTES = 8 << 20


class _HashingFile:
    """A file opened for writing that hashes every byte on its way to disk: the content hash of
    a checkpoint file costs no second read. hashlib releases the GIL on large buffers, so a
    background writer hashing does not hold up the training thread."""

    def __init__(self, path: str | Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        n = self.f.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> dict:
        """Flush to disk, close; the file's record (size, sha256)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def save_recorded(obj, path: str | Path, **torch_save_kwargs) -> dict:
    """torch.save `obj` to `path`, hashing it while it is written; returns its record."""
    f = _HashingFile(path)
    try:
        torch.save(obj, f, **torch_save_kwargs)
    except BaseException:
        f.f.close()
        raise
    return f.close()


def file_record(path: str | Path) -> dict:
    """The record meta.json keeps for a file: its size and sha256 (read from disk)."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def _records_name(rank: int) -> str:
    return f".records_rank{rank:05d}.json"


def _write_records(tmp: Path, rank: int, records: dict[str, dict]) -> None:
    """This rank's file records, for rank 0's meta.json; written whole or not at all (rank 0
    of an asynchronous save polls for it)."""
    part = tmp / (_records_name(rank) + ".part")
    part.write_text(json.dumps(records))
    os.replace(part, tmp / _records_name(rank))


def _fast_pinning() -> None:
    """Pinned buffers are allocated by torch's host allocator as pageable memory that several
    threads page in before it is registered with CUDA, instead of one cudaHostAlloc that pins
    page by page on one thread: the first save allocates gigabytes of them. A setting of the
    process, made once (a snapshot's first allocation, on whichever thread makes it); a
    pinned-memory setting of the user's own (PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF) is
    left as it is."""
    global _pinning_set
    with _pinning_lock:
        if _pinning_set:
            return
        _pinning_set = True
        if any("pinned_" in os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
            return
        threads = 1 << max(0, min(8, cpu_count()).bit_length() - 1)  # a power of two, <= 8
        torch.cuda.memory._set_allocator_settings(
            f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}")


_pinning_lock = threading.Lock()
_pinning_set = False


def _allocate_pinned(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A new pinned host buffer: the one place snapshots allocate one (tests on CPU-only torch,
    which has no pinned memory, put a plain allocation here)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _buffered(t: torch.Tensor) -> bool:
    """Whether a snapshot copies `t` into a reused pinned buffer (device tensors) rather than
    cloning it (host tensors)."""
    return t.is_cuda


def _view_key(t: torch.Tensor) -> tuple:
    """One tensor view: a snapshot copies each once, however often the state dicts hold it."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _buffer_key(t: torch.Tensor) -> tuple:
    """What makes a pinned buffer fit a tensor: buffers are reused by shape and dtype."""
    return (tuple(t.shape), t.dtype)


def _key_bytes(key: tuple) -> int:
    shape, dtype = key
    return math.prod(shape) * dtype.itemsize


def _map_tensors(obj, on_tensor: Callable, on_leaf: Callable):
    """`obj` rebuilt with `on_tensor` applied to each tensor and `on_leaf` to every other leaf;
    dicts and plain lists and tuples are containers (other objects are leaves). The one
    traversal of state dicts, for snapshots and for their plans."""
    if isinstance(obj, torch.Tensor):
        return on_tensor(obj)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _map_tensors(v, on_tensor, on_leaf)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_map_tensors(v, on_tensor, on_leaf) for v in obj)
    return on_leaf(obj)


@dataclass
class _Spent:
    """Where a snapshot's time went (cumulative; a save takes differences around its laps).
    `walk_s` is all the time inside `_HostSnapshot.copy`, allocation and copies included."""
    alloc_s: float = 0.0
    alloc_bytes: int = 0
    alloc_buffers: int = 0
    copy_s: float = 0.0
    walk_s: float = 0.0

    def since(self, before: _Spent) -> _Spent:
        return _Spent(*(a - b for a, b in zip(astuple(self), astuple(before))))


class _HostSnapshot:
    """Copies of state dicts in host memory, made while the training loop waits, written to
    files later. Device tensors go to pinned buffers that are reused by the next save (same
    shapes every time), so a save after the first costs one device-to-host copy; the buffers
    of the first can be allocated ahead of it (`fill`, from a background thread). A tensor
    met twice in one snapshot (the weights in DeepSpeed's module file and in model.pt) is
    copied once."""

    def __init__(self):
        self._lock = threading.Lock()  # the free pool: `fill` may add to it from another thread
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.used: list[tuple[tuple, torch.Tensor]] = []
        self.copied: dict[tuple, torch.Tensor] = {}  # this snapshot's copies by source view
        self.spent = _Spent()
        self._allocator_set = False  # True: leave torch's pinned-memory settings as they are

    def _allocate(self, key: tuple) -> torch.Tensor:
        if not self._allocator_set:
            self._allocator_set = True
            _fast_pinning()
        return _allocate_pinned(*key)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        view = _view_key(t)
        if view not in self.copied:
            self.copied[view] = self._new_copy(t)
        return self.copied[view]

    def _new_copy(self, t: torch.Tensor) -> torch.Tensor:
        if not _buffered(t):
            return t.detach().clone()
        key = _buffer_key(t)
        with self._lock:
            pool = self.free.get(key)
            buf = pool.pop() if pool else None
        if buf is None:
            t0 = time.perf_counter()
            buf = self._allocate(key)
            self.spent.alloc_s += time.perf_counter() - t0
            self.spent.alloc_bytes += _key_bytes(key)
            self.spent.alloc_buffers += 1
        self.used.append((key, buf))
        t0 = time.perf_counter()
        buf.copy_(t.detach(), non_blocking=True)
        self.spent.copy_s += time.perf_counter() - t0
        return buf

    def copy(self, obj):
        """`obj` with every tensor replaced by a host copy; containers are rebuilt, other
        leaves deep-copied (they may change once training goes on)."""
        t0 = time.perf_counter()
        try:
            return _map_tensors(obj, self._host, copy.deepcopy)
        finally:
            self.spent.walk_s += time.perf_counter() - t0

    def fill(self, keys: list[tuple]) -> tuple[int, int]:
        """Allocate free buffers so that the pool holds one per entry of `keys` ((shape, dtype),
        repeated as often as a snapshot needs it). Safe beside `_new_copy` in another thread.
        Returns (buffers, bytes) allocated."""
        want: dict[tuple, int] = {}
        for key in keys:
            want[key] = want.get(key, 0) + 1
        n = nbytes = 0
        for key, count in want.items():
            with self._lock:
                missing = count - len(self.free.get(key, ()))
            for _ in range(max(0, missing)):
                buf = self._allocate(key)  # outside the lock: seconds for large buffers
                with self._lock:
                    self.free.setdefault(key, []).append(buf)
                n, nbytes = n + 1, nbytes + _key_bytes(key)
        return n, nbytes

    def synchronize(self) -> None:
        if torch.cuda.is_available() and self.used:
            torch.cuda.synchronize()  # deliberate sync: the copies must be complete before training goes on

    def release(self) -> None:
        """The snapshot has been written: its buffers serve the next one."""
        with self._lock:
            for key, buf in self.used:
                self.free.setdefault(key, []).append(buf)
        self.used = []
        self.copied = {}

    def begin(self) -> None:
        """A new snapshot: nothing of an earlier one (written or failed) is reused as a copy."""
        self.copied = {}


class _BufferPlan:
    """The pinned buffers a snapshot of the same state dicts takes: one (shape, dtype) per
    distinct view of a buffered tensor, as `_HostSnapshot` copies each view once. Nothing is
    copied."""

    def __init__(self):
        self.views: set[tuple] = set()
        self.keys: list[tuple] = []

    def _visit(self, t: torch.Tensor) -> None:
        view = _view_key(t)
        if _buffered(t) and view not in self.views:
            self.views.add(view)
            self.keys.append(_buffer_key(t))

    def add(self, obj) -> None:
        _map_tensors(obj, self._visit, lambda leaf: None)


def _recording_engine(base_engine, tmp: Path, records: dict):
    """A DeepSpeed checkpoint engine that writes each state dict as DeepSpeed's own does and
    records its size and sha256 on the way."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class RecordingCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            records[str(Path(path).relative_to(tmp))] = save_recorded(
                state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)

    return RecordingCheckpointEngine(base_engine.config_params) if hasattr(base_engine, "config_params") \
        else RecordingCheckpointEngine()


def _intercepting_engine(base_engine, on_save: Callable[[dict, str], None]):
    """A DeepSpeed checkpoint engine that hands each state dict and its path to `on_save`
    instead of writing it (to snapshot it, or to plan a snapshot's buffers)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class InterceptingCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            on_save(state_dict, path)

    return InterceptingCheckpointEngine(base_engine.config_params) if hasattr(base_engine, "config_params") \
        else InterceptingCheckpointEngine()


def _engine_save(engine, checkpoint_engine, directory: Path) -> None:
    """DeepSpeed's save_checkpoint of `engine` into `directory`, its state dicts handed to
    `checkpoint_engine` (to write and record, to snapshot, or to plan) instead of the engine's own."""
    saved = engine.checkpoint_engine
    engine.checkpoint_engine = checkpoint_engine
    try:
        engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)
    finally:
        engine.checkpoint_engine = saved


def _shares(part: str, total: float, rest: str, **measured: float) -> dict[str, float]:
    """The shares of lap `part` ("part/name" -> seconds): those measured, and `rest`, the
    remainder, so that they sum to `total`."""
    shares = {f"{part}/{k}": max(0.0, v) for k, v in measured.items()}
    shares[f"{part}/{rest}"] = max(0.0, total - sum(shares.values()))
    return shares


class _Laps:
    """Seconds between successive calls, by name, into `parts`."""

    def __init__(self, parts: dict[str, float]):
        self.parts, self.t = parts, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = now - self.t
        self.t = now


class CheckpointManager:
    def __init__(self, root: str | Path, rank: int, world_size: int, keep: int = 3, async_save: bool = False):
        self.root = Path(root)
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.async_save = async_save
        self._snapshot = _HostSnapshot()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers_thread: threading.Thread | None = None  # `prepare`'s allocation
        self._buffers_error: BaseException | None = None
        self._saved = self._prepared = False
        # Where the calling thread's time went in the last save (seconds by part): what a
        # background save leaves of the training loop's wait, and what a synchronous one writes.
        # A part "a/b" is a share of part "a": the shares of a part sum to it.
        self.last_save_parts: dict[str, float] = {}
        # The last asynchronous save's new pinned host buffers (`new_pinned_bytes`,
        # `new_pinned_buffers`), and for the first save after `prepare`, how long their
        # allocation took in the background (`prepared_alloc_s`).
        self.last_save_buffers: dict[str, float] = {}
        # `prepare`: the calling thread's wait (`plan_s`) and the buffers planned (`pinned_bytes`,
        # `pinned_buffers`); their allocation's time, once done (`_prepared_alloc_s`).
        self.last_prepare: dict[str, float] = {}
        self._prepared_alloc_s = 0.0

    def _final(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, engine, step: int, trainer_state: dict, config_yaml: str, meta: dict,
             model_state: dict | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:
        """Collective: every rank calls it. `model_state` (rank 0's consolidated weights) goes
        to model.pt, the portable file that evaluation, generation and pruning read;
        `extra_files` (rank 0: name -> text or bytes) go into the checkpoint beside it.
        Returns the checkpoint directory (there once `wait()` returns, for an asynchronous save)."""
        self.last_save_parts, self.last_save_buffers = {}, {}
        lap = _Laps(self.last_save_parts)
        self._saved = True
        self._wait_write()
        lap("previous_save")
        prepared = {}
        if self.async_save:
            prepared = self._wait_buffers()
            lap("buffer_allocation_wait")
        final = self._final(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        texts = {CONFIG_FILE: config_yaml, **(extra_files or {})}
        if self.async_save:
            self._snapshot_then_write(engine, tmp, final, step, trainer_state, model_state, texts, meta, lap, prepared)
        else:
            self._write_now(engine, tmp, final, step, trainer_state, model_state, texts, meta, lap)
        return final

    def _write_now(self, engine, tmp: Path, final: Path, step: int, trainer_state: dict, model_state: dict | None,
                   texts: dict[str, str], meta: dict, lap: _Laps) -> None:
        records: dict[str, dict] = {}
        _engine_save(engine, _recording_engine(engine.checkpoint_engine, tmp, records), tmp)
        lap("engine_state")
        name = f"trainer_rank{self.rank:05d}.pt"
        records[name] = save_recorded(trainer_state, tmp / name)
        if self.rank == 0 and model_state is not None:
            records[MODEL_FILE] = save_recorded(model_state, tmp / MODEL_FILE)
        lap("trainer_and_model_files")
        _write_records(tmp, self.rank, records)
        _barrier()
        if self.rank == 0:
            self._finalize(tmp, final, step, texts, meta)
        _barrier()
        lap("finalize")

    def _snapshot_then_write(self, engine, tmp: Path, final: Path, step: int, trainer_state: dict,
                             model_state: dict | None, texts: dict[str, str], meta: dict, lap: _Laps,
                             prepared: dict) -> None:
        parts = self.last_save_parts
        pending: list = []
        self._snapshot.begin()
        start = before = copy.copy(self._snapshot.spent)
        _engine_save(engine, _intercepting_engine(
            engine.checkpoint_engine, lambda state, path: pending.append((self._snapshot.copy(state), path))), tmp)
        lap("engine_state")  # into pinned host buffers (the first save allocates them, unless prepared)
        d = self._snapshot.spent.since(before)
        parts.update(_shares("engine_state", parts["engine_state"], rest="deepspeed", pinned_alloc=d.alloc_s,
                             d2h_enqueue=d.copy_s, state_walk=d.walk_s - d.alloc_s - d.copy_s))
        before = copy.copy(self._snapshot.spent)
        pending.append((self._snapshot.copy(trainer_state), str(tmp / f"trainer_rank{self.rank:05d}.pt")))
        if self.rank == 0 and model_state is not None:
            # Device tensors (weights the caller did not have to gather) go through the reused
            # pinned buffers like the engine's; host tensors are copies already.
            pending.append(({k: self._snapshot.copy(v) if _buffered(v) else v for k, v in model_state.items()},
                            str(tmp / MODEL_FILE)))
        t_sync = time.perf_counter()
        self._snapshot.synchronize()
        d2h_wait = time.perf_counter() - t_sync
        lap("trainer_state_and_copies")
        d = self._snapshot.spent.since(before)
        parts.update(_shares("trainer_state_and_copies", parts["trainer_state_and_copies"], rest="state_walk",
                             pinned_alloc=d.alloc_s, d2h_enqueue=d.copy_s, d2h_wait=d2h_wait))
        d = self._snapshot.spent.since(start)
        self.last_save_buffers = {"new_pinned_bytes": d.alloc_bytes, "new_pinned_buffers": d.alloc_buffers,
                                  **prepared}
        self._thread = threading.Thread(target=self._write, args=(pending, tmp, final, step, texts, meta),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write(self, pending: list, tmp: Path, final: Path, step: int, texts: dict[str, str], meta: dict) -> None:
        try:
            records = {str(Path(path).relative_to(tmp)): save_recorded(state, path) for state, path in pending}
            self._snapshot.release()
            _write_records(tmp, self.rank, records)  # also this rank's "done" marker
            if self.rank == 0:
                markers = [tmp / _records_name(r) for r in range(self.world_size)]
                while not all(m.exists() for m in markers):  # the other ranks' writers
                    time.sleep(0.05)
                self._finalize(tmp, final, step, texts, meta)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until this rank's background work is done: the buffers `prepare` allocates,
        and the asynchronous save (and, on rank 0, its renaming into place); raise what went
        wrong in the save."""
        self._wait_buffers()
        self._wait_write()

    def _wait_write(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    @property
    def prepare_pending(self) -> bool:
        """Whether `prepare` would spare the first asynchronous save its allocations: saves are
        asynchronous and neither a save nor `prepare` has run yet."""
        return self.async_save and not self._saved and not self._prepared

    def prepare(self, engine, model_state: dict | None = None) -> None:
        """Collective: every rank calls it at the same point (DeepSpeed's save_checkpoint runs
        in it: barriers, and an all-reduce of the tag), once, after an optimizer step (the
        optimizer's state exists) and before the first asynchronous save. It learns the shape
        and dtype of every device tensor a save copies to the host, without copying:
        DeepSpeed's save hands its state dicts to a planner instead of a writer, into a
        throwaway directory outside the checkpoints (DeepSpeed creates its directories and
        copies its recovery scripts there), plus `model_state` (rank 0's weights for
        model.pt, as the save will get them). A background thread then allocates the pinned
        buffers; the first save waits for it (`buffer_allocation_wait`) and, the state
        having the shapes planned, allocates none itself."""
        if not self.async_save:
            raise ValueError("CheckpointManager.prepare allocates the host buffers of asynchronous saves, but this "
                             "manager saves synchronously; call it only with async_save=True")
        if not self.prepare_pending:
            raise ValueError("CheckpointManager.prepare runs once, before the first save; check prepare_pending "
                             "before calling it")
        self._prepared = True
        t0 = time.perf_counter()
        plan = _BufferPlan()
        scratch = Path(tempfile.mkdtemp(prefix="fusiontree-buffer-plan-"))
        try:
            _engine_save(engine, _intercepting_engine(engine.checkpoint_engine, lambda state, path: plan.add(state)),
                         scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if self.rank == 0 and model_state is not None:
            plan.add(model_state)
        self.last_prepare = {"plan_s": time.perf_counter() - t0, "pinned_buffers": len(plan.keys),
                             "pinned_bytes": sum(_key_bytes(k) for k in plan.keys)}
        # The allocating thread uses the training thread's device: a thread starts on device 0.
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._buffers_thread = threading.Thread(target=self._allocate_buffers, args=(plan.keys, device),
                                                name="checkpoint-buffers", daemon=True)
        self._buffers_thread.start()

    def _allocate_buffers(self, keys: list[tuple], device: int | None) -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            t0 = time.perf_counter()
            n, nbytes = self._snapshot.fill(keys)
            self._prepared_alloc_s = time.perf_counter() - t0
            log.info("checkpoint host buffers: %d pinned buffers, %.2f GiB, allocated in the background in %.2f s",
                     n, nbytes / 2**30, self._prepared_alloc_s)
        except BaseException as e:  # reported by the first save, which then allocates for itself
            self._buffers_error = e

    def _wait_buffers(self) -> dict[str, float]:
        """Wait for `prepare`'s allocation if it runs; {"prepared_alloc_s": its time} once it is
        done, {} if it was not running."""
        if self._buffers_thread is None:
            return {}
        self._buffers_thread.join()
        self._buffers_thread = None
        if self._buffers_error is not None:
            error, self._buffers_error = self._buffers_error, None
            log.warning("allocating checkpoint host buffers ahead of the first save failed (%s); the save "
                        "allocates them itself", error)
            return {}
        return {"prepared_alloc_s": self._prepared_alloc_s}

    def _finalize(self, tmp: Path, final: Path, step: int, texts: dict[str, str | bytes], meta: dict) -> None:
        """Rank 0, once every rank's files and records are in `tmp`: the small files (config,
        pruning plan, tokenizer), meta.json with every file's size and sha256, flush, rename into place,
        drop old checkpoints."""
        recorded: dict[str, dict] = {}
        for r in range(self.world_size):
            marker = tmp / _records_name(r)
            recorded.update(json.loads(marker.read_text()))
            marker.unlink()
        _write_extra_files(tmp, texts)
        meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time(),
                "files": file_records(tmp, recorded)}
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
        """Complete: meta.json lists every file, each there with its size (no hashing: cheap)."""
        return not listed_files_problems(path)

    def verify(self, path: Path) -> list[str]:
        """Collective: what is wrong with checkpoint `path`, as every rank sees it (empty: intact).
        Each rank checks completeness, then the content hashes of its share of the files."""
        problems = listed_files_problems(path)
        if not problems:
            problems = damaged_files(path, share=(self.rank, self.world_size))
        return sorted(set(_all_ranks(problems)))

    def resume_path(self, resume: str) -> Path | None:
        """Collective. The checkpoint to resume from: `auto` -> the latest intact one (an
        incomplete or damaged one is skipped with a warning; None when there is none);
        otherwise `resume` is a checkpoint directory, which must be intact."""
        if resume == "auto":
            if not self.root.is_dir():
                return None
            for path in sorted(self.root.glob("step_*"), reverse=True):
                problems = self.verify(path)
                if not problems:
                    return path
                log.warning("skipping checkpoint %s: %s%s", path, problems[0],
                            f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            return None
        path = Path(resume)
        if not (path / META_FILE).is_file() and not path.is_dir():
            raise ValueError(f"--resume {resume}: no such checkpoint directory; pass a checkpoints/step_* "
                             "directory of a run, or --resume auto")
        problems = self.verify(path)
        if problems:
            raise ValueError(f"--resume {resume}: {problems[0]}; pass another checkpoint, or --resume auto "
                             "(the latest intact one)")
        return path

    def latest_valid(self) -> Path | None:
        if not self.root.is_dir():
            return None
        for path in sorted(self.root.glob("step_*"), reverse=True):
            if self.is_valid(path):
                return path
            log.warning("skipping incomplete or damaged checkpoint %s", path)
        return None

    def load(self, engine, path: Path, layout: dict | None = None,
             load_other_layout: Callable[[Path, dict], None] | None = None) -> tuple[dict, dict]:
        """Collective. Loads the engine state in place; returns (the trainer state, meta).
        `layout`: this run's engine layout (meta.json's "engine_layout" of its saves); a
        checkpoint of another layout (or number of processes) is read by
        `load_other_layout(path, its layout)`, DeepSpeed's own loader reading only its own.
        The trainer state is this rank's, or with fewer processes saved than now, that of
        rank `rank % saved world size` (the loader state and counters are the same on every
        rank; the RNG states of the added ranks repeat those of the saved ones)."""
        path = Path(path)
        if not self.is_valid(path):
            raise ValueError(f"checkpoint {path} is incomplete or damaged (meta.json missing or a file "
                             "has the wrong size); pass another --resume path or --resume auto")
        meta = json.loads((path / "meta.json").read_text())
        saved_layout = meta.get("engine_layout")
        same = meta["world_size"] == self.world_size and (layout is None or saved_layout is None or all(
            saved_layout[k] == layout[k] for k in ("zero_stage", "data_parallel", "tensor_parallel", "bf16")))
        if not same:
            if saved_layout is None or load_other_layout is None:
                raise ValueError(f"checkpoint {path} was written by {meta['world_size']} processes, this run has "
                                 f"{self.world_size}, and it does not record its engine layout; resume it with "
                                 "its own number of processes and parallel settings")
            load_other_layout(path, saved_layout)
        else:
            install_safe_loader(engine)
            load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if load_path is None:
                raise ValueError(f"DeepSpeed could not load the engine state from {path / ENGINE_TAG}")
        state = safe_load(path / f"trainer_rank{self.rank % meta['world_size']:05d}.pt")
        return state, meta


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its meta.json)."""
    return int(json.loads((Path(path) / META_FILE).read_text())["step"])


def file_records(root: Path, recorded: dict[str, dict] | None = None) -> dict[str, dict]:
    """meta.json's "files": every file under `root` (but meta.json) with its size and sha256.
    `recorded`: records made while writing; the other files (small ones written by DeepSpeed
    or as text) are hashed here."""
    recorded = recorded or {}
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == META_FILE:
            continue
        name = str(p.relative_to(root))
        rec = recorded.get(name)
        if rec is not None and rec["size"] != p.stat().st_size:
            raise RuntimeError(f"{p} has {p.stat().st_size} bytes, but {rec['size']} were written to it")
        out[name] = rec if rec is not None else file_record(p)
    return out


def _listed(meta: dict) -> dict[str, dict]:
    """meta["files"] as records; checkpoints written before content hashes list sizes only."""
    return {name: rec if isinstance(rec, dict) else {"size": rec} for name, rec in meta["files"].items()}


def listed_files_problems(path: str | Path, names: list[str] | None = None) -> list[str]:
    """What makes checkpoint `path` incomplete: meta.json missing or unreadable, or a file it
    lists (`names`: only these) absent or of another size. Empty when complete. No hashing."""
    path = Path(path)
    try:
        files = _listed(json.loads((path / META_FILE).read_text()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return [f"{path / META_FILE} is missing or unreadable ({e.__class__.__name__})"]
    problems = []
    for name in files if names is None else names:
        f = path / name
        if name not in files:
            problems.append(f"{f} is not listed in {META_FILE}")
        elif not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != files[name]["size"]:
            problems.append(f"{f} has {f.stat().st_size} bytes, {META_FILE} says {files[name]['size']} (truncated "
                            "or damaged)")
    return problems


def damaged_files(path: str | Path, names: list[str] | None = None, share: tuple[int, int] = (0, 1)) -> list[str]:
    """The listed files of checkpoint `path` (`names`: only these) that are missing, of the
    wrong size, or whose content no longer has the sha256 recorded when they were written.
    `share` = (rank, world): this rank checks every world-th file only (together the ranks
    check all of them once). Empty when every checked file is intact."""
    problems = listed_files_problems(path, names)
    if problems:
        return problems
    path = Path(path)
    files = _listed(json.loads((path / META_FILE).read_text()))
    rank, world = share
    for i, name in enumerate(sorted(files if names is None else names)):
        want = files[name].get("sha256")
        if i % world != rank or want is None:
            continue
        got = file_record(path / name)["sha256"]
        if got != want:
            problems.append(f"{path / name} does not have the content it was saved with (sha256 {got[:12]}..., "
                            f"{META_FILE} says {want[:12]}...; damaged after saving)")
    return problems


def _write_extra_files(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            (root / name).write_text(content)


def write_model_checkpoint(out: str | Path, model_state: dict, config_yaml: str,
                           meta: dict | Callable[[Path], dict],
                           extra_files: dict[str, str | bytes] | None = None) -> Path:
    """A checkpoint of weights only (model.pt, config.yaml, the files of `extra_files`,
    meta.json listing every file with its size). `meta`: a dict, or a function of the written
    directory that returns it (to record sizes of the files). Returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = {MODEL_FILE: save_recorded(model_state, out / MODEL_FILE)}
    (out / CONFIG_FILE).write_text(config_yaml)
    _write_extra_files(out, extra_files or {})
    meta = meta(out) if callable(meta) else meta
    (out / META_FILE).write_text(json.dumps({**meta, "files": file_records(out, records)}, indent=2))
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
        problems = _weights_problems(p)
        if problems:
            raise ValueError(f"checkpoint {p}: {problems[0]}; restore the file, or pass another checkpoint (a run "
                             "directory: its latest intact one)")
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and any(root.glob("step_*")):
            for cand in sorted(root.glob("step_*"), reverse=True):
                if not CheckpointManager.is_valid(cand):
                    continue  # incomplete: an unfinished save
                if not has_weights(cand):
                    break
                problems = _weights_problems(cand)
                if not problems:
                    return cand
                log.warning("skipping damaged checkpoint %s: %s", cand, problems[0])
    raise ValueError(f"{path} is not a checkpoint (no model.pt + config.yaml) and holds no valid "
                     "checkpoints/step_* directory; pass a directory written by launch/train.py or "
                     "fusiontree.eval.pruning.apply_pruning")


def _weights_problems(ckpt: Path) -> list[str]:
    """Damage in the files evaluation reads from `ckpt` (model.pt or, without it, the engine
    files, and config.yaml), by meta.json's sizes and hashes. A directory without meta.json,
    or whose meta.json lists no files (weights put together by hand), has nothing to check
    against."""
    if not (ckpt / META_FILE).is_file():
        return []
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        if "files" not in meta:
            return []
        listed = _listed(meta)
    except (ValueError, AttributeError):
        return [f"{ckpt / META_FILE} is unreadable"]
    weights = [MODEL_FILE] if MODEL_FILE in listed or (ckpt / MODEL_FILE).is_file() else \
        [n for n in listed if n.startswith(ENGINE_TAG + "/")]
    return damaged_files(ckpt, weights + [CONFIG_FILE])


def load_weights_file(path: str | Path) -> dict:
    """A weights file (model.pt) with safe_load; an unreadable one (truncated, not a torch
    file) is a ValueError that names it."""
    try:
        return safe_load(path, deepspeed_classes=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} cannot be read as a weights file ({str(e).splitlines()[0][:200]}); it is truncated "
                         "or damaged: restore it, or use another checkpoint") from e


def load_model_weights(model, path: str | Path) -> Path:
    """Load the model.pt of a checkpoint (or the latest of a run directory) into `model`, a plain
    model of the same config; returns the checkpoint directory. A mismatch is an error that
    names the config to use."""
    ckpt = resolve_checkpoint(path)
    try:
        model.load_state_dict(load_weights_file(ckpt / MODEL_FILE))
    except RuntimeError as e:
        raise ValueError(f"the weights of {ckpt} do not fit this run's model config ({str(e)[:300]}); use the "
                         f"model section of {ckpt / CONFIG_FILE}") from e
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", kernels: str | None = None,
                    overrides: list[str] | None = None) -> LoadedCheckpoint:
    """Build the model of the checkpoint's config, load its weights, put it in eval mode.
    `kernels`: "reference" forces the PyTorch reference ops; None picks what the config says
    (`auto` resolves per device). `overrides`: dotted config overrides (e.g. --data.shards_dir=...).
    A missing, incomplete or unreadable checkpoint is a ValueError that names it."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / CONFIG_FILE, overrides)
    device = torch.device(device)
    kern = reference_kernels() if kernels == "reference" else resolve_kernels(cfg.kernels, device)
    model = HybridLanguageModel(cfg.model, kern)
    state = load_weights_file(ckpt / MODEL_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / MODEL_FILE} does not match its config.yaml (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}); was the config edited after saving?")
    return LoadedCheckpoint(ckpt, cfg, read_meta(ckpt), model.to(device).eval())


def tokenizer_files(tok) -> tuple[dict[str, bytes], dict]:
    """What a checkpoint keeps of its run's tokenizer: the file (extra_files) and meta.json's
    record of it, so that the checkpoint reads its own text wherever it is moved."""
    return {tok.file_name: tok.data}, {"tokenizer_file": tok.file_name, "tokenizer_kind": tok.kind,
                                       "tokenizer_special_ids": tok.special_ids}


def stored_tokenizer_path(path: Path, meta: dict) -> Path | None:
    """The tokenizer file saved inside checkpoint `path`, or None (checkpoints saved before they
    kept one)."""
    name = meta.get("tokenizer_file")
    return path / name if name and (path / name).is_file() else None


def checkpoint_tokenizer(ckpt: LoadedCheckpoint, override: str | Path = ""):
    """The tokenizer of a checkpoint: `override` (a .model or tokenizer.json), else the copy the
    checkpoint keeps, else the file its run trained with (meta.json), else the one its shards'
    manifest names. It must match the checkpoint: as many ids as the model's vocabulary, and
    the very tokenizer the run trained with when meta.json records its sha256 (ValueError
    otherwise: ids would silently mean other text)."""
    from fusiontree.data.tokenizer import load_tokenizer_file, tokenizer_from_build, tokenizer_from_bytes

    stored = stored_tokenizer_path(ckpt.path, ckpt.meta)
    if override:
        tok = load_tokenizer_file(override)
    elif stored is not None:
        tok = tokenizer_from_bytes(ckpt.meta["tokenizer_kind"], stored.read_bytes(), str(stored),
                                   ckpt.meta.get("tokenizer_special_ids"))
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
