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

    def cos_sin(self, pos_BT: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of every position's angles, [B, T, D/2] fp32 each. Under torch.compile
        they come from an op of their own, so Inductor writes them once per layer and the
        rotation's kernels (forward and backward) read them: fused into the rotation, each
        (token, head, angle) element would compute its own cos and sin, head after head."""
        if torch.compiler.is_compiling():
            return torch.ops.fusiontree.rope_cos_sin(pos_BT, self.inv_freq)
        return _rope_cos_sin(pos_BT, self.inv_freq)

    @staticmethod
    def rotate_by(x_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor) -> Tensor:
        cos, sin = cos_BTD[:, :, None], sin_BTD[:, :, None]
        x = x_BTHD.float()
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x_BTHD.dtype)

    def forward(self, q_BTHD: Tensor, k_BSHD: Tensor, q_pos_BT: Tensor, k_pos_BS: Tensor):
        q_table = self.cos_sin(q_pos_BT)
        k_table = q_table if k_pos_BS is q_pos_BT else self.cos_sin(k_pos_BS)
        return self.rotate_by(q_BTHD, *q_table), self.rotate_by(k_BSHD, *k_table)


def _rope_cos_sin(pos_BT: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    angle = pos_BT.float()[..., None] * inv_freq  # [B, T, D/2]
    return angle.cos(), angle.sin()


@torch.library.custom_op("fusiontree::rope_cos_sin", mutates_args=())
def _rope_cos_sin_op(pos_BT: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    return _rope_cos_sin(pos_BT, inv_freq)


@_rope_cos_sin_op.register_fake
def _(pos_BT: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    shape = (*pos_BT.shape, inv_freq.shape[0])
    return (pos_BT.new_empty(shape, dtype=torch.float32), pos_BT.new_empty(shape, dtype=torch.float32))


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
