"""Position encodings, both functions of explicit absolute positions (never of input length).

Legend: B batch, T time, H heads, D head dim (attention) or model width (SRTE), E SRTE width.

- `RotaryPositionalEmbedding` rotates attention queries and keys; it is the only position
  signal the attention branch gets, so its scores depend only on q_pos - k_pos.
- `SRTE` (sinusoidal time encoding) feeds the Mamba branch only. It computes a fixed bank of
  E/2 sinusoid pairs of the absolute position, sin(p * w_k) and cos(p * w_k) with
  w_k = max_period ** (-k / (E/2)), and mixes them into the Mamba input through a learned
  E -> D projection that starts at zero (the branch starts exactly as plain Mamba-2 and
  learns how much absolute time to use). The SSM already knows order through its
  recurrence; SRTE adds where in the document a token is, which the decay alone blurs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class RotaryPositionalEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def rotate(self, x_BTHD: Tensor, pos_BT: Tensor) -> Tensor:
        angle = pos_BT.float()[..., None] * self.inv_freq  # [B, T, D/2]
        cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
        x = x_BTHD.float()
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x_BTHD.dtype)

    def forward(self, q_BTHD: Tensor, k_BSHD: Tensor, q_pos_BT: Tensor, k_pos_BS: Tensor):
        return self.rotate(q_BTHD, q_pos_BT), self.rotate(k_BSHD, k_pos_BS)


class SRTE(nn.Module):
    def __init__(self, dim: int, d_model: int, max_period: float = 10000.0):
        super().__init__()
        assert dim % 2 == 0 and dim > 0
        freq = max_period ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
        self.register_buffer("freq", freq.float(), persistent=False)
        self.proj = nn.Linear(dim, d_model, bias=False)

    def basis(self, pos_BT: Tensor) -> Tensor:
        angle = pos_BT.float()[..., None] * self.freq
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    def forward(self, pos_BT: Tensor, dtype: torch.dtype) -> Tensor:
        """Returns the [B, T, D] time signal to add to the Mamba branch input."""
        return self.proj(self.basis(pos_BT).to(dtype))

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)
