"""Build length-bucketed webdataset shards: text -> tokenizer -> tokens -> packed samples -> shards.

    summary = build_shards(BuildArgs(inputs=["corpus/"], output="data/shards", vocab_size=8192))
    summary = build_shards(BuildArgs(sources=[Source("code", ["code/"], 0.7), Source("web", ["web.jsonl.zst"], 0.3)],
                                     tokenizer="tokenizer.json", output="data/mix"))

Steps (`data_pipeline/build_shards.py` is the command line for this):

1. Inputs become read units and tasks (fusiontree/data/corpus.py); each document is assigned
   to the train or val split by a seeded hash of its group (its file's path relative to the
   inputs; each jsonl line and table row is a group of its own), so no document lands in
   both splits.
2. The tokenizer: `--tokenizer` (a SentencePiece .model or a Hugging Face tokenizer.json,
   fusiontree/data/tokenizer.py), else SentencePiece BPE trained on a seeded sample of the
   train split's lines (`tokenizer_sample_mb`), with `workers` threads.
3. A pool of `workers` processes reads and tokenizes the tasks in input order, at most
   `2 x workers + 2` in flight, so memory does not grow with the input; each document gets
   eos at its end.
4. Mixtures (`sources`, more than one): every source is tokenized once into a spill file in
   the staging directory, then each split's documents are sampled so that every source's
   tokens follow its weight (below), and the sources are interleaved in proportion.
5. Documents are packed per split in chunks of about `chunk_tokens` tokens
   (fusiontree/data/packing.py) and written as shards per bucket (fusiontree/data/shards.py).
   A chunk's documents wait on disk (the staging directory's `.spill/`) until it is full, and
   shards are written sample by sample, so the builder's memory is bounded by `chunk_tokens`,
   `workers` and the buckets, not by the input. The exception is a mixture's sampling, after
   tokenizing: it reads back each document's length and rank (16 bytes) for one split at a
   time and sorts them, under 100 bytes a document while that split is sampled.
6. manifest.json is written last, into a staging directory beside `output`; only a complete
   build replaces `output` (two renames). A failed build, whatever the cause, leaves the
   previous build in `output` as it was, and removes its staging directory (a killed build
   leaves `.NAME.building-*` beside the output, safe to delete).

Mixture sampling, per split: the output holds as many tokens as the sources' inputs together
(T = sum of T_s); source s gets w_s / sum(w) x T of them. A source with r = target / T_s
copies of its documents gets floor(r) copies of every document, plus one more copy of the
first documents of a seeded order (a hash of seed and document key) whose tokens come
closest to the remainder: whole documents, within half a document of the target, and the
same output for the same seed. Copies are emitted in passes over the source (first copies
of all, then second copies...), so repeats spread over the build, not next to each other.

The same inputs and arguments give byte-identical shards, tokenizer and manifest.
"""

from __future__ import annotations

import hashlib
import heapq
import multiprocessing as mp
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from fusiontree.data import corpus
from fusiontree.data.corpus import ReadResult, Unit
from fusiontree.data.packing import PackStats, pack_documents
from fusiontree.data.shards import FORMAT, MANIFEST, SPLITS, ShardWriter, token_dtype_for, write_manifest
from fusiontree.data.tokenizer import (KINDS, Tokenizer, load_tokenizer_file, sentencepiece_tokenizer,
                                       tokenizer_from_spec, train_tokenizer)
from fusiontree.host import cpu_count

DEFAULT_SEQ_LENGTHS = [512, 1024, 2048, 4096]
TOKENIZER_FILE = KINDS["sentencepiece"]  # the file of a tokenizer trained here
# What a previous build leaves in its output directory (and a rebuild may replace).
_BUILD_ENTRIES = {"train", "val", MANIFEST, *KINDS.values()}
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_SPILL = ".spill"  # the staging directory's scratch files (removed before the build is complete)


@dataclass
class Source:
    """One source of a mixture: its inputs (files, directories, globs) and its weight."""
    name: str
    inputs: list[str]
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """`NAME=PATH[,PATH...]:WEIGHT` (the command line's --source)."""
    name, eq, rest = spec.partition("=")
    paths, colon, weight = rest.rpartition(":")
    usage = f"--source {spec!r}: write NAME=PATH[,PATH...]:WEIGHT, e.g. code=data/code/,extra.jsonl.zst:0.7"
    if not eq or not colon or not name or not paths:
        raise ValueError(usage)
    try:
        w = float(weight)
    except ValueError:
        raise ValueError(f"{usage} (the weight {weight!r} is not a number)") from None
    return Source(name, [p for p in paths.split(",") if p], w)


