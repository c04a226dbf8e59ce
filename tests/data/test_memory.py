"""Shard builder memory: nothing the build holds grows with the input.

Measured with tracemalloc (every Python object and numpy buffer the build allocates, counted
in bytes, the same on a loaded machine as on an idle one), not with RSS or time. The build
runs in this process (one worker) on a .jsonl.gz whose read and task blocks are shrunk so
that a small input already behaves like a large one: many tasks, packing chunks and shards.
"""

from __future__ import annotations

import gc
import gzip
import json
import tracemalloc
from pathlib import Path

from fusiontree.data import corpus
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir


def write_copies(path: Path, copies: int) -> None:
    """`copies` tagged copies of a few hundred short documents (12 lines of argparse.py each)."""
    lines = [line for line in (stdlib_dir() / "argparse.py").read_text().splitlines() if line.strip()]
    with gzip.open(path, "wt") as f:
        for c in range(copies):
            for i in range(0, len(lines) - 12, 6):
                f.write(json.dumps({"text": f"copy {c} doc {i}\n" + "\n".join(lines[i:i + 12])}) + "\n")


def peak_bytes(built, tmp_path: Path, copies: int) -> tuple[int, dict]:
    src = tmp_path / f"in{copies}.jsonl.gz"
    write_copies(src, copies)
    args = BuildArgs(inputs=[str(src)], output=str(tmp_path / f"out{copies}"), tokenizer=str(built[0] / "tokenizer.model"),
                     seq_lengths=[64, 128, 256], val_fraction=0.2, workers=1, chunk_tokens=4096, shard_size=1024,
                     progress=False)
    gc.collect()  # garbage of earlier tests is not this build's
    tracemalloc.start()
    try:
        summary = build_shards(args)
        return tracemalloc.get_traced_memory()[1], summary
    finally:
        tracemalloc.stop()


def test_peak_memory_of_a_build_does_not_grow_with_the_input(built, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_READ_BYTES", 4 << 10)
    monkeypatch.setattr(corpus, "STREAM_BLOCK_BYTES", 16 << 10)
    peak_bytes(built, tmp_path, 1)  # first use imports modules and fills caches
    small, s = peak_bytes(built, tmp_path, 2)
    large, s6 = peak_bytes(built, tmp_path, 12)
    added = s6["input"]["text_bytes"] - s["input"]["text_bytes"]
    assert s6["splits"]["train"]["samples"] > 5 * s["splits"]["train"]["samples"]  # it did build 6x as much
    # The manifest's shard list is the one record that grows (about 0.5 KB per shard, a few
    # KB here); the peak also varies by about 12 KB from run to run. Holding the documents,
    # the samples or a Python int per document of the added input costs more than 2% of its
    # text (40 KB).
    assert large - small < 0.02 * added, (f"peak traced memory {small} B -> {large} B for {added} more bytes of "
                                          "text: something the build keeps grows with its input")
