"""Tiny shards (a stdlib package + passkey documents) and tiny checkpoints for the eval tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fusiontree.checkpoint import tokenizer_files
from fusiontree.config import RunConfig, dump_config, load_config
from fusiontree.models.config import model_preset
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir
from fusiontree.data.tokenizer import load_sentencepiece
from fusiontree.eval.passkey import write_training_jsonl
from fusiontree.models import HybridLanguageModel
from tests.models.conftest import perturb_

VOCAB = 400


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """json + html from the stdlib and 60 passkey documents, buckets 64 and 128; val 30%."""
    root = tmp_path_factory.mktemp("eval_shards")
    jsonl = write_training_jsonl(root / "passkey.jsonl", 60, seed=0, max_filler=12)
    out = root / "shards"
    build_shards(BuildArgs(inputs=[str(stdlib_dir() / "json"), str(stdlib_dir() / "html"), str(jsonl)],
                           output=str(out), vocab_size=VOCAB, seq_lengths=[64, 128], val_fraction=0.3,
                           workers=1, seed=5, progress=False))
    return out


@pytest.fixture(scope="session")
def sp(eval_shards):
    return load_sentencepiece(eval_shards / "tokenizer.model")


def tiny_model_config(**overrides):
    base = dataclasses.replace(model_preset("debug"), vocab_size=VOCAB, max_seq_len=512)
    return dataclasses.replace(base, **overrides)


def write_checkpoint(path: Path, shards: Path, seed: int = 0, **model_overrides) -> tuple[Path, HybridLanguageModel]:
    """A checkpoint directory as launch/train.py writes it (model.pt, config.yaml, meta.json),
    holding a perturbed random debug model: evaluation needs no training."""
    cfg: RunConfig = load_config(None, [f"--data.shards_dir={shards}", "--data.micro_batch_tokens=128",
                                        "--data.global_batch_tokens=128",
                                        "--data.curriculum=[{seq_len: 128, until_tokens: 0}]"])
    cfg = dataclasses.replace(cfg, model=tiny_model_config(**model_overrides))
    torch.manual_seed(seed)
    model = perturb_(HybridLanguageModel(cfg.model), seed).eval()
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / "model.pt")
    (path / "config.yaml").write_text(dump_config(cfg))
    tok_file, tok_meta = tokenizer_files(load_sentencepiece(shards / "tokenizer.model"))
    for name, data in tok_file.items():
        (path / name).write_bytes(data)
    meta = {"step": 1, "tokenizer": str(shards / "tokenizer.model"), **tok_meta, "preset": "debug", "world_size": 1}
    meta["files"] = {n: (path / n).stat().st_size for n in ("model.pt", "config.yaml", *tok_file)}
    (path / "meta.json").write_text(json.dumps(meta))
    return path, model