def load_mixture(path: str | Path) -> list[Source]:
    """A mixture YAML (the command line's --mixture); relative paths are relative to the file:

        sources:
          - {name: code, inputs: [code/, extra.jsonl.zst], weight: 0.7}
          - {name: prose, inputs: web.parquet, weight: 0.3}
    """
    from fusiontree.config import read_yaml

    path = Path(path)
    try:
        doc = read_yaml(path)
    except OSError as e:
        raise ValueError(f"--mixture {path}: cannot read it ({e})") from e
    except ValueError as e:
        raise ValueError(f"--mixture {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"sources"} or not isinstance(doc["sources"], list):
        raise ValueError(f"--mixture {path}: expected one key, `sources`, holding a list of "
                         "{name: ..., inputs: [...], weight: ...}")
    out = []
    for i, s in enumerate(doc["sources"]):
        if not isinstance(s, dict) or set(s) != {"name", "inputs", "weight"}:
            raise ValueError(f"--mixture {path}: sources[{i}] must have exactly the keys name, inputs, weight; "
                             f"got {sorted(s) if isinstance(s, dict) else s!r}")
        inputs = [s["inputs"]] if isinstance(s["inputs"], str) else s["inputs"]
        if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
            raise ValueError(f"--mixture {path}: sources[{i}].inputs must be a path or a list of paths")
        if not isinstance(s["weight"], (int, float)) or isinstance(s["weight"], bool):
            raise ValueError(f"--mixture {path}: sources[{i}].weight must be a number, got {s['weight']!r}")
        out.append(Source(str(s["name"]), [str(path.parent / p) for p in inputs], float(s["weight"])))
    return out


@dataclass
class BuildArgs:
    inputs: list[str] = field(default_factory=list)  # empty (and no sources): the default corpus
    sources: list[Source] = field(default_factory=list)  # a mixture (instead of inputs)
    output: str = "data/shards"
    tokenizer: str = ""  # "": train a SentencePiece model; else a .model or tokenizer.json to use
    vocab_size: int = 8192
    seq_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_SEQ_LENGTHS))
    # Wanted share of the tokens per bucket, in the order of seq_lengths (empty: equal shares).
    bucket_shares: list[float] = field(default_factory=list)
    val_fraction: float = 0.02
    workers: int = field(default_factory=cpu_count)
    shard_size: int = 1024  # samples per shard
    seed: int = 1234
    text_field: str = "text"  # jsonl key / parquet and arrow column holding the text
    # Train-split text the tokenizer is trained on. On the default corpus 8 MB compresses 0.7%
    # worse than 16 MB and trains in half the time (1.3 s vs 2.4 s on 2 cores).
    tokenizer_sample_mb: float = 8.0
    # Documents packed together: the memory bound of packing (a chunk's tokens are held twice
    # while it is packed). 8M tokens reach that bound from about 30 MB of text on; 32M held
    # 64 MB more at the peak and were not full below 100 MB.
    chunk_tokens: int = 8 << 20
    progress: bool = True

    def validate(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"--vocab-size {self.vocab_size} must be positive")
        if not self.seq_lengths or any(L < 2 for L in self.seq_lengths):
            raise ValueError(f"--seq-lengths {self.seq_lengths}: give one or more lengths >= 2, e.g. 512,1024,2048")
        if len(set(self.seq_lengths)) != len(self.seq_lengths):
            raise ValueError(f"--seq-lengths {self.seq_lengths} repeats a length; list each bucket once")
        if self.bucket_shares and (len(self.bucket_shares) != len(self.seq_lengths) or min(self.bucket_shares) < 0
                                   or sum(self.bucket_shares) <= 0):
            raise ValueError(f"--bucket-shares {self.bucket_shares}: give one non-negative weight per bucket of "
                             f"--seq-lengths {self.seq_lengths} (in that order), not all zero")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction {self.val_fraction} must lie in [0, 1)")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers} must be >= 1")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size {self.shard_size} (samples per shard) must be >= 1")
        if self.tokenizer_sample_mb <= 0:
            raise ValueError(f"--tokenizer-sample-mb {self.tokenizer_sample_mb} must be > 0")
        if self.chunk_tokens < max(self.seq_lengths):
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be at least the largest bucket "
                             f"({max(self.seq_lengths)})")
        if self.sources and self.inputs:
            raise ValueError("give either --input or --source/--mixture, not both (a mixture's inputs belong to "
                             "its sources)")
        names = [s.name for s in self.sources]
        for s in self.sources:
            if not _SOURCE_NAME.fullmatch(s.name):
                raise ValueError(f"source name {s.name!r}: use letters, digits, '_', '.' or '-'")
            if not s.inputs:
                raise ValueError(f"source {s.name!r} has no inputs")
            if not (s.weight > 0 and np.isfinite(s.weight)):
                raise ValueError(f"source {s.name!r} has weight {s.weight}; weights must be positive numbers "
                                 "(leave a source out instead of giving it 0)")
        if len(set(names)) != len(names):
            raise ValueError(f"source names {names} repeat a name; give each source its own")


