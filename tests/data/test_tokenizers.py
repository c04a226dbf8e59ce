"""Builds with a Hugging Face tokenizer.json (trained here with the tokenizers library): the
manifest records it, the loader and evaluation read it back, special ids come from the files
beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusiontree.config import CurriculumStage, DataConfig
from fusiontree.data import build_train_loader, load_tokenizer
from fusiontree.data.build import BuildArgs, build_shards, format_summary
from fusiontree.data.shards import bucket_shards, read_manifest, read_shard_range
from fusiontree.data.tokenizer import (load_tokenizer_file, sha256_bytes, tokenizer_from_build,
                                       train_bytelevel_bpe)

from .test_formats import jsonl_bytes, texts

SEQ = [64, 128]


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    path.write_bytes(train_bytelevel_bpe(texts(200), vocab_size=600))
    return path


@pytest.fixture(scope="module")
def hf_build(tmp_path_factory, hf_json) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hf_build")
    (root / "in.jsonl").write_bytes(jsonl_bytes(texts()))
    out = root / "shards"
    summary = build_shards(BuildArgs(inputs=[str(root / "in.jsonl")], output=str(out), tokenizer=str(hf_json),
                                     seq_lengths=SEQ, val_fraction=0.2, workers=2, seed=4, shard_size=16,
                                     progress=False))
    return out, summary


def test_manifest_records_kind_hash_and_special_ids(hf_build, hf_json):
    out, summary = hf_build
    m = read_manifest(out)
    tok = m["tokenizer"]
    assert tok["kind"] == "huggingface" and tok["path"] == "tokenizer.json" and tok["trained"] is False
    assert tok["sha256"] == sha256_bytes(hf_json.read_bytes()) == sha256_bytes((out / "tokenizer.json").read_bytes())
    assert tok["special_ids"] == {"pad": 1, "unk": None, "bos": None, "eos": 0}
    assert m["vocab_size"] == tok["vocab_size"] == 600 and not (out / "tokenizer.model").exists()
    assert "Hugging Face tokenizer.json" in format_summary(summary, str(out)) and "eos 0" in format_summary(summary, str(out))


def test_samples_decode_to_the_documents_with_eos_between(hf_build):
    out, _ = hf_build
    m = read_manifest(out)
    tok = tokenizer_from_build(out)
    assert tok.kind == "huggingface" and tok.eos_id() == 0 and tok.bos_id() == 0  # GPT-style: eos stands for bos
    text = ""
    for split in ("train", "val"):
        for L in SEQ:
            for shard in bucket_shards(out, m, split, L):
                got, err = read_shard_range(shard, 0, shard.samples, L, m["token_dtype"], m["vocab_size"])
                assert err is None
                for _, t, starts in got:
                    ends = [int(s) - 1 for s in starts[1:]]
                    assert all(t[e] == 0 for e in ends)  # every piece before a document start ends with eos
                    text += tok.decode(t.tolist())
    assert all(tok.decode(tok.encode(doc)) == doc for doc in texts())  # byte-level BPE round-trips
    tagged = sum(text.count(f"T{i:04d}|") == 1 for i in range(len(texts())))
    dropped = sum(m["splits"][s]["packing"]["dropped_tail_documents"] for s in ("train", "val"))
    assert tagged >= len(texts()) - dropped


def test_loader_and_vocab_check_read_the_tokenizer_from_the_manifest(hf_build, hf_json, tmp_path):
    out, _ = hf_build
    cfg = DataConfig(shards_dir=str(out), global_batch_tokens=128, micro_batch_tokens=128, num_workers=0,
                     curriculum=[CurriculumStage(seq_len=64, until_tokens=0)])
    tok = load_tokenizer(cfg)
    assert tok.kind == "huggingface" and tok.vocab_size() == 600
    batch = build_train_loader(cfg, rank=0, world_size=1, seed=0).next_batch()
    assert int(batch["input_ids"].max()) < tok.vocab_size()
    # evaluation loads the file a checkpoint names: inside a build it takes the build's ids
    assert load_tokenizer_file(out / "tokenizer.json").special_ids == tok.special_ids
    other = tmp_path / "tokenizer.json"
    other.write_bytes(train_bytelevel_bpe(texts(50), vocab_size=400))
    with pytest.raises(ValueError, match="is not the one the shards"):
        load_tokenizer(DataConfig(shards_dir=str(out), tokenizer=str(other)))


def test_special_tokens_from_the_config_beside_it(tmp_path, hf_json):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(hf_json.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}, "bos_token": None}))
    assert load_tokenizer_file(d / "tokenizer.json").special_ids["eos"] == 1
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="names eos_token '<\\|nope\\|>', which is not in its vocabulary"):
        load_tokenizer_file(d / "tokenizer.json")


def test_a_tokenizer_json_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(texts(20), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    with pytest.raises(ValueError, match="no end-of-document \\(eos\\) token.*tokenizer_config.json"):
        load_tokenizer_file(tmp_path / "tokenizer.json")
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="bad.json is not a Hugging Face tokenizer.json"):
        load_tokenizer_file(tmp_path / "bad.json")


def test_training_and_evaluation_use_the_builds_tokenizer_json(hf_build, tmp_path):
    """launch/train.py checks model.vocab_size against the manifest's tokenizer.json, trains,
    decodes its sample with it; evaluation gets it back from the checkpoint."""
    import subprocess

    import yaml

    from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint
    from tests.train.conftest import ROOT, env, free_port, train_cmd, write_config

    # Its own port: another one-process run may hold the default one. The first run in a new
    # venv builds DeepSpeed's CPU op (minutes on a loaded machine).
    def run(cmd, timeout=500):
        return subprocess.run(cmd, env={**env(), "MASTER_PORT": str(free_port())}, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    out, _ = hf_build
    cfg_path = write_config(tmp_path / "c.yaml", out, tmp_path / "run", steps=2, eval_every_steps=2,
                            checkpoint_every_steps=2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"].update(num_workers=0, curriculum=[{"seq_len": 64, "until_tokens": 0}])
    cfg["generate"] = {"max_new_tokens": 4}
    cfg_path.write_text(yaml.safe_dump(cfg))  # vocab_size 512: not the tokenizer's 600
    res = run(train_cmd(cfg_path, launcher="python"))
    assert res.returncode != 0 and "the tokenizer has 600 ids but model.vocab_size=512" in res.stdout + res.stderr
    cfg["model"]["vocab_size"] = 600
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = run(train_cmd(cfg_path, launcher="python"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1])
    assert ckpt.meta["tokenizer"] == str(out / "tokenizer.json")
    tok = checkpoint_tokenizer(ckpt)
    assert tok.kind == "huggingface" and tok.sha256 == read_manifest(out)["tokenizer"]["sha256"]
