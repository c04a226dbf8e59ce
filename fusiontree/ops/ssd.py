"""Mamba-2 SSD (state space duality) scan: pure-PyTorch fp32 references.

Legend: B batch, T time, H heads, P head dim, G groups (B/C shared by H/G heads), R heads per
group, N state size, c chunks, Q chunk length (i, j index time inside a chunk).

The recurrence, per head, with a_t = dt_t * A (A < 0, dt_t >= 0):

    h_t = exp(a_t) * h_{t-1} + dt_t * outer(x_t, B_t)        h: [P, N]
    y_t = h_t @ C_t + D * x_t

A document boundary at t (packed sequences) sets exp(a_t) = 0: the state restarts there.
`ssd_chunked_ref` computes the same thing chunk by chunk (quadratic inside a chunk, a
recurrence over chunk states between chunks); `ssd_recurrent_ref` and `ssd_step_ref` run it
token by token (the latter updates a decode state in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from fusiontree.ops.masks import document_starts


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """cu_seqlens [S+1] (0, l0, l0+l1, ..., total) -> seq_idx [1, total] (int32 document index)."""
    if cu_seqlens.ndim != 1 or int(cu_seqlens[-1]) != total:  # host sync: validation of user input
        raise ValueError(f"cu_seqlens must be 1-D and end at the packed length {total}, "
                         f"got {cu_seqlens.tolist()}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths.to(torch.long))[None]


def split_xbc(xBC_BTW: Tensor, heads: int, head_dim: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """x, B and C packed along the last dim, [x (H·P) | B (G·N) | C (G·N)] (as the Mamba mixer's
    conv leaves them) -> views x_BTHP, B_BTGN, C_BTGN."""
    inner = heads * head_dim
    GN = (xBC_BTW.shape[-1] - inner) // 2
    x, B, C = torch.split(xBC_BTW, [inner, GN, GN], dim=-1)
    return (rearrange(x, "b t (h p) -> b t h p", p=head_dim), rearrange(B, "b t (g n) -> b t g n", g=groups),
            rearrange(C, "b t (g n) -> b t g n", g=groups))


def _segsum(a: Tensor) -> Tensor:
    """a [..., Q] -> S [..., Q, Q] with S[i, j] = sum(a[j+1 .. i]) for i >= j, -inf above the
    diagonal. Built with a masked cumsum (no differences of cumsums), so a -inf entry (a
    state reset) stays -inf instead of turning into nan."""
    Q = a.shape[-1]
    x = repeat(a, "... i -> ... i j", j=Q)
    below = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    x = x.masked_fill(~below, 0.0).cumsum(dim=-2)
    return x.masked_fill(~torch.ones_like(below).tril(0), float("-inf"))


def _log_decay(dt_BTH: Tensor, A_H: Tensor, seq_idx_BT: Tensor | None) -> Tensor:
    a_BTH = dt_BTH * A_H
    if seq_idx_BT is not None:  # the initial state belongs to the first document
        a_BTH = a_BTH.masked_fill(document_starts(seq_idx_BT, first=False)[..., None], float("-inf"))
    return a_BTH


def ssd_chunked_ref(
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    D_H: Tensor | None = None,
    chunk_size: int = 64,
    initial_state_BHPN: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan. Returns (y_BTHP in x's dtype, final_state_BHPN in fp32).

    dt must already be positive (softplus and bias applied). `initial_state` is the state
    before token 0 and belongs to the first document; the final state is the state after the
    last token (of the last document, when `seq_idx` marks several).
    """
    Bsz, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[-2:]
    assert H % G == 0, (H, G)
    out_dtype = x_BTHP.dtype
    x, dt, Bm, Cm = (t.float() for t in (x_BTHP, dt_BTH, B_BTGN, C_BTGN))
    a = _log_decay(dt, A_H.float(), seq_idx_BT)
    Q = chunk_size
    pad = (-T) % Q
    if pad:  # padded steps have dt = 0: no input, no decay, so the final state is unchanged
        x, Bm, Cm = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bm, Cm))
        dt, a = (F.pad(t, (0, 0, 0, pad)) for t in (dt, a))
    x = rearrange(x, "b (c q) (g r) p -> b c q g r p", q=Q, g=G)
    dt = rearrange(dt, "b (c q) (g r) -> b g r c q", q=Q, g=G)
    a = rearrange(a, "b (c q) (g r) -> b g r c q", q=Q, g=G)
    Bm = rearrange(Bm, "b (c q) g n -> b c q g n", q=Q)
    Cm = rearrange(Cm, "b (c q) g n -> b c q g n", q=Q)

    a_cum = a.cumsum(dim=-1)  # decay from the chunk start through position i
    L = torch.exp(_segsum(a))  # [b g r c i j]: decay from j to i inside a chunk

    # 1. inside each chunk: y_i += sum_j (C_i . B_j) L_ij dt_j x_j
    CB = torch.einsum("bcign,bcjgn->bgcij", Cm, Bm)
    M = CB[:, :, None] * L * dt[..., None, :]
    y = torch.einsum("bgrcij,bcjgrp->bcigrp", M, x)

    # 2. each chunk's own final state: sum_j decay(j -> end) dt_j x_j B_j^T
    decay_to_end = L[..., -1, :]
    states = torch.einsum("bcjgn,bgrcj,bcjgrp->bcgrpn", Bm, decay_to_end * dt, x)

    # 3. pass states across chunks: state entering chunk c, and the final state
    if initial_state_BHPN is None:
        init = torch.zeros_like(states[:, 0])
    else:
        init = rearrange(initial_state_BHPN.float(), "b (g r) p n -> b g r p n", g=G)
    states = torch.cat([init[:, None], states], dim=1)  # [b c+1 g r p n]
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b g r c+1 c+1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    states_in, final = states[:, :-1], states[:, -1]

    # 4. contribution of the entering state to each position
    y = y + torch.einsum("bcign,bcgrpn,bgrci->bcigrp", Cm, states_in, torch.exp(a_cum))

    y = rearrange(y, "b c q g r p -> b (c q) (g r) p")[:, :T]
    if D_H is not None:
        y = y + D_H.float()[:, None] * x_BTHP.float()
    return y.to(out_dtype), rearrange(final, "b g r p n -> b (g r) p n")


