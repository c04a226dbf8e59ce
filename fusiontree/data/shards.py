"""Webdataset shards of packed samples and their manifest: writing, verifying, reading.

Shapes: T = tokens per sample (the bucket's sequence length), D = document pieces in a sample.

Layout of a build (all paths in the manifest are relative to its directory):

    manifest.json
    tokenizer.model | tokenizer.json      the tokenizer (SentencePiece or Hugging Face)
    train/seq00512/shard-000000.tar ...   one folder per split and bucket
    val/seq00512/shard-000000.tar ...

A shard is a plain tar (webdataset convention: members `<key>.<field>` grouped by key). A
sample's key is its index within its split and bucket, zero-padded (`0000001234`), and it
has two members:

    <key>.tokens      T token ids, little-endian `token_dtype` (uint16, or uint32 for vocabularies over 65536)
    <key>.doc_starts  D int32 little-endian: the offset of each document piece in the sample (first 0)

Tar headers (POSIX ustar) carry no time, owner or host, so the same samples give
byte-identical shards.
`manifest.json` records per split and bucket: samples, tokens, documents, and per shard its
path, sample count, byte size and sha256; plus the tokenizer (kind, path, sha256, vocab
size, special ids), the build arguments and the bad-input counts. A mixture build adds
`mixture` (sources, weights, their input counts), per split `sources` (input and sampled
documents and tokens of each source) and per bucket `source_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "fusiontree-shards-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class CorruptShardError(ValueError):
    """A shard that cannot be read as the manifest describes it (message names the shard)."""


def bucket_dir(split: str, seq_len: int) -> str:
    return f"{split}/seq{seq_len:05d}"


def sample_key(index: int) -> str:
    return f"{index:010d}"


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's default blocking factor: archives end on a 10240-byte boundary


def _ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file: mode 0444, owner 0/0 with empty names, mtime 0."""
    raw = name.encode("ascii")
    assert len(raw) <= 100
    header = bytearray(_BLOCK)
    header[0:len(raw)] = raw
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"  # device numbers stay empty for regular files, as in Python's tarfile
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _tar_member(name: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """A member's header, data and the zero padding that ends it on a block boundary."""
    return _ustar_header(name, len(data)), data, b"\0" * (-len(data) % _BLOCK)


def _tar_end(size: int) -> bytes:
    """What ends an archive of `size` bytes of members: two zero blocks, then zeros to a
    whole record."""
    return b"\0" * (2 * _BLOCK + (-(size + 2 * _BLOCK) % _RECORD))


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar archive of (name, data) members, in the given order."""
    body = b"".join(part for name, data in members for part in _tar_member(name, data))
    return body + _tar_end(len(body))


class ShardWriter:
    """Writes the samples of one split and bucket into shards of `shard_size` samples.

    Sample keys count up from 0 across the bucket's shards. A shard is written sample by
    sample into `<name>.partial` and hashed on the way, then renamed to its name when it
    is complete, so memory does not grow with the shard size and a crashed build leaves
    no half-written shard under a name a manifest lists.
    """

    def __init__(self, root: Path, split: str, seq_len: int, shard_size: int, token_dtype: str):
        self.root, self.split, self.seq_len, self.shard_size = root, split, seq_len, shard_size
        self.dtype = np.dtype(token_dtype).newbyteorder("<")
        self.shards: list[dict] = []
        self.samples = 0
        self.documents = 0
        self._file = None  # the open shard, its hash, bytes and samples so far
        self._hash = None
        self._bytes = 0
        self._in_shard = 0

    def _rel(self) -> str:
        return f"{bucket_dir(self.split, self.seq_len)}/shard-{len(self.shards):06d}.tar"

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def write(self, tokens_T: np.ndarray, doc_starts_D: np.ndarray) -> None:
        assert len(tokens_T) == self.seq_len and doc_starts_D[0] == 0
        if self._file is None:
            path = self.root / (self._rel() + ".partial")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file, self._hash, self._bytes, self._in_shard = open(path, "wb"), hashlib.sha256(), 0, 0
        key = sample_key(self.samples)
        for name, data in ((key + ".doc_starts", np.asarray(doc_starts_D, dtype="<i4").tobytes()),
                           (key + ".tokens", tokens_T.astype(self.dtype, copy=False).tobytes())):
            for part in _tar_member(name, data):
                self._put(part)
        self.samples += 1
        self._in_shard += 1
        self.documents += len(doc_starts_D)
        if self._in_shard == self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._put(_tar_end(self._bytes))
        self._file.close()
        rel = self._rel()
        os.replace(self.root / (rel + ".partial"), self.root / rel)
        self.shards.append({"path": rel, "samples": self._in_shard, "bytes": self._bytes,
                            "sha256": self._hash.hexdigest()})
        self._file = self._hash = None

    def close(self) -> dict:
        self._finish_shard()
        return {"seq_len": self.seq_len, "samples": self.samples, "tokens": self.samples * self.seq_len,
                "documents": self.documents, "shards": self.shards}


def write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {str(root)!r}; build shards there first "
                         f"(python data_pipeline/build_shards.py --output {root}) or fix data.shards_dir")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the shards") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r}); "
                         "rebuild the shards with data_pipeline/build_shards.py")
    return manifest


def manifest_fingerprint(root: str | Path) -> str:
    return hashlib.sha256((Path(root) / MANIFEST).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # absolute
    samples: int
    bytes: int
    sha256: str
    first_sample: int  # index of its first sample within the split and bucket


def bucket_shards(root: str | Path, manifest: dict, split: str, seq_len: int) -> list[ShardInfo]:
    """The shards of one split and bucket, in manifest order."""
    buckets = manifest["splits"][split]["buckets"]
    entry = buckets.get(str(seq_len))
    if entry is None:
        raise ValueError(f"the shards in {root} have no {split} bucket of length {seq_len}; built buckets: "
                         f"{sorted(int(k) for k in buckets)}. Use one of those or rebuild with --seq-lengths")
    out, first = [], 0
    for s in entry["shards"]:
        out.append(ShardInfo(Path(root) / s["path"], int(s["samples"]), int(s["bytes"]), s["sha256"], first))
        first += int(s["samples"])
    return out


def verify_shards(shards: list[ShardInfo], mode: str, hash_these: set[Path] | None = None) -> None:
    """`size`: every shard exists with the manifest's byte size (a stat per shard).
    `sha256`: also hash the shards in `hash_these` (all when None) against the manifest."""
    if mode == "none":
        return
    for s in shards:
        if not s.path.is_file():
            raise CorruptShardError(f"shard {s.path} listed in the manifest does not exist; rebuild the shards "
                                    "or restore the file")
        size = s.path.stat().st_size
        if size != s.bytes:
            raise CorruptShardError(f"shard {s.path} has {size} bytes but the manifest says {s.bytes} (truncated "
                                    "or overwritten); rebuild the shards or restore the file")
    if mode != "sha256":
        return
    for s in shards:
        if hash_these is not None and s.path not in hash_these:
            continue
        h = hashlib.sha256()
        with open(s.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != s.sha256:
            raise CorruptShardError(f"shard {s.path}: sha256 {h.hexdigest()} does not match the manifest's "
                                    f"{s.sha256}; the file changed since the build. Rebuild the shards or restore it")


def read_shard_range(shard: ShardInfo, start: int, stop: int, seq_len: int, token_dtype: str, vocab_size: int
                     ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], str | None]:
    """Samples [start, stop) of a shard, streamed with webdataset's tar reader.

    Returns (samples, error): samples are (sample index, tokens_T, doc_starts_D) for every
    sample that could be read and checked, in shard order; error is None, or why the rest
    of the range could not be read (the caller raises it, or skips and counts).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    dtype = np.dtype(token_dtype).newbyteorder("<")
    want_bytes = seq_len * dtype.itemsize
    out: list[tuple[int, np.ndarray, np.ndarray]] = []
    expected = start
    try:
        with open(shard.path, "rb") as f:
            files = ({**m, "__url__": str(shard.path)} for m in tar_file_iterator(f))
            for i, sample in enumerate(group_by_keys(files)):
                if i < start:
                    continue
                if i >= stop:
                    break
                key = sample.get("__key__")
                index = shard.first_sample + i
                if key != sample_key(index):
                    return out, f"sample {i} has key {key!r}, expected {sample_key(index)!r}"
                raw_tokens, raw_starts = sample.get("tokens"), sample.get("doc_starts")
                if raw_tokens is None or raw_starts is None:
                    return out, f"sample {key} lacks its tokens or doc_starts member"
                if len(raw_tokens) != want_bytes or len(raw_starts) == 0 or len(raw_starts) % 4:
                    return out, (f"sample {key} has {len(raw_tokens)} token bytes and {len(raw_starts)} doc_starts "
                                 f"bytes; expected {want_bytes} and a non-empty multiple of 4")
                tokens_T = np.frombuffer(raw_tokens, dtype=dtype)
                starts_D = np.frombuffer(raw_starts, dtype="<i4")
                if starts_D[0] != 0 or starts_D[-1] >= seq_len or (len(starts_D) > 1 and np.any(np.diff(starts_D) <= 0)):
                    return out, f"sample {key} has invalid document starts"
                if int(tokens_T.max()) >= vocab_size:
                    return out, f"sample {key} holds token id {int(tokens_T.max())} >= vocab size {vocab_size}"
                out.append((index, tokens_T, starts_D))
                expected += 1
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:  # ValueError: webdataset's duplicate member
        # Any of these means the shard is unreadable from here on; the caller decides what that costs.
        return out, f"{type(e).__name__}: {e}"
    if expected < stop:
        return out, f"ends after {expected} samples, the manifest says it holds {shard.samples}"
    return out, None
