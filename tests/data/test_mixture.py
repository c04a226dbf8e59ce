"""Weighted mixtures: token shares within one document of the target, deterministic by seed,
per-source counts per bucket, the command line, merging mixture parts, and build_shards.sh's
stages (run with bash, without Slurm) on mixture parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusiontree.data.build import (BuildArgs, Source, build_shards, format_summary, load_mixture, mixture_copies,
                                   parse_source)
from fusiontree.data.merge import merge_builds
from fusiontree.data.shards import read_manifest

from .test_formats import jsonl_bytes, texts

ROOT = Path(__file__).resolve().parents[2]
SEQ = [64, 128]


def write_sources(root: Path) -> dict[str, Path]:
    """Three sources of very different sizes (so one is up-sampled, one down-sampled)."""
    root.mkdir(parents=True, exist_ok=True)
    docs = texts(400)
    out = {"big": root / "big.jsonl", "mid": root / "mid.jsonl", "small": root / "small.jsonl"}
    out["big"].write_bytes(jsonl_bytes(docs[:260]))
    out["mid"].write_bytes(jsonl_bytes(docs[260:360]))
    out["small"].write_bytes(jsonl_bytes(docs[360:400]))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("mix_in"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, sources) -> Path:
    out = tmp_path_factory.mktemp("mix_tok") / "b"
    build_shards(BuildArgs(inputs=[str(p) for p in sources.values()], output=str(out), vocab_size=400,
                           seq_lengths=SEQ, val_fraction=0.0, workers=1, seed=1, progress=False))
    return out / "tokenizer.model"


WEIGHTS = {"big": 0.2, "mid": 0.3, "small": 0.5}


def mix_args(sources, tokenizer, out: Path, seed: int = 11, **kw) -> BuildArgs:
    base = dict(sources=[Source(n, [str(sources[n])], w) for n, w in WEIGHTS.items()], output=str(out),
                tokenizer=str(tokenizer), seq_lengths=SEQ, val_fraction=0.15, workers=2, seed=seed, shard_size=16,
                progress=False)
    base.update(kw)
    return BuildArgs(**base)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, sources, tokenizer) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mix") / "shards"
    return out, build_shards(mix_args(sources, tokenizer, out))


def test_shares_follow_the_weights_within_one_document(mixed):
    out, summary = mixed
    m = read_manifest(out)
    assert [s["name"] for s in m["mixture"]["sources"]] == list(WEIGHTS)
    for split in ("train", "val"):
        srcs = m["splits"][split]["sources"]
        total_in = sum(c["input_tokens"] for c in srcs.values())
        out_total = sum(c["document_tokens"] for c in srcs.values())
        assert m["splits"][split]["document_tokens"] == out_total
        assert abs(out_total - total_in) <= 3 * 200  # the output keeps the inputs' volume
        for name, w in WEIGHTS.items():
            c = srcs[name]
            target = w / sum(WEIGHTS.values()) * total_in
            assert c["target_tokens"] == pytest.approx(target)
            # within half of the longest document (every document < 200 tokens here)
            assert abs(c["document_tokens"] - target) <= 200, (split, name, c)
        assert srcs["small"]["max_copies"] >= 2 and srcs["big"]["max_copies"] == 1  # up- and down-sampled
        assert srcs["big"]["documents"] < srcs["big"]["input_documents"]


def test_per_source_tokens_per_bucket_add_up(mixed):
    out, summary = mixed
    m = read_manifest(out)
    for split in ("train", "val"):
        sp = m["splits"][split]
        per_source_packed = {n: 0 for n in WEIGHTS}
        for L, b in sp["buckets"].items():
            assert sum(b["source_tokens"].values()) == b["tokens"]
            for n in WEIGHTS:
                per_source_packed[n] += b["source_tokens"][n]
        # packing loses only the counted tail
        lost = sum(sp["sources"][n]["document_tokens"] - per_source_packed[n] for n in WEIGHTS)
        assert lost == sp["packing"]["dropped_tail_tokens"]
        assert all(sp["sources"][n]["document_tokens"] >= per_source_packed[n] for n in WEIGHTS)
    text = format_summary(summary, str(out))
    assert "small" in text and "50.00%" in text and "tokens per bucket" in text


def test_same_seed_same_bytes_other_seed_other_sample(mixed, sources, tokenizer, tmp_path):
    out, _ = mixed
    again = tmp_path / "again"
    build_shards(mix_args(sources, tokenizer, again))

    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(again) == tree(out)
    other = tmp_path / "other"
    build_shards(mix_args(sources, tokenizer, other, seed=12))
    assert read_manifest(other)["splits"]["train"]["sources"] != read_manifest(out)["splits"]["train"]["sources"]


def test_mixture_copies_is_within_half_a_document():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 500, size=rng.integers(1, 80))
        ranks = rng.integers(0, 2**63, size=len(lengths)).astype(np.uint64)
        target = float(rng.uniform(0.05, 4.0) * lengths.sum())
        copies = mixture_copies(lengths, ranks, target)
        assert abs(float((copies * lengths).sum()) - target) <= lengths.max() / 2
        assert copies.max() - copies.min() <= 1


def test_source_specs_and_yaml(tmp_path, sources, tokenizer):
    s = parse_source("code=a/,b.jsonl.zst:0.7")
    assert (s.name, s.inputs, s.weight) == ("code", ["a/", "b.jsonl.zst"], 0.7)
    for bad in ("code", "code=a", "=a:1", "code=a:x"):
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_source(bad)
    (tmp_path / "mix.yaml").write_text("sources:\n  - {name: a, inputs: big.jsonl, weight: 1}\n"
                                       "  - {name: b, inputs: [x/, y.parquet], weight: 3}\n")
    got = load_mixture(tmp_path / "mix.yaml")
    assert [(m.name, m.inputs, m.weight) for m in got] == [
        ("a", [str(tmp_path / "big.jsonl")], 1.0), ("b", [str(tmp_path / "x/"), str(tmp_path / "y.parquet")], 3.0)]
    (tmp_path / "bad.yaml").write_text("sources:\n  - {name: a, inputs: big.jsonl, weigth: 1}\n")
    with pytest.raises(ValueError, match="exactly the keys name, inputs, weight"):
        load_mixture(tmp_path / "bad.yaml")
    for args, match in [(dict(sources=[Source("a", ["x"], 0)]), "weights must be positive"),
                        (dict(sources=[Source("a", ["x"], 1), Source("a", ["y"], 1)]), "repeat a name"),
                        (dict(sources=[Source("a b", ["x"], 1)]), "use letters"),
                        (dict(sources=[Source("a", ["x"], 1)], inputs=["y"]), "either --input or --source")]:
        with pytest.raises(ValueError, match=match):
            BuildArgs(**args).validate()
    # a source with no train documents cannot get its share
    (tmp_path / "one.jsonl").write_bytes(jsonl_bytes(texts(1)))
    with pytest.raises(ValueError, match=r"\['one'\] have no documents in the train split"):
        build_shards(BuildArgs(sources=[Source("big", [str(sources["big"])], 1), Source("one", [str(tmp_path / "one.jsonl")], 1)],
                               output=str(tmp_path / "o"), tokenizer=str(tokenizer), seq_lengths=SEQ,
                               val_fraction=0.99, workers=1, progress=False))


def test_command_line_sources(sources, tokenizer, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "data_pipeline/build_shards.py"), "--output", str(tmp_path / "o"),
                          "--tokenizer", str(tokenizer), "--seq-lengths", "64,128", "--workers", "1", "--no-progress",
                          "--source", f"big={sources['big']}:1", "--source", f"small={sources['small']},{sources['mid']}:1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = read_manifest(tmp_path / "o")
    assert [s["inputs"] for s in m["mixture"]["sources"]] == [[str(sources["big"])],
                                                              [str(sources["small"]), str(sources["mid"])]]
    assert "max copies" in res.stdout
    res = subprocess.run([sys.executable, str(ROOT / "data_pipeline/build_shards.py"), "--output", str(tmp_path / "p"),
                          "--source", "big"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "NAME=PATH[,PATH...]:WEIGHT" in res.stderr


def test_merged_mixture_parts_and_build_shards_sh_stages(sources, tokenizer, tmp_path):
    """Two mixture parts (a YAML each, same sources and weights) built and merged by
    slurm/build_shards.sh's stages: the merge sums the per-source counts, so its shares
    follow the weights within one document per part."""
    docs = texts(400)
    parts = []
    for k in range(2):
        d = tmp_path / f"raw{k}"
        d.mkdir()
        (d / "big.jsonl").write_bytes(jsonl_bytes(docs[k * 130:(k + 1) * 130]))
        (d / "small.jsonl").write_bytes(jsonl_bytes(docs[300 + k * 20:320 + k * 20]))
        (d / "mix.yaml").write_text("sources:\n  - {name: big, inputs: big.jsonl, weight: 1}\n"
                                    "  - {name: small, inputs: small.jsonl, weight: 1}\n")
        parts.append(d / "mix.yaml")
    out = tmp_path / "merged"
    pdir = tmp_path / "parts"
    (pdir / "logs").mkdir(parents=True)
    (pdir / "parts.txt").write_text("".join(f"{p}\n" for p in parts))
    env = {**os.environ, "OUTPUT": str(out), "PARTS_DIR": str(pdir), "SEQ_LENGTHS": "64,128", "VAL_FRACTION": "0.1",
           "SEED": "3", "REPO": str(ROOT), "PYTHON": sys.executable, "TOKENIZER": str(tokenizer)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM")}
    for k in range(2):
        res = subprocess.run(["bash", str(ROOT / "slurm/build_shards.sh")], env={**env, "STAGE": "part",
                             "SLURM_ARRAY_TASK_ID": str(k)}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["bash", str(ROOT / "slurm/build_shards.sh")], env={**env, "STAGE": "merge"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    merged = read_manifest(out)
    pm = [read_manifest(pdir / f"part-{k:05d}") for k in range(2)]
    for split in ("train", "val"):
        srcs = merged["splits"][split]["sources"]
        for name in ("big", "small"):
            assert srcs[name]["document_tokens"] == sum(p["splits"][split]["sources"][name]["document_tokens"] for p in pm)
        total = sum(c["document_tokens"] for c in srcs.values())
        # (a part whose val split lacks a source says so; the others then share its weight)
        if split == "train" or not merged["mixture"]["warnings"]:
            assert abs(srcs["small"]["document_tokens"] - total / 2) <= 2 * 200, split
        for L, b in merged["splits"][split]["buckets"].items():
            assert sum(b["source_tokens"].values()) == b["tokens"]
    assert merged["mixture"]["sources"][0]["inputs"] == [str(tmp_path / f"raw{k}" / "big.jsonl") for k in range(2)]
    # parts with other weights are not merged
    (parts[1].parent / "mix.yaml").write_text("sources:\n  - {name: big, inputs: big.jsonl, weight: 2}\n"
                                              "  - {name: small, inputs: small.jsonl, weight: 1}\n")
    other = tmp_path / "other"
    build_shards(BuildArgs(sources=load_mixture(parts[1]), output=str(other), tokenizer=str(tokenizer),
                           seq_lengths=SEQ, val_fraction=0.1, seed=3, workers=1, progress=False))
    with pytest.raises(ValueError, match="mixture sources and weights"):
        merge_builds([pdir / "part-00000", other], tmp_path / "bad")
    assert json.loads((out / "manifest.json").read_text()) == merged
