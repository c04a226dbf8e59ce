"""Streaming curriculum loader over length-bucketed shards, with exact resume.

Shapes: B = micro-batch size (rows), T = sequence length of the current stage.

How a trainer drives it (fusiontree/train/trainer.py does exactly this):

    loader = build_train_loader(cfg.data, rank=dp_rank, world_size=dp_size, seed=cfg.seed)
    # loader.micro_batch_size, loader.grad_accum_steps, loader.seq_len: the current stage
    while step < steps:
        batches = [loader.next_batch() for _ in range(loader.grad_accum_steps)]
        ... forward/backward on each, optimizer step ...
        loader.advance(global_tokens)   # tokens of this step over all ranks (= global_batch_tokens)
    ckpt["loader"] = loader.state_dict()     # same on every rank; save it with the checkpoint
    loader.load_state_dict(ckpt["loader"])   # on resume: the same samples follow, in the same order

`rank` / `world_size` are the *data-parallel* rank and size (ranks of one tensor-parallel
group pass the same values and get the same batches). A batch is a dict of:

    input_ids     int64 [B, T]
    position_ids  int64 [B, T]  restart at 0 at every document start in the row
    seq_idx       int32 [B, T]  document index within the row: 0, 1, 2, ...
    sample_id     int64 [B]     index of the sample within its split and bucket
    substituted   bool  [B]     rows that stand in for an unreadable sample (on_corrupt_shard=skip)

Curriculum: `cfg.curriculum` lists stages (seq_len, until_tokens). `advance()` adds the
step's tokens; the stage in force is the first whose until_tokens exceeds the tokens seen
(0 = to the end). Stages change only between optimizer steps. The micro-batch size is
micro_batch_tokens // seq_len, the accumulation steps global_batch_tokens //
(micro_batch_tokens * world_size): both fixed per stage, tokens per step fixed throughout.

Epochs, ranks and workers (per bucket; a bucket left mid-epoch by a stage change carries on
where it stopped if a later stage uses it again):
- epoch e's order: the bucket's shards in a permutation seeded by (seed, e, bucket), read
  as one sequence of N samples.
- each rank takes a contiguous range of nb * B samples, nb = N // (world_size * B): every
  rank gets exactly nb micro-batches per epoch. The N - world_size * nb * B samples at the
  end of the epoch's order are not read in that epoch (`dropped_per_epoch` in `stats()`);
  the shard order changes every epoch, so different samples are left out each time.
- a rank's range is split into contiguous blocks, one per dataloader worker; logical worker
  w yields the rank's micro-batches w, w + W, w + 2W, ... (W = max(1, num_workers)), which
  is the order torch's DataLoader returns them in. Within each piece of a shard a block
  reads, samples are permuted, seeded by (seed, e, bucket, shard, start).
So the sample order is a function of (seed, epoch, rank, world_size, W, B), and the loader
state is a few counters kept in the training process: tokens seen, and per bucket (epoch,
micro-batches consumed). Resuming recomputes the order and skips what was consumed; the
DataLoader workers are re-dealt so the first one produces the next batch in order.

Resuming under another data-parallel size (or number of workers), mid-epoch: every global
step is global_batch_tokens / micro_batch_tokens micro-batch slots, whatever the size. The
rest of each bucket's epoch is read as the checkpoint's ranks would have read it ("virtual"
streams, read in the training process): new rank n's accumulation micro-batch i is slot
j = n * accum_new + i, which the old layout gave to old rank j // accum_old as its micro-
batch j % accum_old of the step. So every step reads the samples of the uninterrupted run,
and each remaining sample of the epoch once. The virtual streams end with the last whole
step of the epoch; the old ranks' last micro-batches of the epoch that do not fill a step
(fewer than accum_old per old rank) are skipped, and the next epoch is the new layout's.
This needs the same micro_batch_tokens (the slots must be the same micro-batches).

Validation: `build_val_loaders` gives one re-iterable loader per val bucket up to the
longest stage, in a fixed order, the same number of batches on every rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from fusiontree.config import DataConfig
from fusiontree.data.packing import positions_from_doc_starts
from fusiontree.data.shards import (CorruptShardError, ShardInfo, bucket_shards, manifest_fingerprint,
                                    read_manifest, read_shard_range, verify_shards)
from fusiontree.data.tokenizer import Tokenizer, tokenizer_from_build

log = logging.getLogger("fusiontree.data")

STATE_VERSION = 1
_SPLIT_CODE = {"train": 0, "val": 1}


# ------------------------------------------------------------------------------ epoch plan

@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its batches of one bucket and epoch (picklable)."""
    shards: tuple[ShardInfo, ...]
    split: str
    seq_len: int
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # logical workers W >= 1
    seed: int
    epoch: int
    shuffle: bool
    token_dtype: str
    vocab_size: int
    on_corrupt_shard: str

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def batches_per_rank(self) -> int:
        return self.num_samples // (self.world_size * self.batch_size)

    def worker_batches(self, w: int) -> int:
        nb, W = self.batches_per_rank, self.num_workers
        return nb // W + (w < nb % W)

    def shard_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        rng = np.random.default_rng([self.seed, self.epoch, self.seq_len, _SPLIT_CODE[self.split]])
        return rng.permutation(len(self.shards)).tolist()

    def worker_segments(self, w: int) -> list[tuple[int, int, int]]:
        """Logical worker w's block of samples as (shard index, start, stop) pieces, in order."""
        B = self.batch_size
        begin = self.rank * self.batches_per_rank * B + B * sum(self.worker_batches(v) for v in range(w))
        end = begin + self.worker_batches(w) * B
        out, pos = [], 0
        for k in self.shard_order():
            n = self.shards[k].samples
            lo, hi = max(begin, pos), min(end, pos + n)
            if lo < hi:
                out.append((k, lo - pos, hi - pos))
            pos += n
            if pos >= end:
                break
        return out


