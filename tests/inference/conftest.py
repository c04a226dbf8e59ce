"""A checkpoint trained for a few CPU steps (debug preset, one process through launch/train.py),
and its tokenizer, for the generation tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir
from fusiontree.data.tokenizer import load_sentencepiece
from tests.train.conftest import ROOT, env

VOCAB = 400
MAX_SEQ_LEN = 256


def make_shards(out: Path, package: str = "json", seed: int = 1, vocab_size: int = VOCAB) -> Path:
    build_shards(BuildArgs(inputs=[str(stdlib_dir() / package)], output=str(out), vocab_size=vocab_size,
                           seq_lengths=[64], val_fraction=0.2, workers=1, seed=seed, progress=False))
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("generate_shards") / "shards")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shards) -> Path:
    """A run directory with one checkpoint after 12 steps on the `json` package's source."""
    root = tmp_path_factory.mktemp("generate_run")
    cfg = {"model": {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": MAX_SEQ_LEN},
           "data": {"shards_dir": str(shards), "global_batch_tokens": 512, "micro_batch_tokens": 512,
                    "num_workers": 0, "curriculum": [{"seq_len": 64, "until_tokens": 0}]},
           "train": {"steps": 12, "lr_peak": 0.01, "lr_warmup_steps": 2, "log_every_steps": 4,
                     "eval_every_steps": 12, "eval_batches": 1, "checkpoint_every_steps": 12,
                     "gate_stats_every_steps": 4},
           "out_dir": str(root / "run")}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(root / "config.yaml")],
                         env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="session")
def sp(shards):
    return load_sentencepiece(shards / "tokenizer.model")
