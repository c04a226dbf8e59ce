"""A tiny corpus with every kind of bad input, built once per session into shards.

Corpus: 60 generated .txt documents of varied length (slices of stdlib text, each line
tagged with its document number so tests can tell which documents a sample holds), plus
one .py file, a file with 3 invalid UTF-8 bytes, an empty and a whitespace-only file, a
.jsonl with good and bad lines and a .jsonl.gz. Buckets 64/128/256, vocab 400.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir

SEQ_LENGTHS = [64, 128, 256]
VOCAB = 400
N_DOCS = 60
# Expected bad-input counts of the corpus below.
EXPECTED_INPUT = {"non_utf8_bytes_replaced": 3, "non_utf8_documents": 1,
                  "empty_documents_skipped": 3,  # empty.txt, blank.md, one jsonl line with text ""
                  "jsonl_bad_lines": 2,  # not JSON; a JSON array
                  "jsonl_missing_text": 2}  # no "text" key; a number under "text"


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    source = (stdlib_dir() / "argparse.py").read_text() + (stdlib_dir() / "textwrap.py").read_text()
    lines = [line for line in source.splitlines() if line.strip()]
    for n in range(N_DOCS):
        # lengths from a few lines (one short sample) to many (longer than the 256 bucket)
        count = 2 + (n * 37) % 60 if n % 10 else 120
        start = (n * 53) % (len(lines) - count)
        body = "\n".join(f"D{n:03d}| {line}" for line in lines[start:start + count])
        (root / f"doc_{n:03d}.txt").write_text(body + "\n")
    shutil.copy(stdlib_dir() / "colorsys.py", root / "colorsys.py")
    (root / "bad_utf8.txt").write_bytes(b"BADUTF| caf\xc3\xa9 is fine, \xff\xfe are not, nor is \x80.\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("  \n\t\n")
    jsonl = [json.dumps({"text": f"J{i}| jsonl document {i}: " + " ".join(lines[i * 3:i * 3 + 6])}) for i in range(5)]
    jsonl += ["{not json", json.dumps(["an", "array"]), json.dumps({"body": "no text key"}),
              json.dumps({"text": 42}), json.dumps({"text": ""}), ""]
    (root / "data.jsonl").write_text("\n".join(jsonl) + "\n")
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"G{i}| gzipped document {i}: " + " ".join(lines[100 + i * 4:104 + i * 4])}) + "\n")
    return root


def build_args(corpus: Path, out: Path, **kw) -> BuildArgs:
    base = dict(inputs=[str(corpus)], output=str(out), vocab_size=VOCAB, seq_lengths=list(SEQ_LENGTHS),
                val_fraction=0.2, workers=2, shard_size=8, seed=7, progress=False)
    base.update(kw)
    return BuildArgs(**base)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def built(tmp_path_factory, corpus_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("build") / "shards"
    summary = build_shards(build_args(corpus_dir, out))
    return out, summary


@pytest.fixture
def shards_copy(built, tmp_path) -> Path:
    """A private copy of the build, for tests that damage it."""
    dst = tmp_path / "shards"
    shutil.copytree(built[0], dst)
    return dst
