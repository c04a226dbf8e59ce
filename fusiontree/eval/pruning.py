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

from fusiontree.models.config import ModelConfig
from fusiontree.models import HybridLanguageModel
from fusiontree.train.gate_monitor import off_branch


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


def plan_with_thresholds(plan: dict, off_threshold: float, frac_threshold: float) -> dict:
    """The plan the same gate statistics give under other thresholds (a GateMonitor plan
    keeps every layer's evidence under "layers"), with the rule of
    `GateMonitor.pruning_plan`."""
    if "layers" not in plan:
        raise ValueError("this plan has no per-layer evidence ('layers'); re-export it with GateMonitor")
    prune = []
    for row in plan["layers"]:
        branch = off_branch(row["mean_gate"], row["frac_attention_preferred"], off_threshold, frac_threshold)
        if branch is not None:
            prune.append({"layer": row["layer"], "branch": branch,
                          "evidence": {k: v for k, v in row.items() if k not in ("layer", "off")}})
    return {**plan, "thresholds": {"off_threshold": off_threshold, "frac_threshold": frac_threshold},
            "prune": prune}


def apply_pruning(checkpoint: str | Path, plan: dict | str | Path, out_dir: str | Path) -> Path:
    """Write a pruned copy of `checkpoint` (a checkpoint or run directory) to `out_dir`:
    model.pt without the planned branches, config.yaml with `model.pruned` extended,
    pruning_plan.json (the plan applied) and meta.json (sizes before and after). The result
    loads with `fusiontree.checkpoint.load_checkpoint`; it holds no optimizer state, so it
    is for evaluation and inference, not for resuming training. Returns `out_dir`."""
    from fusiontree.checkpoint import (MODEL_FILE, read_meta, resolve_checkpoint, safe_load, stored_tokenizer_path,
                                       write_model_checkpoint)
    from fusiontree.config import dump_config, load_config
    from fusiontree.models.flops import count_params

    src = resolve_checkpoint(checkpoint)
    plan = load_plan(plan) if not isinstance(plan, dict) else plan
    if "prune" not in plan:
        raise ValueError("not a pruning plan (no 'prune' list); export one with GateMonitor.export_pruning_plan")
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"out_dir {out} is the source checkpoint; write the pruned copy elsewhere")
    cfg = load_config(src / "config.yaml")
    new_model_cfg = pruned_model_config(cfg.model, plan)
    new_cfg = dataclasses.replace(cfg, model=new_model_cfg)
    new_cfg.validate()
    state = safe_load(src / MODEL_FILE)
    with torch.device("meta"):
        keep = HybridLanguageModel(new_model_cfg).state_dict()
    missing = [k for k in keep if k not in state]
    if missing:
        raise ValueError(f"{src / MODEL_FILE} lacks parameters the pruned model needs: {missing[:5]}")
    pruned_state = {k: state[k].clone() for k in keep}  # own storage: the file holds only what is kept
    removed = [f"{int(p['layer'])}:{p['branch']}" for p in plan["prune"]]
    src_meta = read_meta(src)
    meta = {k: v for k, v in src_meta.items() if k not in ("files", "zero_stage", "world_size")}
    tokenizer = stored_tokenizer_path(src, src_meta)  # the copy travels with the weights
    extra = {tokenizer.name: tokenizer.read_bytes()} if tokenizer is not None else {}
    meta.update({"kind": "pruned", "pruned_from": str(src), "removed": removed,
                 "params_before": count_params(cfg.model), "params_after": count_params(new_model_cfg),
                 "model_bytes_before": (src / MODEL_FILE).stat().st_size})
    return write_model_checkpoint(out, pruned_state, dump_config(new_cfg),
                                  lambda d: {**meta, "model_bytes_after": (d / MODEL_FILE).stat().st_size},
                                  {"pruning_plan.json": json.dumps(plan, indent=2), **extra})
