"""Parameter and FLOP accounting from a config, without allocating the model's memory."""

from __future__ import annotations

import dataclasses

import torch

from fusiontree.models.config import ModelConfig
from fusiontree.models.hybrid import HybridLanguageModel


def _meta_model(cfg: ModelConfig) -> HybridLanguageModel:
    with torch.device("meta"):
        return HybridLanguageModel(cfg)


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    model = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        total -= model.embed.weight.numel() + model.lm_head.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> int:
    """Model FLOPs per token (x3 for forward + backward), attention counted up to its window."""
    return (3 if training else 1) * _meta_model(cfg).flops_per_token(seq_len)


def transformer_twin_layers(base: ModelConfig) -> int:
    """The depth of `base`'s Transformer twin (attention only, global everywhere) whose
    parameter count is closest to `base`'s: the rule behind the `transformer-*` presets."""
    twin = dataclasses.replace(base, mixer="attention", attn_pattern="G")
    one, two = (count_params(dataclasses.replace(twin, n_layers=n)) for n in (1, 2))
    per_layer = two - one  # parameters grow linearly with depth
    return max(1, round((count_params(base) - (one - per_layer)) / per_layer))