def _read_segment(spec: StreamSpec, segments: list[tuple[int, int, int]], i: int
                  ) -> list[tuple[int, np.ndarray, np.ndarray, bool]]:
    """The samples of segment i, permuted: (sample id, tokens_T, doc_starts_D, substituted).

    Always returns stop - start samples: under on_corrupt_shard=skip, unreadable ones are
    replaced (cycling) by the readable samples of this segment, else of the nearest readable
    segment of the same worker block; so every rank still yields the same number of batches.
    """
    k, start, stop = segments[i]
    shard = spec.shards[k]
    got, err = read_shard_range(shard, start, stop, spec.seq_len, spec.token_dtype, spec.vocab_size)
    if err is not None:
        if spec.on_corrupt_shard == "error":
            raise CorruptShardError(f"shard {shard.path}: {err} (reading samples {start}..{stop} of "
                                    f"{shard.samples}). Rebuild the shards, restore the file, or set "
                                    "data.on_corrupt_shard=skip to skip and count unreadable samples")
        log.warning("skipping unreadable samples of shard %s: %s; %d of samples %d..%d stand in for them",
                    shard.path, err, len(got), start, stop)
    samples = [(idx, toks, starts, False) for idx, toks, starts in got]
    n = stop - start
    if len(samples) < n:
        source = samples
        # Nearest readable segment: forward first, then backward (deterministic either way).
        for j in list(range(i + 1, len(segments))) + list(range(i - 1, -1, -1)):
            if source:
                break
            k2, a2, b2 = segments[j]
            more, _ = read_shard_range(spec.shards[k2], a2, b2, spec.seq_len, spec.token_dtype, spec.vocab_size)
            source = [(idx, toks, starts, False) for idx, toks, starts in more]
        if not source:
            raise CorruptShardError(f"no readable sample in any shard of {spec.split} bucket {spec.seq_len} "
                                    f"assigned to rank {spec.rank} (first: {shard.path}); rebuild the shards")
        fill = [(idx, toks, starts, True) for idx, toks, starts, _ in source]
        samples = samples + [fill[j % len(fill)] for j in range(n - len(samples))]
    if spec.shuffle:
        rng = np.random.default_rng([spec.seed, spec.epoch, spec.seq_len, _SPLIT_CODE[spec.split], k, start])
        samples = [samples[j] for j in rng.permutation(n)]
    return samples


