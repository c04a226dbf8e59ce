"""Merging per-part shard builds (fusiontree/data/merge.py, data_pipeline/merge_shards.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusiontree.config import DataConfig, CurriculumStage
from fusiontree.data import build_train_loader
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir
from fusiontree.data.merge import merge_builds
from fusiontree.data.shards import SPLITS, bucket_shards, read_manifest, read_shard_range

ROOT = Path(__file__).resolve().parents[2]
SEQ = [64, 128]


def _build(inputs: list[str], out: Path, tokenizer: str = "", **kw) -> Path:
    build_shards(BuildArgs(inputs=inputs, output=str(out), tokenizer=tokenizer, vocab_size=400, seq_lengths=SEQ,
                           val_fraction=0.2, workers=1, seed=5, shard_size=40, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("merge_parts")
    p0 = _build([str(stdlib_dir() / "json")], root / "part-0")
    p1 = _build([str(stdlib_dir() / "email" / "mime")], root / "part-1", tokenizer=str(p0 / "tokenizer.model"))
    return [p0, p1]


def _samples(root: Path, split: str, L: int) -> list[tuple[bytes, bytes]]:
    m = read_manifest(root)
    out = []
    for shard in bucket_shards(root, m, split, L):
        got, err = read_shard_range(shard, 0, shard.samples, L, m["token_dtype"], int(m["vocab_size"]))
        assert err is None, err
        out.extend((t.tobytes(), s.tobytes()) for _, t, s in got)
    return out


def test_merge_keeps_every_sample_in_part_order(parts, tmp_path):
    out = tmp_path / "merged"
    manifest = merge_builds(parts, out, shard_size=25)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (out / "tokenizer.model").read_bytes() == (parts[0] / "tokenizer.model").read_bytes()
    srcs = [read_manifest(p) for p in parts]
    for split in SPLITS:
        for L in SEQ:
            want = _samples(parts[0], split, L) + _samples(parts[1], split, L)
            assert _samples(out, split, L) == want  # re-keyed and re-sharded, same samples, same order
            entry = manifest["splits"][split]["buckets"][str(L)]
            assert entry["samples"] == len(want) and all(s["samples"] <= 25 for s in entry["shards"])
        assert manifest["splits"][split]["documents"] == sum(m["splits"][split]["documents"] for m in srcs)
    assert manifest["input"]["files"] == sum(m["input"]["files"] for m in srcs)
    assert manifest["merged_from"] == [str(p) for p in parts]

    # the training loader reads the merged build, with its shard hashes checked
    cfg = DataConfig(shards_dir=str(out), global_batch_tokens=256, micro_batch_tokens=128, num_workers=0,
                     curriculum=[CurriculumStage(seq_len=64, until_tokens=0)])
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=1)
    batch = loader.next_batch()
    assert tuple(batch["input_ids"].shape) == (2, 64)
    loader.close()


def test_cli_and_refusals(parts, tmp_path):
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, str(ROOT / "data_pipeline/merge_shards.py"), "--input", *map(str, parts),
                          "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "merged 2 builds" in res.stdout and (out / "manifest.json").is_file()

    # a part with its own tokenizer cannot be merged: its ids mean other pieces
    other = _build([str(stdlib_dir() / "email" / "mime")], tmp_path / "own-tokenizer")
    with pytest.raises(ValueError, match="tokenizer sha256"):
        merge_builds([parts[0], other], tmp_path / "bad")
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge_builds(parts, parts[0])

    # a damaged shard stops the merge and is named
    broken = tmp_path / "broken"
    _build([str(stdlib_dir() / "email" / "mime")], broken, tokenizer=str(parts[0] / "tokenizer.model"))
    shard = bucket_shards(broken, read_manifest(broken), "train", 64)[0].path
    data = bytearray(shard.read_bytes())
    data[1536:1546] = b"\xff" * 10  # the first sample's tokens: ids beyond the vocabulary
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(shard)):
        merge_builds([parts[0], broken], tmp_path / "bad2")
    assert not (tmp_path / "bad2" / "manifest.json").exists()  # never mistaken for a complete build
