"""Build length-bucketed webdataset shards: text -> tokenizer -> tokens -> packed samples -> shards.

    summary = build_shards(BuildArgs(inputs=["corpus/"], output="data/shards", vocab_size=8192))

Steps (`data_pipeline/build_shards.py` is the command line for this):

1. Inputs become read units (fusiontree/data/corpus.py); each document is assigned to the
   train or val split by a seeded hash of its group (its file's path relative to the inputs;
   each jsonl line is a group of its own), so no document lands in both splits.
2. Unless a tokenizer is given, SentencePiece BPE is trained on a seeded sample of the
   train split's lines (`tokenizer_sample_mb`), with `workers` threads.
3. A pool of `workers` processes reads and tokenizes the units in input order; each document
   gets eos at its end.
4. Documents are packed per split in chunks of about `chunk_tokens` tokens
   (fusiontree/data/packing.py) and written as shards per bucket (fusiontree/data/shards.py).
   Memory holds one chunk per split plus the units in flight; a .jsonl.gz file is one unit,
   so split very large ones (plain .jsonl is read in 8 MB ranges).
5. manifest.json is written last: a directory with a manifest holds a complete build.

The same inputs and arguments give byte-identical shards, tokenizer and manifest.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fusiontree.data import corpus
from fusiontree.data.corpus import ReadStats, Unit
from fusiontree.data.packing import PackStats, pack_documents
from fusiontree.data.shards import FORMAT, MANIFEST, SPLITS, ShardWriter, token_dtype_for, write_manifest
from fusiontree.data.tokenizer import (EOS_ID, SPECIAL_IDS, load_sentencepiece, sentencepiece_from_bytes,
                                       sha256_bytes, train_tokenizer)

DEFAULT_SEQ_LENGTHS = [512, 1024, 2048, 4096]
TOKENIZER_FILE = "tokenizer.model"
# What a previous build leaves in its output directory (and a rebuild may replace).
_BUILD_ENTRIES = {"train", "val", TOKENIZER_FILE, MANIFEST}


@dataclass
class BuildArgs:
    inputs: list[str] = field(default_factory=list)  # empty: the default corpus
    output: str = "data/shards"
    tokenizer: str = ""  # "": train a new one; else a .model file to reuse
    vocab_size: int = 8192
    seq_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_SEQ_LENGTHS))
    # Wanted share of the tokens per bucket, in the order of seq_lengths (empty: equal shares).
    bucket_shares: list[float] = field(default_factory=list)
    val_fraction: float = 0.02
    workers: int = field(default_factory=corpus.cpu_count)
    shard_size: int = 1024  # samples per shard
    seed: int = 1234
    text_field: str = "text"  # jsonl: the key holding the text
    # Train-split text the tokenizer is trained on. On the default corpus 8 MB compresses 0.7%
    # worse than 16 MB and trains in half the time (1.3 s vs 2.4 s on 2 cores).
    tokenizer_sample_mb: float = 8.0
    chunk_tokens: int = 32 << 20  # documents packed together (memory bound of packing)
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


# ------------------------------------------------------------------------------ workers

_WORKER: dict = {}


def _init_worker(model: bytes | None, seed: int, val_fraction: float, text_field: str, dtype: str) -> None:
    _WORKER.update(sp=sentencepiece_from_bytes(model) if model is not None else None, seed=seed,
                   val_fraction=val_fraction, text_field=text_field, dtype=np.dtype(dtype))


def _sample_lines(unit: Unit) -> tuple[list[str], ReadStats]:
    """Lines of the unit's train-split documents (the tokenizer's training text)."""
    res = corpus.read_unit(unit, _WORKER["text_field"])
    lines: list[str] = []
    for doc in res.docs:
        if corpus.split_of(doc.group, _WORKER["seed"], _WORKER["val_fraction"]) == "train":
            lines.extend(line for line in doc.text.split("\n") if line.strip())
    return lines, res.stats


def _encode_unit(unit: Unit) -> tuple[list[tuple[str, np.ndarray]], ReadStats, int]:
    """Read and tokenize a unit: [(split, tokens ending with eos)], read counts, its size."""
    res = corpus.read_unit(unit, _WORKER["text_field"])
    if not res.docs:
        return [], res.stats, unit.size
    ids = _WORKER["sp"].encode([d.text for d in res.docs], num_threads=1)
    out = []
    for doc, toks in zip(res.docs, ids):
        arr = np.empty(len(toks) + 1, dtype=_WORKER["dtype"])
        arr[:-1] = toks
        arr[-1] = EOS_ID
        out.append((corpus.split_of(doc.group, _WORKER["seed"], _WORKER["val_fraction"]), arr))
    return out, res.stats, unit.size


def _pool(workers: int, initargs: tuple):
    """A process pool, or None for one worker (then everything runs in this process)."""
    if workers == 1:
        _init_worker(*initargs)
        return None
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=initargs)


def _imap(pool, fn, items):
    return map(fn, items) if pool is None else pool.imap(fn, items, chunksize=1)


# ------------------------------------------------------------------------------ steps

def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _BUILD_ENTRIES)
        if foreign:
            raise ValueError(f"--output {out} already holds files that are not a shard build ({foreign[:5]}); "
                             "choose an empty or new directory")
        for name in _BUILD_ENTRIES:  # a previous build of ours: replace it
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _tokenizer_sample(units: list[Unit], args: BuildArgs, tqdm) -> tuple[list[str], int]:
    """Lines (characters counted) of train-split documents, taking units in a seeded order
    until the budget."""
    order = sorted(units, key=lambda u: hashlib.sha256(f"{args.seed}\0{u.kind}\0{u.name}\0{u.start}".encode()).digest())
    budget = int(args.tokenizer_sample_mb * 1e6)
    lines: list[str] = []
    size = 0
    pool = _pool(args.workers, (None, args.seed, args.val_fraction, args.text_field, "uint32"))
    try:
        with tqdm(total=min(budget, corpus.total_bytes(units)), unit="B", unit_scale=True, desc="tokenizer sample",
                  disable=not args.progress, file=sys.stderr) as bar:
            for got, _ in _imap(pool, _sample_lines, order):
                before = size
                for line in got:  # a single big unit must not blow the budget
                    lines.append(line)
                    size += len(line) + 1
                    if size >= budget:
                        break
                bar.update(min(size - before, bar.total - bar.n))
                if size >= budget:
                    break
    finally:
        if pool is not None:
            pool.terminate()
    return lines, size


def build_shards(args: BuildArgs) -> dict:
    """Run the whole build; returns the manifest plus timings (`summary["timing"]`).

    Why one function: the phases (tokenizer, packing per split, manifest) run once each, in
    order, and share the output directory and one timing record; it reads top to bottom."""
    from tqdm import tqdm

    args.validate()
    shares = args.bucket_shares or [1.0] * len(args.seq_lengths)
    seq_lengths = sorted(args.seq_lengths)
    shares = [shares[args.seq_lengths.index(L)] for L in seq_lengths]
    t_start = time.perf_counter()
    units = corpus.input_units(args.inputs) if args.inputs else corpus.default_units()
    if not units:
        raise ValueError("no input: every --input was empty")
    out = Path(args.output)
    t0 = time.perf_counter()
    tok_info: dict = {"path": TOKENIZER_FILE}
    if args.tokenizer:  # read before the output is cleared: it may be the previous build's tokenizer
        sp = load_sentencepiece(args.tokenizer)  # checks existence, special ids, byte fallback
        model = Path(args.tokenizer).read_bytes()
        tok_info.update(trained=False, source=str(args.tokenizer))
    _prepare_output(out)

    # tokenizer
    if not args.tokenizer:
        lines, sample_bytes = _tokenizer_sample(units, args, tqdm)
        if not lines:
            raise ValueError("the train split has no text to train a tokenizer on; give more input "
                             "or lower --val-fraction")
        if args.progress:
            print(f"training SentencePiece BPE ({args.vocab_size} pieces) on {sample_bytes / 1e6:.1f} MB "
                  f"({len(lines)} lines), {args.workers} threads", file=sys.stderr)
        model = train_tokenizer(lines, args.vocab_size, args.workers, args.seed)
        del lines
        sp = sentencepiece_from_bytes(model)
        tok_info.update(trained=True, sample_bytes=sample_bytes)
    vocab_size = sp.vocab_size()
    (out / TOKENIZER_FILE).write_bytes(model)
    tok_info.update(sha256=sha256_bytes(model), vocab_size=vocab_size, special_ids=SPECIAL_IDS)
    t_tok = time.perf_counter() - t0

    # tokenize, pack, write
    t0 = time.perf_counter()
    dtype = token_dtype_for(vocab_size)
    writers = {(s, L): ShardWriter(out, s, L, args.shard_size, dtype) for s in SPLITS for L in seq_lengths}
    read_stats = ReadStats()
    pack_stats = {s: PackStats() for s in SPLITS}
    pending: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    pending_tokens = {s: 0 for s in SPLITS}
    split_docs = {s: 0 for s in SPLITS}
    split_tokens = {s: 0 for s in SPLITS}  # document tokens (eos included) before packing
    chunks = {s: 0 for s in SPLITS}

    def flush(split: str) -> None:
        if not pending[split]:
            return
        rng = np.random.default_rng([args.seed, SPLITS.index(split), chunks[split]])
        packed, stats = pack_documents(pending[split], seq_lengths, rng, shares)
        pack_stats[split].add(stats)
        for L, bucket in packed.items():
            for tokens_T, starts_D in zip(bucket.tokens, bucket.doc_starts):
                writers[split, L].write(tokens_T, starts_D)
        pending[split], pending_tokens[split] = [], 0
        chunks[split] += 1

    pool = _pool(args.workers, (model, args.seed, args.val_fraction, args.text_field, dtype))
    try:
        with tqdm(total=corpus.total_bytes(units), unit="B", unit_scale=True, desc="tokenize+pack",
                  disable=not args.progress, file=sys.stderr) as bar:
            for docs, stats, size in _imap(pool, _encode_unit, units):
                read_stats.add(stats)
                for split, toks in docs:
                    pending[split].append(toks)
                    pending_tokens[split] += len(toks)
                    split_docs[split] += 1
                    split_tokens[split] += len(toks)
                for split in SPLITS:
                    if pending_tokens[split] >= args.chunk_tokens:
                        flush(split)
                bar.update(size)
    finally:
        if pool is not None:
            pool.terminate()  # every task has returned unless an error got us here
            pool.join()
    for split in SPLITS:
        flush(split)
    if read_stats.documents == 0:
        raise ValueError(f"no documents: all {read_stats.empty_documents_skipped} input documents were empty "
                         "(or every jsonl line was bad); check --input and --text-field")
    t_pack = time.perf_counter() - t0

    splits = {}
    for s in SPLITS:
        buckets = {str(L): writers[s, L].close() for L in seq_lengths}
        splits[s] = {"documents": split_docs[s], "document_tokens": split_tokens[s],
                     "samples": sum(b["samples"] for b in buckets.values()),
                     "tokens": sum(b["tokens"] for b in buckets.values()),
                     "packing": asdict(pack_stats[s]), "buckets": buckets}
    build_args = {k: v for k, v in asdict(args).items() if k not in ("output", "progress")}
    build_args["seq_lengths"] = seq_lengths
    build_args["bucket_shares"] = shares
    build_args["inputs"] = list(args.inputs) or ["<default corpus>"]
    build_args["vocab_size"] = vocab_size  # a reused tokenizer brings its own
    manifest = {
        "format": FORMAT,
        "corpus": "; ".join(args.inputs) if args.inputs else corpus.describe_default_corpus(),
        "tokenizer": tok_info,
        "vocab_size": vocab_size,
        "token_dtype": dtype,
        "seq_lengths": seq_lengths,
        "shard_size_samples": args.shard_size,
        "build_args": build_args,
        "input": asdict(read_stats),
        "splits": splits,
    }
    write_manifest(out, manifest)
    elapsed = time.perf_counter() - t_start
    return {**manifest, "timing": {"total_s": elapsed, "tokenizer_s": t_tok, "tokenize_pack_write_s": t_pack}}


def format_summary(summary: dict, output: str) -> str:
    """The human-readable end-of-build report."""
    inp, t = summary["input"], summary["timing"]
    mb = inp["text_bytes"] / 1e6
    tok = summary["tokenizer"]
    lines = [
        f"built {output}/{MANIFEST}",
        f"corpus: {summary['corpus']}",
        f"  {inp['files']} files, {inp['documents']} documents, {mb:.1f} MB of text",
        f"tokenizer: {'trained' if tok['trained'] else 'reused'} BPE, vocab {summary['vocab_size']}, "
        f"sha256 {tok['sha256'][:12]}",
        f"time: {t['total_s']:.1f} s total ({t['tokenizer_s']:.1f} s tokenizer, {t['tokenize_pack_write_s']:.1f} s "
        f"tokenize+pack+write): {mb / max(t['total_s'], 1e-9):.1f} MB/s overall, "
        f"{mb / max(t['tokenize_pack_write_s'], 1e-9):.1f} MB/s tokenize+pack+write",
        "bad input: " + ", ".join(f"{k}={inp[k]}" for k in ("empty_documents_skipped", "non_utf8_bytes_replaced",
                                                           "non_utf8_documents", "jsonl_bad_lines",
                                                           "jsonl_missing_text")),
    ]
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
    if summary["splits"]["val"]["documents"] == 0 and summary["build_args"]["val_fraction"] > 0:
        lines.append("warning: the val split is empty; raise --val-fraction or add input")
    return "\n".join(lines)
