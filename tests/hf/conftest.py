"""Shards, checkpoints and exports for the Hugging Face tests.

- `hf_shards`: stdlib json + email packages (their .py files split into train / val), vocab 512.
- `layout_exports`: one perturbed random checkpoint per block layout, written with the project's
  checkpoint code, and its export (every path of the model affects the outputs).
- `trained_run`: the debug preset trained for a few steps by launch/train.py (one process).
- `run_hf(script, ...)`: a fresh Python process with the hub unreachable (HF_HUB_OFFLINE=1, an
  empty HF_HOME) that cannot import FusionTree or its dependencies: what a user of the export has.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fusiontree.config import load_config, model_preset
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir
from fusiontree.hf.checkpoints import write_weights_checkpoint
from fusiontree.hf.export import export_hf
from fusiontree.models import HybridLanguageModel
from tests.models.conftest import perturb_

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
# Every block layout an export must reproduce, on the debug preset (window 16, layers "LG").
LAYOUTS = {
    "parallel-channel": dict(),
    "parallel-token": dict(gate="token"),
    "serial": dict(block="serial"),
    "pruned": dict(n_layers=4, attn_pattern="LLG", pruned=["0:attention", "1:mamba", "2:attention", "2:mamba"]),
    "attention-only": "transformer-debug",
    "window-only": dict(mixer="attention", attn_pattern="L"),
    "mamba-only": dict(mixer="mamba"),
}


@pytest.fixture(scope="session")
def hf_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_shards") / "shards"
    build_shards(BuildArgs(inputs=[str(stdlib_dir() / "json"), str(stdlib_dir() / "email")], output=str(out),
                           vocab_size=VOCAB, seq_lengths=[64, 128], val_fraction=0.3, workers=1, seed=11,
                           progress=False))
    return out


def layout_model(layout: str, seed: int = 0) -> HybridLanguageModel:
    spec = LAYOUTS[layout]
    base = model_preset(spec) if isinstance(spec, str) else dataclasses.replace(model_preset("debug"), **spec)
    cfg = dataclasses.replace(base, vocab_size=VOCAB, max_seq_len=512)
    torch.manual_seed(seed)
    return perturb_(HybridLanguageModel(cfg), seed).eval()


def run_config(shards: Path, out_dir: Path, **model):
    cfg = load_config(None, [f"--data.shards_dir={shards}", "--data.micro_batch_tokens=128",
                             "--data.global_batch_tokens=128", "--data.curriculum=[{seq_len: 128, until_tokens: 0}]",
                             f"--out_dir={out_dir}"])
    return cfg


def save_checkpoint(path: Path, model: HybridLanguageModel, shards: Path) -> Path:
    cfg = dataclasses.replace(run_config(shards, path.parent), model=model.cfg)
    meta = {"step": 1, "tokenizer": str(shards / "tokenizer.model"), "preset": model.cfg.preset, "world_size": 1}
    return write_weights_checkpoint(path, cfg, model.state_dict(), meta)


@pytest.fixture(scope="session")
def layout_exports(tmp_path_factory, hf_shards) -> dict[str, tuple[Path, Path]]:
    """layout -> (checkpoint dir, export dir)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in LAYOUTS:
        ckpt = save_checkpoint(root / layout / "ckpt", layout_model(layout), hf_shards)
        export_hf(ckpt, root / layout / "hf")
        out[layout] = (ckpt, root / layout / "hf")
    return out


def train_env() -> dict:
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(venv_bin.parent / "torch_extensions")))
    env["PATH"] = f"{venv_bin}:{env['PATH']}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config: dict, out_dir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """launch/train.py in one process (ZeRO-0) with `config` (a dict written as the run's YAML)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump({**config, "out_dir": str(out_dir)}))
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--ds_config", str(ROOT / "configs/ds/zero0.json"),
           "--config", str(path), *extra]
    # a port of its own: one process still rendezvous over MASTER_PORT (default 29500)
    env = dict(train_env(), MASTER_PORT=str(free_port()))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def train_config(shards: Path, steps: int) -> dict:
    return {"model": {"preset": "debug", "vocab_size": VOCAB},
            "data": {"shards_dir": str(shards), "global_batch_tokens": 512, "micro_batch_tokens": 256,
                     "num_workers": 0, "curriculum": [{"seq_len": 64, "until_tokens": 0}]},
            "train": {"steps": steps, "lr_warmup_steps": 1, "log_every_steps": 1, "eval_every_steps": 1000,
                      "checkpoint_every_steps": steps, "gate_stats_every_steps": 1000}}


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, hf_shards) -> Path:
    """The debug preset after 6 steps of launch/train.py: a run directory with one checkpoint."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(train_config(hf_shards, 6), run)
    return run


# A process that has what a user of the export has: torch and transformers, no FusionTree, no hub.
ISOLATION = """
import sys
# None in sys.modules: `import x` fails and importlib.util.find_spec("x") says "not installed".
for name in ("fusiontree", "tests", "einops", "deepspeed", "megatron", "sentencepiece"):
    sys.modules[name] = None
"""


def run_hf(script: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    home = tmp_path / "hf_home"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(home), PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    path = tmp_path / "hf_script.py"
    path.write_text(ISOLATION + script)
    # no stdin: transformers' "run the custom code? [y/N]" prompt fails at once instead of waiting
    res = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res
