"""Small building blocks: RMSNorm, gated RMSNorm, SwiGLU MLP, and parameter tags.

Legend: B batch, T time, D model width, F MLP hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def no_weight_decay(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter that the optimizer must not decay (norm gains, biases, A_log, D, dt_bias)."""
    p._no_weight_decay = True
    return p


def keep_fp32(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter that stays fp32 when the model is cast to bf16 (see `cast_model`)."""
    p._keep_fp32 = True
    return p


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters to `dtype`, leaving those tagged `keep_fp32` in fp32."""
    for p in model.parameters():
        if p.is_floating_point() and not getattr(p, "_keep_fp32", False):
            p.data = p.data.to(dtype)
    return model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of `group_size` channels (one group per SSM group,
    so that sharding the Mamba heads by group keeps the norm local)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        assert dim % group_size == 0
        self.group_size, self.eps = group_size, eps
        self.weight = no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = y.float() * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], -1, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.view(shape) * self.weight.float()).to(y.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x_BTD)) * self.w_up(x_BTD))

    def init_weights(self, std: float, n_layers: int) -> None:
        nn.init.normal_(self.w_gate.weight, std=std)
        nn.init.normal_(self.w_up.weight, std=std)
        # The MLP writes straight into the residual stream: scale by depth (GPT-2 style).
        nn.init.normal_(self.w_down.weight, std=std / math.sqrt(2 * n_layers))

    def flops_per_token(self) -> int:
        return 2 * 3 * self.w_gate.in_features * self.w_gate.out_features
