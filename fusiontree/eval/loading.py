"""Load a training (or pruned) checkpoint for evaluation: weights, resolved config, metadata.

A checkpoint directory (fusiontree/train/checkpoint.py) holds `model.pt` (the plain,
consolidated state dict), `config.yaml` (the resolved run config) and `meta.json`. A run
directory (`out_dir`) or its `checkpoints/` folder may be given instead: the latest valid
checkpoint in it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fusiontree.config import RunConfig, load_config
from fusiontree.models import HybridLanguageModel
from fusiontree.ops import reference_kernels, resolve_kernels


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: RunConfig
    meta: dict
    model: HybridLanguageModel


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, run or checkpoints directory."""
    from fusiontree.train.checkpoint import CheckpointManager

    p = Path(path)
    if (p / "model.pt").is_file() and (p / "config.yaml").is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and any(root.glob("step_*")):
            latest = CheckpointManager(root, 0, 1).latest_valid()
            if latest is not None and (latest / "model.pt").is_file():
                return latest
    raise ValueError(f"{path} is not a checkpoint (no model.pt + config.yaml) and holds no valid "
                     "checkpoints/step_* directory; pass a directory written by launch/train.py or "
                     "fusiontree.eval.pruning.apply_pruning")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", kernels: str | None = None,
                    overrides: list[str] | None = None) -> LoadedCheckpoint:
    """Build the model of the checkpoint's config, load its weights, put it in eval mode.
    `kernels`: "reference" forces the PyTorch reference ops; None picks what the config says
    (`auto` resolves per device). `overrides`: dotted config overrides (e.g. --data.shards_dir=...)."""
    from fusiontree.train.checkpoint import safe_load

    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / "config.yaml", overrides)
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
    device = torch.device(device)
    kern = reference_kernels() if kernels == "reference" else resolve_kernels(cfg.kernels, device)
    model = HybridLanguageModel(cfg.model, kern)
    state = safe_load(ckpt / "model.pt")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / 'model.pt'} does not match its config.yaml (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}); was the config edited after saving?")
    return LoadedCheckpoint(ckpt, cfg, meta, model.to(device).eval())


def checkpoint_tokenizer(ckpt: LoadedCheckpoint, override: str | Path = ""):
    """The tokenizer of a checkpoint: `override` (a .model or tokenizer.json), else the one
    its run trained with (meta.json), else the one its shards' manifest names."""
    from fusiontree.data.tokenizer import load_tokenizer_file, tokenizer_from_build

    if override:
        return load_tokenizer_file(override)
    path = Path(ckpt.meta.get("tokenizer") or "")
    if path.is_file():
        return load_tokenizer_file(path)
    return tokenizer_from_build(ckpt.cfg.data.shards_dir, ckpt.cfg.data.tokenizer)