# ------------------------------------------------------------------------------ output

def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _BUILD_ENTRIES)
        if foreign:
            raise ValueError(f"--output {out} already holds files that are not a shard build ({foreign[:5]}); "
                             "choose an empty or new directory")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A new, empty directory beside `out` to build in. When the block completes, it
    replaces `out` (a previous build there, or nothing); when the block raises, it is
    removed and `out` keeps what it held. `out` may hold nothing but a previous build."""
    out = Path(out).absolute()  # "." or "x/" still get a sibling staging directory
    _check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would make the build private
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not out.exists():
        os.rename(stage, out)
        return
    _check_output(out)  # still only a build of ours
    old = stage.with_name(stage.name.replace(".building-", ".replaced-"))
    os.rename(out, old)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ workers

_WORKER: dict = {}


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and the heap's high
    water then creeps up with every block of varied-size documents)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD_BYTES = 128 << 10


def _map_large_blocks() -> None:
    """Serve every allocation of 128 KiB or more from a mapping of its own, unmapped when it
    is freed, in this process (the parent and each worker call it). By default glibc raises that
    threshold to the largest block freed so far (up to 32 MiB), after which the builder's
    blocks of text and pickled results (megabytes each, of varied sizes) come from the
    heap and fragment it: the builder's resident memory then crept up with the input while
    the bytes it held stayed flat. Process-wide and never undone; it changes where memory
    comes from, not what any code computes."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # musl has none
    except OSError:
        return None


_LIBC = _libc()


# One thread per worker process: the pool is the parallelism (tokenizers and numpy's BLAS would
# start a thread per core in every process). Set in the environment the workers start with.
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}


def _init_worker(tok_spec: tuple | None, seed: int, val_fraction: float, text_field: str, dtype: str) -> None:
    os.environ.update(_WORKER_ENV)
    _map_large_blocks()
    _WORKER.update(tok=tokenizer_from_spec(tok_spec) if tok_spec is not None else None, seed=seed,
                   val_fraction=val_fraction, text_field=text_field, dtype=np.dtype(dtype))


def _sample_lines(task) -> tuple[list[str], ReadResult]:
    """Lines of the task's train-split documents (the tokenizer's training text)."""
    res = corpus.read_task(task, _WORKER["text_field"])
    lines: list[str] = []
    for doc in res.docs:
        if corpus.split_of(doc.group, _WORKER["seed"], _WORKER["val_fraction"]) == "train":
            lines.extend(line for line in doc.text.split("\n") if line.strip())
    res.docs = []
    return lines, res