def collate(samples: list[tuple[int, np.ndarray, np.ndarray, bool]], seq_len: int) -> dict[str, torch.Tensor]:
    input_ids_BT = np.stack([s[1] for s in samples]).astype(np.int64)
    position_ids_BT, seq_idx_BT = positions_from_doc_starts([s[2] for s in samples], seq_len)
    return {"input_ids": torch.from_numpy(input_ids_BT), "position_ids": torch.from_numpy(position_ids_BT),
            "seq_idx": torch.from_numpy(seq_idx_BT),
            "sample_id": torch.tensor([s[0] for s in samples], dtype=torch.int64),
            "substituted": torch.tensor([s[3] for s in samples], dtype=torch.bool)}


def worker_batches(spec: StreamSpec, w: int, skip_batches: int):
    """Logical worker w's micro-batches of the epoch, after skipping `skip_batches` of them."""
    B = spec.batch_size
    segments = spec.worker_segments(w)
    skip = skip_batches * B
    pending: list = []
    for i, (_, start, stop) in enumerate(segments):
        if skip >= stop - start:
            skip -= stop - start  # consumed before a resume: not even opened
            continue
        samples = _read_segment(spec, segments, i)[skip:]
        skip = 0
        for s in samples:
            pending.append(s)
            if len(pending) == B:
                yield collate(pending, spec.seq_len)
                pending = []
    assert not pending, "a worker block is a whole number of batches"


