import dataclasses

import pytest
import torch

from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel

# Every block layout the model supports, at debug size (window 16, one local + one global layer).
VARIANTS = {
    "parallel-channel": dict(),
    "parallel-token": dict(gate="token"),
    "serial": dict(block="serial"),
    "transformer": "transformer-debug",
    "window-only": dict(mixer="attention", attn_pattern="L"),
    "mamba-only": dict(mixer="mamba"),
}


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter off its initial value (zero-initialised gates and SRTE
    projections included) so that every path of the model affects the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.float().std() if p.numel() > 1 and p.std() > 0 else 1.0))
    return model


def build(variant: str, seed: int = 0, **overrides) -> HybridLanguageModel:
    spec = VARIANTS[variant]
    cfg = model_preset(spec) if isinstance(spec, str) else dataclasses.replace(model_preset("debug"), **spec)
    cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(seed)
    return perturb_(HybridLanguageModel(cfg), seed).eval()


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return request.param
