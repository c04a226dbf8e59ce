"""Depthwise causal conv1d with a carried state: pure-PyTorch references.

Legend: B batch, T time, C channels, K kernel width; a state holds the last K-1 inputs,
oldest first ([B, C, K-1], the layout mamba-ssm's kernels use).

    y[t, c] = act(bias[c] + sum_k weight[c, k] * x[t - (K-1) + k, c])

Inputs before t = 0 come from the initial state (zeros when none is given). Across a
document boundary of a packed sequence (`seq_idx`) a tap that would reach into the previous
document reads zero instead, exactly as if the document had started from a zero state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"unknown conv1d activation {activation!r}; use 'silu' or None")


def causal_conv1d_ref(
    x_BTC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    initial_state_BCK: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Returns (y_BTC in x's dtype, final_state_BCK: the last K-1 inputs, fp32 math)."""
    Bsz, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    x = x_BTC.float()
    if initial_state_BCK is None:
        prev = x.new_zeros(Bsz, K - 1, C)
    else:
        prev = initial_state_BCK.float().transpose(1, 2)
    xp = torch.cat([prev, x], dim=1)  # [B, K-1+T, C]; xp[:, s] is input t = s - (K-1)
    w = weight_CK.float()
    y = x.new_zeros(Bsz, T, C) if bias_C is None else bias_C.float().expand(Bsz, T, C).clone()
    if seq_idx_BT is not None:
        # The initial state belongs to the first document.
        seq_p = torch.cat([seq_idx_BT[:, :1].expand(Bsz, K - 1), seq_idx_BT], dim=1)
    for k in range(K):
        tap = xp[:, k:k + T]
        if seq_idx_BT is not None:
            tap = tap * (seq_p[:, k:k + T] == seq_idx_BT)[..., None]
        y = y + tap * w[:, k]
    return _activate(y, activation).to(x_BTC.dtype), conv1d_final_state(x_BTC, K, initial_state_BCK, seq_idx_BT)


def conv1d_final_state(x_BTC: Tensor, K: int, initial_state_BCK: Tensor | None = None,
                       seq_idx_BT: Tensor | None = None) -> Tensor:
    """The state after `x_BTC` (fp32 [B, C, K-1]): its last K-1 inputs, reaching back into the
    initial state when T < K-1, and zero where they lie in an earlier document than the last
    token's (the next call continues the last document)."""
    Bsz, T, C = x_BTC.shape
    if initial_state_BCK is None:
        prev = x_BTC.new_zeros(Bsz, K - 1, C, dtype=torch.float32)
    else:
        prev = initial_state_BCK.float().transpose(1, 2)
    m = min(T, K - 1)  # inputs of this call among the last K-1
    tail = torch.cat([prev, x_BTC[:, T - m:].float()], dim=1)[:, m:]
    if seq_idx_BT is not None and K > 1:
        # The initial state belongs to the first document.
        seq_p = torch.cat([seq_idx_BT[:, :1].expand(Bsz, K - 1), seq_idx_BT], dim=1)[:, T:]
        tail = tail * (seq_p == seq_idx_BT[:, -1:])[..., None]
    return tail.transpose(1, 2).contiguous()


def causal_conv1d_step_ref(
    state_BCK: Tensor,
    x_BC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """One decode step: shifts `x_BC` into `state_BCK` in place and returns y_BC."""
    w = weight_CK.float()
    x = x_BC.float()
    y = (state_BCK.float() * w[:, :-1]).sum(-1) + x * w[:, -1]
    if bias_C is not None:
        y = y + bias_C.float()
    if state_BCK.shape[-1]:
        state_BCK.copy_(torch.cat([state_BCK[..., 1:], x_BC[..., None].to(state_BCK.dtype)], dim=-1))
    return _activate(y, activation).to(x_BC.dtype)