class _EpochStream(torch.utils.data.IterableDataset):
    """One bucket-epoch of one rank, resuming after `start` consumed micro-batches."""

    def __init__(self, spec: StreamSpec, start: int):
        super().__init__()
        self.spec, self.start = spec, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        W = self.spec.num_workers
        i = info.id if info is not None else 0
        assert (info.num_workers if info is not None else 1) == W
        # DataLoader asks workers 0, 1, ... in turn; deal the logical workers so that the
        # first one asked owns batch `start`, the next batch `start + 1`, and so on.
        w = (i + self.start) % W
        consumed = max(0, (self.start - w + W - 1) // W)
        return worker_batches(self.spec, w, consumed)


# ------------------------------------------------------------------------------ loaders

def _check_dp(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"data-parallel rank {rank} / size {world_size}: need 0 <= rank < size")


def _stream_base(cfg: DataConfig, manifest: dict, split: str, seq_len: int, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle: bool) -> StreamSpec:
    shards = bucket_shards(cfg.shards_dir, manifest, split, seq_len)
    return StreamSpec(tuple(shards), split, seq_len, batch_size, rank, world_size, max(1, num_workers), seed, 0,
                      shuffle, manifest["token_dtype"], int(manifest["vocab_size"]), cfg.on_corrupt_shard)


def _verify(cfg: DataConfig, specs: list[StreamSpec], rank: int, world_size: int) -> None:
    shards = sorted({s for spec in specs for s in spec.shards}, key=lambda s: str(s.path))
    # Each rank hashes every world_size-th shard: together the ranks check all of them once.
    mine = {s.path for j, s in enumerate(shards) if j % world_size == rank}
    verify_shards(shards, cfg.verify_shards, mine)


class TrainLoader:
    """The training stream of one data-parallel rank; see the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0):
        cfg.validate()
        _check_dp(rank, world_size)
        per_step = cfg.micro_batch_tokens * world_size
        if cfg.global_batch_tokens % per_step:
            raise ValueError(f"data config: global_batch_tokens={cfg.global_batch_tokens} is not a multiple of "
                             f"micro_batch_tokens x data-parallel size = {cfg.micro_batch_tokens} x {world_size}; "
                             f"use a multiple of {per_step} (or fewer ranks / smaller micro_batch_tokens)")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.manifest = read_manifest(cfg.shards_dir)
        self.fingerprint = manifest_fingerprint(cfg.shards_dir)
        self.grad_accum_steps = cfg.global_batch_tokens // per_step
        self.num_workers = cfg.num_workers
        self._specs: dict[int, StreamSpec] = {}
        for stage in cfg.curriculum:
            L = stage.seq_len
            if L in self._specs:
                continue
            spec = _stream_base(cfg, self.manifest, "train", L, cfg.micro_batch_tokens // L, rank, world_size,
                                cfg.num_workers, seed, cfg.shuffle)
            if spec.batches_per_rank == 0:
                raise ValueError(f"train bucket {L} has {spec.num_samples} samples, fewer than one micro-batch on "
                                 f"every rank ({world_size} x {spec.batch_size}); build more data for it "
                                 "(--bucket-shares), or lower micro_batch_tokens")
            self._specs[L] = spec
        _verify(cfg, list(self._specs.values()), rank, world_size)
        self.tokens_seen = 0
        self._micro_in_step = 0
        self._pos = {L: {"epoch": 0, "batches": 0} for L in self._specs}
        # per bucket, the epoch of another layout that is read to its end (module docstring):
        # {"world_size", "num_workers", "epoch", "batches": consumed by each of its ranks}
        self._virtual: dict[int, dict] = {}
        self._virtual_readers: dict[tuple[int, int, int], tuple] = {}  # (L, rank, worker) -> (iterator, next)
        self.substituted_samples = 0
        self._it = None
        self._it_seq_len = 0
        for L, spec in self._specs.items():
            log.info("train bucket %d: %d samples, micro-batch %d, %d micro-batches per rank per epoch, %d samples "
                     "left out per epoch", L, spec.num_samples, spec.batch_size, spec.batches_per_rank,
                     self.dropped_per_epoch(L))

    # ---- the current stage
    @property
    def stage_index(self) -> int:
        for i, stage in enumerate(self.cfg.curriculum):
            if stage.until_tokens == 0 or self.tokens_seen < stage.until_tokens:
                return i
        return len(self.cfg.curriculum) - 1  # past the last stage's end: stay in it

    @property
    def seq_len(self) -> int:
        return self.cfg.curriculum[self.stage_index].seq_len

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.micro_batch_tokens // self.seq_len

    def epoch(self, seq_len: int) -> int:
        v = self._virtual.get(seq_len)
        return v["epoch"] if v is not None else self._pos[seq_len]["epoch"]

    def dropped_per_epoch(self, seq_len: int) -> int:
        spec = self._specs[seq_len]
        return spec.num_samples - spec.batches_per_rank * spec.batch_size * self.world_size

    def stats(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "stage": self.stage_index, "seq_len": self.seq_len,
                "substituted_samples": self.substituted_samples,
                "buckets": {L: {"samples": s.num_samples, "micro_batch_size": s.batch_size,
                                "batches_per_epoch": s.batches_per_rank, "dropped_per_epoch": self.dropped_per_epoch(L),
                                **self._pos[L], "virtual": self._virtual.get(L)} for L, s in self._specs.items()}}

    # ---- iteration
    def _open(self, seq_len: int) -> None:
        self.close()
        pos = self._pos[seq_len]
        spec = replace(self._specs[seq_len], epoch=pos["epoch"])
        ds = _EpochStream(spec, pos["batches"])
        if self.num_workers == 0:
            self._it = iter(ds)
        else:
            # Pinned batches let the trainer's .to(device, non_blocking=True) overlap the copy.
            # The DataLoader draws its workers' seeds from `generator`; from torch's global
            # generator it would take one number per opening, and a resumed run, which opens its
            # loader at a different step than the uninterrupted run, would continue with
            # another RNG state. The workers use no randomness: their order is the spec's.
            self._it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                        prefetch_factor=self.cfg.prefetch_factor,
                                                        pin_memory=torch.cuda.is_available(),
                                                        generator=torch.Generator().manual_seed(self.seed)))
        self._it_seq_len = seq_len

    def close(self) -> None:
        """Stop the worker processes (prefetched batches are dropped; the state is unaffected)."""
        self._it = None  # the DataLoader iterator shuts its workers down when released
        self._it_seq_len = 0
        self._virtual_readers = {}

    def _virtual_accum(self, v: dict) -> int:
        return self.cfg.global_batch_tokens // (self.cfg.micro_batch_tokens * v["world_size"])

    def _virtual_batch(self, L: int, v: dict) -> dict[str, torch.Tensor]:
        """This rank's micro-batch of the step from the old layout's streams (module docstring)."""
        accum_old = self._virtual_accum(v)
        old_rank, i = divmod(self.rank * self.grad_accum_steps + self._micro_in_step, accum_old)
        k = v["batches"] + i  # the old rank's micro-batch k of the epoch: logical worker k % W, its (k // W)-th
        spec = replace(self._specs[L], rank=old_rank, world_size=v["world_size"], num_workers=v["num_workers"],
                       epoch=v["epoch"])
        w, q = k % spec.num_workers, k // spec.num_workers
        it, nxt = self._virtual_readers.get((L, old_rank, w), (None, -1))
        if nxt != q:
            it = worker_batches(spec, w, q)
        batch = next(it)
        self._virtual_readers[(L, old_rank, w)] = (it, q + 1)
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._micro_in_step == self.grad_accum_steps:
            raise RuntimeError(f"next_batch() called for micro-batch {self._micro_in_step + 1} of a step of "
                               f"{self.grad_accum_steps}; call advance(tokens) after each optimizer step")
        L = self.seq_len
        if L in self._virtual:
            batch = self._virtual_batch(L, self._virtual[L])
        else:
            if self._it is None or self._it_seq_len != L:
                self._open(L)
            while True:
                try:
                    batch = next(self._it)
                    break
                except StopIteration:  # the epoch is done: the next one has a new order
                    self._pos[L] = {"epoch": self._pos[L]["epoch"] + 1, "batches": 0}
                    self._open(L)
            self._pos[L]["batches"] += 1
        assert batch["input_ids"].shape == (self.micro_batch_size, L)
        self._micro_in_step += 1
        self.substituted_samples += int(batch["substituted"].sum())
        return batch

    def advance(self, tokens: int | float) -> None:
        """Close an optimizer step of `tokens` tokens over all ranks (this is what moves the
        curriculum). It must equal global_batch_tokens; a float32 all-reduce may round it."""
        if self._micro_in_step != self.grad_accum_steps:
            raise RuntimeError(f"advance() after {self._micro_in_step} micro-batches; a step is "
                               f"{self.grad_accum_steps} next_batch() calls")
        want = self.cfg.global_batch_tokens
        if abs(tokens - want) > 1e-6 * want:
            raise ValueError(f"advance({tokens}): a step here is {want} tokens over all {self.world_size} ranks "
                             f"(data.global_batch_tokens); pass the step's tokens summed over data-parallel ranks")
        L = self.seq_len
        v = self._virtual.get(L)
        if v is not None:
            v["batches"] += self._virtual_accum(v)
            self._end_virtual_if_done(L)
        self.tokens_seen += want
        self._micro_in_step = 0
        if self._it is not None and self._it_seq_len != self.seq_len:
            self.close()  # new stage: its bucket opens on the next next_batch()

    def _end_virtual_if_done(self, L: int) -> None:
        """The virtual streams of bucket L end before a step they cannot fill (module docstring)."""
        v = self._virtual[L]
        spec = replace(self._specs[L], world_size=v["world_size"])
        if v["batches"] + self._virtual_accum(v) > spec.batches_per_rank:
            del self._virtual[L]
            self._virtual_readers = {k: r for k, r in self._virtual_readers.items() if k[0] != L}

    # ---- resume
    def _identity(self) -> dict:
        return {"fingerprint": self.fingerprint, "world_size": self.world_size, "num_workers": max(1, self.num_workers),
                "seed": self.seed, "shuffle": self.cfg.shuffle, "micro_batch_tokens": self.cfg.micro_batch_tokens}

    def state_dict(self) -> dict:
        """Plain ints and strings, identical on every rank."""
        return {"version": STATE_VERSION, **self._identity(), "tokens_seen": self.tokens_seen,
                "micro_in_step": self._micro_in_step, "substituted_samples": self.substituted_samples,
                "buckets": {str(L): dict(p) for L, p in self._pos.items()},
                "virtual": {str(L): dict(v) for L, v in self._virtual.items()}}

    def _continue_layout(self, state: dict, buckets: dict[int, dict]) -> dict[int, dict]:
        """Resuming under another data-parallel size or worker count: each bucket in mid-epoch
        reads the rest of it as the checkpoint's ranks would (module docstring). Returns this
        layout's own positions; sets the virtual streams."""
        if state["micro_in_step"]:
            raise ValueError("the loader state was saved in the middle of a step; resume it with the data-parallel "
                             "size and data.num_workers it was saved with")
        virtual = {int(L): dict(v) for L, v in state.get("virtual", {}).items()}
        own = {}
        for L, p in buckets.items():
            v = virtual.get(L)
            if v is not None and p["batches"]:  # cannot happen: the virtual streams end before a whole step
                raise AssertionError(f"bucket {L}: virtual streams and {p['batches']} batches of the next epoch")
            if v is None and p["batches"]:
                v = {"world_size": int(state["world_size"]), "num_workers": int(state["num_workers"]),
                     "epoch": p["epoch"], "batches": p["batches"]}
                p = {"epoch": p["epoch"] + 1, "batches": 0}
            own[L] = p
            if v is not None and L in self._specs:
                self._virtual[L] = v
                left = replace(self._specs[L], world_size=v["world_size"]).batches_per_rank - v["batches"]
                log.info("train bucket %d: the rest of epoch %d is read as %d data-parallel ranks read it (%d steps); "
                         "its last %d micro-batches per old rank, too few for a step, are skipped", L, v["epoch"],
                         v["world_size"], left // self._virtual_accum(v), left % self._virtual_accum(v))
                self._end_virtual_if_done(L)
        return own

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        self.close()
        ours = self._identity()
        diff = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        buckets = {int(L): dict(p) for L, p in state["buckets"].items()}
        self.tokens_seen = int(state["tokens_seen"])
        self._micro_in_step = int(state["micro_in_step"])
        self.substituted_samples = int(state.get("substituted_samples", 0))
        self._virtual = {}
        if diff and set(diff) <= {"world_size", "num_workers"}:  # another layout over the same batches
            buckets = self._continue_layout(state, buckets)
            diff = {}
        elif not diff:
            self._virtual = {int(L): dict(v) for L, v in state.get("virtual", {}).items() if int(L) in self._specs}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            if self.cfg.resume_mismatch == "error":
                raise ValueError(f"the loader state cannot resume exactly here ({what}); resume with the same "
                                 "data-parallel size, data.num_workers, seed, data.micro_batch_tokens and shards, or "
                                 "set data.resume_mismatch=next_epoch to start every bucket at its next epoch")
            log.warning("loader state from a different set-up (%s): every bucket restarts at its next epoch", what)
            buckets = {L: {"epoch": p["epoch"] + (p["batches"] > 0), "batches": 0} for L, p in buckets.items()}
            self._micro_in_step = 0
        for L in self._pos:
            if L in buckets:
                self._pos[L] = {"epoch": int(buckets[L]["epoch"]), "batches": int(buckets[L]["batches"])}
            else:
                self._pos[L] = {"epoch": 0, "batches": 0}  # a bucket the checkpointed curriculum never used


class ValLoader:
    """One val bucket for one rank: re-iterable, fixed order, the same batch count on every rank."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    def __len__(self) -> int:
        return self.spec.batches_per_rank

    def __iter__(self):
        return worker_batches(self.spec, 0, 0)


def build_train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainLoader:
    return TrainLoader(cfg, rank, world_size, seed)


def build_val_loaders(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> dict[str, ValLoader]:
    """{"seq512": loader, ...}: the val buckets no longer than the longest curriculum stage
    that hold at least one micro-batch per rank (micro-batch = micro_batch_tokens // seq_len)."""
    cfg.validate()
    _check_dp(rank, world_size)
    manifest = read_manifest(cfg.shards_dir)
    longest = max(s.seq_len for s in cfg.curriculum)
    out: dict[str, ValLoader] = {}
    specs = []
    for key, entry in sorted(manifest["splits"]["val"]["buckets"].items(), key=lambda kv: int(kv[0])):
        L = int(key)
        if L > longest:
            continue
        spec = _stream_base(cfg, manifest, "val", L, max(1, cfg.micro_batch_tokens // L), rank, world_size, 0, 0,
                            shuffle=False)
        if spec.batches_per_rank == 0:
            log.warning("val bucket %d: %d samples, fewer than one micro-batch per rank (%d x %d); not evaluated",
                        L, spec.num_samples, world_size, spec.batch_size)
            continue
        out[f"seq{L}"] = ValLoader(spec)
        specs.append(spec)
    _verify(cfg, specs, rank, world_size)
    return out


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer these shards were built with, as their manifest records it (kind, file,
    special ids), checked against its sha256; `data.tokenizer` may name another copy."""
    return tokenizer_from_build(cfg.shards_dir, cfg.tokenizer)
