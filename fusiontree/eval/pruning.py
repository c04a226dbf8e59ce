"""Apply a GateMonitor pruning plan: drop the branches whose gate is off.

A plan (see `fusiontree/train/gate_monitor.py`) lists `{"layer": i, "branch": "attention" |
"mamba"}` entries. Pruning removes that branch's parameters (and its norm, and SRTE with the
Mamba branch); the block keeps its gate, so the remaining branch keeps its weight, and its
MLP. When the gate really is off, the pruned model's outputs equal the original's up to the
branch's residual share g * a (or (1 - g) * m), which the plan's evidence bounds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fusiontree.config import ModelConfig
from fusiontree.models import HybridLanguageModel


def pruned_model_config(cfg: ModelConfig, plan: dict) -> ModelConfig:
    entries = list(cfg.pruned)
    for p in plan.get("prune", []):
        entry = f"{int(p['layer'])}:{p['branch']}"
        if entry not in entries:
            entries.append(entry)
    new = dataclasses.replace(cfg, pruned=entries)
    new.validate()
    return new


def prune_model(model: HybridLanguageModel, plan: dict) -> HybridLanguageModel:
    """A new model without the planned branches, sharing no storage with `model`."""
    cfg = pruned_model_config(model.cfg, plan)
    device = next(model.parameters()).device
    with torch.device(device):
        pruned = HybridLanguageModel(cfg, model.kernels)
    state = model.state_dict()
    keep = pruned.state_dict()
    missing = [k for k in keep if k not in state]
    if missing:
        raise ValueError(f"the model lacks parameters the pruned model needs: {missing[:5]}")
    pruned.load_state_dict({k: state[k].clone() for k in keep})
    return pruned.to(dtype=next(model.parameters()).dtype)


def load_plan(path: str | Path) -> dict:
    plan = json.loads(Path(path).read_text())
    if "prune" not in plan:
        raise ValueError(f"{path} is not a pruning plan (no 'prune' list); export one with "
                         "GateMonitor.export_pruning_plan")
    return plan