def _doc_rank(seed: int, key: str) -> int:
    """The seeded order in which a mixture picks a source's documents for an extra copy."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little")


# Characters encoded per tokenizer call: its output is a Python int per token (about 36
# bytes each, 15-20x the text), so a task's block is encoded a slice at a time and each
# slice becomes arrays at once.
_ENCODE_BATCH_CHARS = 1 << 18


def _encode_task(task) -> tuple[list[tuple[str, np.ndarray, int]], ReadResult, int]:
    """Read and tokenize a task: [(split, tokens ending with eos, rank)], read counts, its size."""
    res = corpus.read_task(task, _WORKER["text_field"])
    size = task.size
    if not res.docs:
        return [], res, size
    tok: Tokenizer = _WORKER["tok"]
    eos, unk, seed = tok.eos_id(), tok.special_ids["unk"], _WORKER["seed"]
    out = []
    start = 0
    while start < len(res.docs):
        stop, chars = start, 0
        while stop < len(res.docs) and (stop == start or chars < _ENCODE_BATCH_CHARS):
            chars += len(res.docs[stop].text)
            stop += 1
        batch = res.docs[start:stop]
        for doc, toks in zip(batch, tok.encode_batch([d.text for d in batch])):
            arr = np.empty(len(toks) + 1, dtype=_WORKER["dtype"])
            arr[:-1] = toks
            arr[-1] = eos
            if unk is not None:
                res.stats.unk_tokens += int(np.count_nonzero(arr[:-1] == unk))
            out.append((corpus.split_of(doc.group, seed, _WORKER["val_fraction"]), arr, _doc_rank(seed, doc.key)))
        start = stop
    res.docs = []
    _release_free_memory()
    return out, res, size


class WorkerDied(RuntimeError):
    """A worker process of the build ended without returning its task (killed, out of memory,
    or failed to start)."""


@contextmanager
def _worker_pool(workers: int, initargs: tuple):
    """A process pool for the block, or None for one worker (then everything runs in this process).

    Spawned, not forked: the parent has threads by now (numpy's BLAS pool, the tokenizer
    trainer's), and a child forked from a threaded process can inherit a lock held by one of
    them and wait on it forever. A worker that dies fails the build with `WorkerDied` instead
    of leaving it waiting for a result that never comes (what a `multiprocessing.Pool` does)."""
    if workers == 1:
        _init_worker(*initargs)
        yield None
        return
    # The executor starts workers as tasks arrive: the environment they start with stays set
    # for the pool's life.
    saved = {k: os.environ.get(k) for k in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=initargs)
    try:
        yield pool
    finally:
        # Queued tasks are dropped (an early stop of the tokenizer sample, or an error); the few
        # running ones (one input unit each) end before the next phase starts its own workers.
        pool.shutdown(wait=True, cancel_futures=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise WorkerDied("a build_shards worker process died before returning its work (killed, out of memory, "
                         "or failed to start); nothing was published; rerun, with fewer --workers if memory is "
                         "short, or --workers 1 to build in this process") from e


def _ordered(pool, fn, tasks, window: int):
    """fn over tasks, results in task order, at most `window` tasks submitted and not yet
    consumed (mapping everything at once would read every task ahead and queue every result)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            yield _result(pending.popleft())
    while pending:
        yield _result(pending.popleft())


def _tasks(units: list[Unit], text_field: str):
    for unit in units:
        yield from corpus.iter_tasks(unit, text_field)


# ------------------------------------------------------------------------------ steps

def _tokenizer_sample(units: list[Unit], args: BuildArgs, tqdm) -> tuple[list[str], int, ReadResult]:
    """Lines (characters counted) of train-split documents, taking units in a seeded order
    until the budget."""
    order = sorted(units, key=lambda u: hashlib.sha256(f"{args.seed}\0{u.kind}\0{u.name}\0{u.start}".encode()).digest())
    budget = int(args.tokenizer_sample_mb * 1e6)
    lines: list[str] = []
    size = 0
    seen = ReadResult()
    with _worker_pool(args.workers, (None, args.seed, args.val_fraction, args.text_field, "uint32")) as pool, \
            tqdm(total=min(budget, corpus.total_bytes(units)), unit="B", unit_scale=True, desc="tokenizer sample",
                 disable=not args.progress, file=sys.stderr) as bar:
        for got, res in _ordered(pool, _sample_lines, _tasks(order, args.text_field), 2 * args.workers + 2):
            seen.add(res)
            before = size
            for line in got:  # a single big unit must not blow the budget
                lines.append(line)
                size += len(line) + 1
                if size >= budget:
                    break
            bar.update(min(size - before, bar.total - bar.n))
            if size >= budget:
                break
    return lines, size, seen


class _Chunk:
    """The documents of a split waiting for the next packing chunk, on disk: a split that
    fills its chunk slowly (val, a few percent of the input) would otherwise hold more
    documents the larger the input, and long-lived small arrays among the builder's
    transient megabyte blocks fragment its heap."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.dtype = dtype
        self.f = open(path, "w+b")
        self.lengths = array("q")
        self.sources = array("q")
        self.tokens = 0

    def add(self, toks: np.ndarray, src: int) -> None:
        self.f.write(toks.tobytes())
        self.lengths.append(len(toks))
        self.sources.append(src)
        self.tokens += len(toks)

    def take(self) -> tuple[list[np.ndarray], list[int]]:
        """The documents (views of one array) and their sources, in the order added; empties the chunk."""
        self.f.flush()
        self.f.seek(0)
        tokens = np.fromfile(self.f, dtype=self.dtype, count=self.tokens)
        ends = np.cumsum(self.lengths).tolist()
        docs = [tokens[end - n:end] for end, n in zip(ends, self.lengths)]
        sources = self.sources.tolist()
        self.f.seek(0)
        self.f.truncate()
        self.lengths, self.sources, self.tokens = array("q"), array("q"), 0
        return docs, sources


class _Packer:
    """Collects tokenized documents per split and packs them, a chunk at a time, into the
    bucket writers; counts documents and tokens (per source for mixtures)."""

    def __init__(self, root: Path, args: BuildArgs, seq_lengths: list[int], shares: list[float], dtype: str,
                 n_sources: int):
        self.args, self.seq_lengths, self.shares = args, seq_lengths, shares
        self.writers = {(s, L): ShardWriter(root, s, L, args.shard_size, dtype) for s in SPLITS for L in seq_lengths}
        self.pack_stats = {s: PackStats() for s in SPLITS}
        (root / _SPILL).mkdir(exist_ok=True)
        self.pending = {s: _Chunk(root / _SPILL / f"chunk-{s}.tokens", np.dtype(dtype)) for s in SPLITS}
        self.docs = {s: [0] * n_sources for s in SPLITS}
        self.tokens = {s: [0] * n_sources for s in SPLITS}  # document tokens (eos included) before packing
        self.bucket_source_tokens = {(s, L): [0] * n_sources for s in SPLITS for L in seq_lengths}
        self.chunks = {s: 0 for s in SPLITS}

    def add(self, split: str, toks: np.ndarray, src: int) -> None:
        self.pending[split].add(toks, src)
        self.docs[split][src] += 1
        self.tokens[split][src] += len(toks)
        if self.pending[split].tokens >= self.args.chunk_tokens:
            self.flush(split)

    def flush(self, split: str) -> None:
        if not self.pending[split].lengths:
            return
        docs, sources = self.pending[split].take()
        rng = np.random.default_rng([self.args.seed, SPLITS.index(split), self.chunks[split]])
        packed, stats = pack_documents(docs, self.seq_lengths, rng, self.shares, sources)
        del docs
        self.pack_stats[split].add(stats)
        for L, bucket in packed.items():
            for tokens_T, starts_D in zip(bucket.tokens, bucket.doc_starts):
                self.writers[split, L].write(tokens_T, starts_D)
            for src, n in bucket.source_tokens.items():
                self.bucket_source_tokens[split, L][src] += n
        self.chunks[split] += 1
        del packed
        _release_free_memory()

    def close(self) -> None:
        for chunk in self.pending.values():
            chunk.f.close()


class _Spill:
    """A mixture source's tokenized documents of one split, on disk until they are sampled:
    their tokens, and each one's length and rank, read back only when the split is sampled
    (held while tokenizing, they would grow with the input, 16 bytes a document)."""

    _META = np.dtype([("length", "<i8"), ("rank", "<u8")])
    _ITER_DOCS = 1 << 16  # documents whose lengths and copies are turned into Python ints at a time

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.meta_path, self.dtype = path, path.with_suffix(".meta"), dtype
        self.f = open(path, "wb")
        self.meta = open(self.meta_path, "wb")
        self.lengths = self.ranks = None  # int64, uint64 per document, after close()

    def add(self, toks: np.ndarray, rank: int) -> None:
        self.f.write(toks.tobytes())
        self.meta.write(struct.pack("<qQ", len(toks), rank))

    def close(self) -> None:
        self.f.close()
        self.meta.close()
        meta = np.fromfile(self.meta_path, dtype=self._META)
        self.lengths, self.ranks = meta["length"].astype(np.int64), meta["rank"].astype(np.uint64)

    def docs(self, copies: np.ndarray, copy: int) -> Iterator[np.ndarray]:
        """The documents that have more than `copy` copies, in input order."""
        itemsize = self.dtype.itemsize
        with open(self.path, "rb") as f:
            for a in range(0, len(self.lengths), self._ITER_DOCS):
                b = a + self._ITER_DOCS
                for n, c in zip(self.lengths[a:b].tolist(), copies[a:b].tolist()):
                    if c > copy:
                        yield np.frombuffer(f.read(n * itemsize), dtype=self.dtype)
                    else:
                        f.seek(n * itemsize, os.SEEK_CUR)


def mixture_copies(lengths: np.ndarray, ranks: np.ndarray, target: float) -> np.ndarray:
    """Copies of each document so that their tokens come closest to `target`: floor(r)
    copies of all (r = target / tokens), one more for the first documents in `ranks` order
    whose tokens come closest to the remainder (within half a document)."""
    total = int(lengths.sum())
    full = int(target // total)
    rest = target - full * total
    order = np.argsort(ranks, kind="stable")
    cum = np.concatenate([[0], np.cumsum(lengths[order])])
    k = int(np.argmin(np.abs(cum - rest)))
    copies = np.full(len(lengths), full, dtype=np.int64)
    copies[order[:k]] += 1
    return copies


def _mixture_targets(split: str, tokens: list[int], weights: list[float], names: list[str]
                     ) -> tuple[list[float], str | None]:
    """Tokens each source should have in a split (the inputs' total, shared by weight), and a
    warning when a source has no documents in the split (the others share its weight)."""
    present = [t > 0 for t in tokens]
    if split == "train" and not all(present):
        missing = [n for n, p in zip(names, present) if not p]
        raise ValueError(f"source(s) {missing} have no documents in the train split; give them more input or "
                         "leave them out of the mixture")
    if not any(present):
        return [0.0] * len(tokens), None
    w = sum(wt for wt, p in zip(weights, present) if p)
    total = sum(tokens)
    targets = [wt / w * total if p else 0.0 for wt, p in zip(weights, present)]
    warning = None
    if not all(present):
        missing = [n for n, p in zip(names, present) if not p]
        warning = f"the {split} split has no documents of {missing}; the other sources share their weight there"
    return targets, warning


def _interleave(streams: list[Iterator[np.ndarray]], targets: list[float]) -> Iterator[tuple[int, np.ndarray]]:
    """Documents of all sources, always from the source furthest behind its target share, so
    every chunk of the build holds the mixture's proportions."""
    heap = [(0.0, i) for i, t in enumerate(targets) if t > 0]
    heapq.heapify(heap)
    done = [0] * len(streams)
    while heap:
        _, i = heapq.heappop(heap)
        toks = next(streams[i], None)
        if toks is None:
            continue
        yield i, toks
        done[i] += len(toks)
        heapq.heappush(heap, (done[i] / targets[i], i))


def _source_streams(spill: _Spill, copies: np.ndarray) -> Iterator[np.ndarray]:
    for copy in range(int(copies.max(initial=0))):
        yield from spill.docs(copies, copy)


def build_shards(args: BuildArgs) -> dict:
    """Run the whole build; returns the manifest plus timings (`summary["timing"]`).

    Why one function: the phases (tokenizer, packing per split, manifest) run once each, in
    order, and share the output directory and one timing record; it reads top to bottom."""
    from tqdm import tqdm

    args.validate()
    _map_large_blocks()
    shares = args.bucket_shares or [1.0] * len(args.seq_lengths)
    seq_lengths = sorted(args.seq_lengths)
    shares = [shares[args.seq_lengths.index(L)] for L in seq_lengths]
    t_start = time.perf_counter()
    mixture = bool(args.sources)
    sources = args.sources or [Source("input", list(args.inputs), 1.0)]
    source_units = [corpus.input_units(s.inputs) if s.inputs else corpus.default_units() for s in sources]
    for s, units in zip(sources, source_units):
        if not units:
            raise ValueError(f"no input: every input of {'source ' + s.name if mixture else '--input'} was empty")
    all_units = [u for units in source_units for u in units]
    out = Path(args.output)
    t0 = time.perf_counter()
    tok_info: dict = {}
    tok = None
    if args.tokenizer:  # read before anything is written: it may be the previous build's tokenizer
        tok = load_tokenizer_file(args.tokenizer)
        tok_info.update(trained=False, source=str(args.tokenizer))

    with staged_output(out) as stage:
        if tok is None:
            lines, sample_bytes, seen = _tokenizer_sample(all_units, args, tqdm)
            if not lines:
                corpus.check_text_field(seen, args.text_field)
                raise ValueError("the train split has no text to train a tokenizer on; give more input "
                                 "or lower --val-fraction")
            if args.progress:
                print(f"training SentencePiece BPE ({args.vocab_size} pieces) on {sample_bytes / 1e6:.1f} MB "
                      f"({len(lines)} lines), {args.workers} threads", file=sys.stderr)
            model = train_tokenizer(lines, args.vocab_size, args.workers, args.seed)
            del lines
            tok = sentencepiece_tokenizer(model, TOKENIZER_FILE)
            tok_info.update(trained=True, sample_bytes=sample_bytes)
        vocab_size = tok.vocab_size()
        (stage / tok.file_name).write_bytes(tok.data)
        tok_info = {**tok.manifest_entry(), **tok_info}
        t_tok = time.perf_counter() - t0

        # tokenize, (sample,) pack, write
        t0 = time.perf_counter()
        dtype = token_dtype_for(vocab_size)
        packer = _Packer(stage, args, seq_lengths, shares, dtype, len(sources))
        read = [ReadResult() for _ in sources]
        spills = {}
        if mixture:
            spills = {(i, s): _Spill(stage / _SPILL / f"{i}-{s}.tokens", np.dtype(dtype))
                      for i in range(len(sources)) for s in SPLITS}
        with _worker_pool(args.workers, (tok.spec(), args.seed, args.val_fraction, args.text_field, dtype)) as pool, \
                tqdm(total=corpus.total_bytes(all_units), unit="B", unit_scale=True,
                     desc="tokenize" if mixture else "tokenize+pack", disable=not args.progress,
                     file=sys.stderr) as bar:
            for i, units in enumerate(source_units):
                for docs, res, size in _ordered(pool, _encode_task, _tasks(units, args.text_field),
                                                2 * args.workers + 2):
                    read[i].add(res)
                    for split, toks, rank in docs:
                        if mixture:
                            spills[i, split].add(toks, rank)
                        else:
                            packer.add(split, toks, i)
                    bar.update(size)
        total_read = ReadResult()
        for r in read:
            total_read.add(r)
        corpus.check_text_field(total_read, args.text_field)
        read_stats = total_read.stats
        if read_stats.documents == 0:
            raise ValueError(f"no documents: all {read_stats.empty_documents_skipped} input documents were empty "
                             "(or every jsonl line / table row was bad); check --input and --text-field")
        mixture_info = None
        if mixture:
            mixture_info = _sample_mixture(sources, spills, packer, read, args)
        for split in SPLITS:
            packer.flush(split)
        packer.close()
        shutil.rmtree(stage / _SPILL)
        t_pack = time.perf_counter() - t0

        names = [s.name for s in sources]
        splits = {}
        for s in SPLITS:
            buckets = {str(L): packer.writers[s, L].close() for L in seq_lengths}
            if mixture:
                for L in seq_lengths:
                    buckets[str(L)]["source_tokens"] = dict(zip(names, packer.bucket_source_tokens[s, L]))
            splits[s] = {"documents": sum(packer.docs[s]), "document_tokens": sum(packer.tokens[s]),
                         "samples": sum(b["samples"] for b in buckets.values()),
                         "tokens": sum(b["tokens"] for b in buckets.values()),
                         "packing": asdict(packer.pack_stats[s]), "buckets": buckets}
            if mixture:
                splits[s]["sources"] = mixture_info["splits"][s]
        build_args = {k: v for k, v in asdict(args).items() if k not in ("output", "progress")}
        build_args["seq_lengths"] = seq_lengths
        build_args["bucket_shares"] = shares
        build_args["inputs"] = [i for s in sources for i in s.inputs] or ["<default corpus>"]
        build_args["vocab_size"] = vocab_size  # a tokenizer given brings its own
        manifest = {
            "format": FORMAT,
            "corpus": ("; ".join(build_args["inputs"]) if any(s.inputs for s in sources)
                       else corpus.describe_default_corpus()),
            "tokenizer": tok_info,
            "vocab_size": vocab_size,
            "token_dtype": dtype,
            "seq_lengths": seq_lengths,
            "shard_size_samples": args.shard_size,
            "build_args": build_args,
            "input": asdict(read_stats),
            "splits": splits,
        }
        if mixture:
            manifest["mixture"] = {"sources": mixture_info["sources"], "warnings": mixture_info["warnings"]}
        write_manifest(stage, manifest)
    elapsed = time.perf_counter() - t_start
    return {**manifest, "timing": {"total_s": elapsed, "tokenizer_s": t_tok, "tokenize_pack_write_s": t_pack}}


def _sample_mixture(sources: list[Source], spills: dict, packer: _Packer, read: list[ReadResult],
                    args: BuildArgs) -> dict:
    """Sample every split's spilled documents to the weights and feed them, interleaved, to
    the packer; returns the per-source counts for the manifest."""
    names, weights = [s.name for s in sources], [s.weight for s in sources]
    info: dict = {"sources": [{"name": s.name, "inputs": s.inputs, "weight": s.weight,
                               "target_share": s.weight / sum(weights), "input": asdict(r.stats)}
                              for s, r in zip(sources, read)],
                  "warnings": [], "splits": {}}
    for split in SPLITS:
        for i in range(len(sources)):
            spills[i, split].close()
        lengths = [spills[i, split].lengths for i in range(len(sources))]
        input_tokens = [int(x.sum()) for x in lengths]
        targets, warning = _mixture_targets(split, input_tokens, weights, names)
        if warning:
            info["warnings"].append(warning)
        copies = [mixture_copies(lengths[i], spills[i, split].ranks, targets[i])
                  if targets[i] > 0 else np.zeros(len(lengths[i]), dtype=np.int64) for i in range(len(sources))]
        streams = [_source_streams(spills[i, split], copies[i]) for i in range(len(sources))]
        for i, toks in _interleave(streams, targets):
            packer.add(split, toks, i)
        info["splits"][split] = {
            n: {"input_documents": len(lengths[i]), "input_tokens": input_tokens[i],
                "documents": int(copies[i].sum()), "document_tokens": int((copies[i] * lengths[i]).sum()),
                "target_tokens": targets[i], "max_copies": int(copies[i].max(initial=0))}
            for i, n in enumerate(names)}
    return info


def format_summary(summary: dict, output: str) -> str:
    """The human-readable end-of-build report."""
    inp, t = summary["input"], summary["timing"]
    mb = inp["text_bytes"] / 1e6
    tok = summary["tokenizer"]
    kind = {"sentencepiece": "SentencePiece", "huggingface": "Hugging Face tokenizer.json"}[tok.get("kind", "sentencepiece")]
    special = ", ".join(f"{k} {v}" for k, v in tok.get("special_ids", {}).items() if v is not None)
    lines = [
        f"built {output}/{MANIFEST}",
        f"corpus: {summary['corpus']}",
        f"  {inp['files']} files, {inp['documents']} documents, {mb:.1f} MB of text",
        f"tokenizer: {'trained' if tok['trained'] else 'given'} {kind}, vocab {summary['vocab_size']}, "
        f"sha256 {tok['sha256'][:12]}, special ids: {special}",
        f"time: {t['total_s']:.1f} s total ({t['tokenizer_s']:.1f} s tokenizer, {t['tokenize_pack_write_s']:.1f} s "
        f"tokenize+pack+write): {mb / max(t['total_s'], 1e-9):.1f} MB/s overall, "
        f"{mb / max(t['tokenize_pack_write_s'], 1e-9):.1f} MB/s tokenize+pack+write",
        "bad input: " + ", ".join(f"{k}={inp.get(k, 0)}" for k in (
            "empty_documents_skipped", "non_utf8_bytes_replaced", "non_utf8_documents", "jsonl_bad_lines",
            "jsonl_missing_text", "null_text_rows", "unk_tokens")),
    ]
    mix = summary.get("mixture")
    for s in SPLITS:
        sp = summary["splits"][s]
        p = sp["packing"]
        lines.append(f"{s}: {sp['documents']} documents, {sp['document_tokens']} tokens -> {sp['samples']} samples, "
                     f"{sp['tokens']} tokens; long documents split={p['long_documents_split']} "
                     f"(pieces={p['long_document_pieces']}), cut to a smaller bucket={p['bucket_cut_documents']}, "
                     f"packing splits={p['packing_splits']}, "
                     f"dropped tail tokens={p['dropped_tail_tokens']}")
        for L, b in sp["buckets"].items():
            lines.append(f"  seq {int(L):>6}: {b['samples']:>8} samples {b['tokens']:>11} tokens "
                         f"{b['documents']:>8} doc pieces {len(b['shards']):>5} shards")
        if mix:
            total = max(1, sp["document_tokens"])
            lines.append(f"  {'source':<12} {'weight':>7} {'target':>7} {'input tokens':>13} {'tokens':>12} "
                         f"{'share':>7} {'max copies':>10}   tokens per bucket")
            for src in mix["sources"]:
                c = sp["sources"][src["name"]]
                per_bucket = " ".join(f"{L}:{b['source_tokens'][src['name']]}" for L, b in sp["buckets"].items())
                lines.append(f"  {src['name']:<12} {src['weight']:>7g} {src['target_share']:>7.2%} "
                             f"{c['input_tokens']:>13} {c['document_tokens']:>12} "
                             f"{c['document_tokens'] / total:>7.2%} {c['max_copies']:>10}   {per_bucket}")
    if mix:
        lines.extend(f"warning: {w}" for w in mix["warnings"])
    if summary["splits"]["val"]["documents"] == 0 and summary["build_args"]["val_fraction"] > 0:
        lines.append("warning: the val split is empty; raise --val-fraction or add input")
    return "\n".join(lines)
