"""Parameter and FLOP accounting from a config, without allocating the model's memory."""

from __future__ import annotations

import torch

from fusiontree.config import ModelConfig


def _meta_model(cfg: ModelConfig):
    from fusiontree.models.hybrid import HybridLanguageModel

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
