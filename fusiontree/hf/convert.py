"""The one mapping between FusionTree and its transformers export: config fields and weight names.

The exported model (modeling_fusiontree.py) mirrors FusionTree's module tree, so a weight keeps
its name under the `model.` prefix (`layers.3.mamba.A_log` -> `model.layers.3.mamba.A_log`);
only `lm_head.weight` sits at the top in both. Config fields map one to one (`CONFIG_FIELDS`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import Tensor

from fusiontree.config import ModelConfig

# FusionTree ModelConfig field -> FusionTreeConfig (transformers) field
CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "max_seq_len": "max_position_embeddings", "mixer": "mixer", "block": "block", "gate": "gate",
    "gate_rank": "gate_rank", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "window": "sliding_window", "attn_pattern": "attn_pattern", "rope_theta": "rope_theta",
    "ssm_expand": "ssm_expand", "ssm_head_dim": "ssm_head_dim", "ssm_state": "ssm_state_size",
    "ssm_groups": "ssm_groups", "conv_kernel": "conv_kernel", "chunk_size": "chunk_size",
    "srte_dim": "srte_dim", "srte_max_period": "srte_max_period", "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range", "pruned": "pruned",
}
# Fields only FusionTree reads (its initialisation, or the 0 = "derive it" spelling of head_dim and
# mlp_hidden that config.json writes out resolved); they ride along in config.json under
# "fusiontree" so that an import gives back the same ModelConfig.
FUSIONTREE_ONLY_FIELDS = ("preset", "dt_min", "dt_max", "head_dim", "mlp_hidden")


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The FusionTreeConfig keyword arguments of a FusionTree model config."""
    cfg.validate()
    if cfg.has_mamba and cfg.conv_kernel < 2:
        raise ValueError(f"model.conv_kernel={cfg.conv_kernel}: the export keeps a conv state of kernel - 1 "
                         "inputs in transformers' cache, which needs conv_kernel >= 2")
    out = {hf: getattr(cfg, ft) for ft, hf in CONFIG_FIELDS.items()}
    out["pruned"] = list(cfg.pruned)
    out["head_dim"] = cfg.attn_head_dim
    out["intermediate_size"] = cfg.mlp_hidden_size
    out["fusiontree"] = {name: getattr(cfg, name) for name in FUSIONTREE_ONLY_FIELDS}
    return out


def model_config_from_hf(config: Mapping) -> ModelConfig:
    """The FusionTree model config of an exported config.json (a dict)."""
    missing = [hf for hf in CONFIG_FIELDS.values() if hf not in config]
    if missing or config.get("model_type") != "fusiontree":
        raise ValueError(f"not a FusionTree export: config.json has model_type={config.get('model_type')!r} "
                         f"and lacks {missing[:5]}; import a directory written by launch/export_hf.py")
    values = {ft: config[hf] for ft, hf in CONFIG_FIELDS.items()}
    values["pruned"] = list(values["pruned"])
    values["head_dim"] = config["head_dim"]
    values["mlp_hidden"] = config["intermediate_size"]
    values.update({k: v for k, v in (config.get("fusiontree") or {}).items() if k in FUSIONTREE_ONLY_FIELDS})
    cfg = dataclasses.replace(ModelConfig(), **values)
    cfg.validate()
    return cfg


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def fusiontree_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        raise ValueError(f"weight {name!r} is not part of a FusionTree export (expected 'model.*' or "
                         "'lm_head.weight')")
    return name[len("model."):]


def to_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {hf_name(k): v for k, v in state.items()}


def from_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {fusiontree_name(k): v for k, v in state.items()}
