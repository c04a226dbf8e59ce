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
    seq_p = None if seq_idx_BT is None else _state_doc_ids(seq_idx_BT, K)
    for k in range(K):
        tap = xp[:, k:k + T]
        if seq_idx_BT is not None:
            tap = tap * (seq_p[:, k:k + T] == seq_idx_BT)[..., None]
        y = y + tap * w[:, k]
    return _activate(y, activation).to(x_BTC.dtype), _final_state(xp, T, seq_p, seq_idx_BT)


def _state_doc_ids(seq_idx_BT: Tensor, K: int) -> Tensor:
    """Document ids of the K-1 state slots and the T inputs: the state belongs to the first
    document."""
    return torch.cat([seq_idx_BT[:, :1].expand(seq_idx_BT.shape[0], K - 1), seq_idx_BT], dim=1)


def _final_state(xp_BSC: Tensor, T: int, seq_p_BS: Tensor | None, seq_idx_BT: Tensor | None) -> Tensor:
    """The last K-1 of the state slots and inputs `xp` ([B, C, K-1]), zero where they belong to
    a document before the last token's."""
    final = xp_BSC[:, T:]
    if seq_idx_BT is not None and final.shape[1]:
        final = final * (seq_p_BS[:, T:] == seq_idx_BT[:, -1:])[..., None]
    return final.transpose(1, 2).contiguous()


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


def _masked_taps(x_BTC: Tensor, K: int, seq_idx_BT: Tensor | None) -> list[Tensor]:
    """The K inputs each output reads, fp32, zero state: tap k at t is input t - (K-1) + k, or
    zero before t = 0 and across a document boundary."""
    T = x_BTC.shape[1]
    xp = F.pad(x_BTC.float(), (0, 0, K - 1, 0))  # [B, K-1+T, C]; xp[:, s] is input t = s - (K-1)
    seq_p = None if seq_idx_BT is None else F.pad(seq_idx_BT, (K - 1, 0), value=-1)  # -1: no document
    taps = []
    for k in range(K):
        tap = xp[:, k:k + T]
        if seq_p is not None and k < K - 1:
            tap = tap * (seq_p[:, k:k + T] == seq_idx_BT)[..., None]
        taps.append(tap)
    return taps


def _taps(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None) -> Tensor:
    """The conv before its activation, fp32, zero state."""
    w = weight_CK.float()
    y = 0.0 if bias_C is None else bias_C.float()
    for k, tap in enumerate(_masked_taps(x_BTC, w.shape[1], seq_idx_BT)):
        y = y + tap * w[:, k]
    return y


class _ConvExplicitBackward(torch.autograd.Function):
    """Zero-state causal conv1d whose backward is written out: the input gradient as one pass
    over the output gradient at K shifts, the weight and bias gradients as reductions over
    tokens. It saves only the input (in its own dtype) and recomputes the pre-activation,
    where autograd through the reference saves fp32 padded copies and builds each tap's
    gradient through a scatter into a padded buffer."""

    @staticmethod
    def forward(ctx, x_BTC, weight_CK, bias_C, seq_idx_BT, silu: bool):
        pre = _taps(x_BTC, weight_CK, bias_C, seq_idx_BT)
        ctx.save_for_backward(x_BTC, weight_CK, bias_C, seq_idx_BT)
        ctx.silu = silu
        return (F.silu(pre) if silu else pre).to(x_BTC.dtype)

    @staticmethod
    def backward(ctx, dy_BTC):
        x_BTC, weight_CK, bias_C, seq_idx_BT = ctx.saved_tensors
        T, K = x_BTC.shape[1], weight_CK.shape[1]
        g = dy_BTC.float()
        if ctx.silu:
            pre = _taps(x_BTC, weight_CK, bias_C, seq_idx_BT)
            s = torch.sigmoid(pre)
            g = g * s * (1 + pre * (1 - s))
        w = weight_CK.float()
        # Output t + (K-1) - k reads input t through tap k; past the end the gradient is zero.
        gp = F.pad(g, (0, 0, 0, K - 1))
        if seq_idx_BT is not None:
            seq_n = F.pad(seq_idx_BT, (0, K - 1), value=-1)
        dx = g * w[:, K - 1]
        for k in range(K - 1):
            shift = K - 1 - k
            term = gp[:, shift:shift + T]
            if seq_idx_BT is not None:
                term = term * (seq_n[:, shift:shift + T] == seq_idx_BT)[..., None]
            dx = dx + term * w[:, k]
        dw = torch.stack([(g * tap).sum((0, 1)) for tap in _masked_taps(x_BTC, K, seq_idx_BT)], dim=1)
        dw = dw.to(weight_CK.dtype)
        db = None if bias_C is None else g.sum((0, 1)).to(bias_C.dtype)
        return dx.to(x_BTC.dtype), dw, db, None, None


def causal_conv1d_explicit(
    x_BTC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    initial_state_BCK: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """`causal_conv1d_ref`'s contract, with a hand-written backward for the zero-state regime
    (training and cache-free forwards). A call with an initial state (a cached prefill, which
    takes no gradient) is the reference's computation itself. The final state is computed
    without a gradient: nothing trains through it."""
    if initial_state_BCK is not None:
        return causal_conv1d_ref(x_BTC, weight_CK, bias_C, initial_state_BCK, seq_idx_BT, activation)
    if activation not in (None, "silu"):
        raise ValueError(f"unknown conv1d activation {activation!r}; use 'silu' or None")
    y = _ConvExplicitBackward.apply(x_BTC, weight_CK, bias_C, seq_idx_BT, activation == "silu")
    with torch.no_grad():
        K = weight_CK.shape[1]
        xp = F.pad(x_BTC.float(), (0, 0, K - 1, 0))  # a zero state, then the inputs
        seq_p = None if seq_idx_BT is None else _state_doc_ids(seq_idx_BT, K)
        final = _final_state(xp, x_BTC.shape[1], seq_p, seq_idx_BT)
    return y, final