def ssd_step_ref(
    state_BHPN: Tensor,
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
    D_H: Tensor | None = None,
) -> Tensor:
    """One decode step: updates `state_BHPN` (fp32) in place and returns y_BHP in x's dtype."""
    H = x_BHP.shape[1]
    G = B_BGN.shape[1]
    x, dt = x_BHP.float(), dt_BH.float()
    Bh = repeat(B_BGN.float(), "b g n -> b (g r) n", r=H // G)
    Ch = repeat(C_BGN.float(), "b g n -> b (g r) n", r=H // G)
    decay_BH = torch.exp(dt * A_H.float())
    state_BHPN.mul_(decay_BH[..., None, None]).add_(
        (dt[..., None] * x)[..., None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state_BHPN, Ch)
    if D_H is not None:
        y = y + D_H.float()[:, None] * x
    return y.to(x_BHP.dtype)


def ssd_recurrent_ref(
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    D_H: Tensor | None = None,
    initial_state_BHPN: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Token-by-token scan in `dtype` (float64 in tests): the ground truth for the chunked scan."""
    Bsz, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[-2:]
    x, dt, Bm, Cm = (t.to(dtype) for t in (x_BTHP, dt_BTH, B_BTGN, C_BTGN))
    A = A_H.to(dtype)
    Bh = repeat(Bm, "b t g n -> b t (g r) n", r=H // G)
    Ch = repeat(Cm, "b t g n -> b t (g r) n", r=H // G)
    h = (torch.zeros(Bsz, H, P, N, dtype=dtype, device=x.device) if initial_state_BHPN is None
         else initial_state_BHPN.to(dtype))
    ys = []
    starts_BT = None if seq_idx_BT is None else document_starts(seq_idx_BT, first=False)
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        if starts_BT is not None:
            decay = decay * (~starts_BT[:, t]).to(dtype)[:, None, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D_H is not None:
        y = y + D_H.to(dtype)[:, None] * x
    return y, h
