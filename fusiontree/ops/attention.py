"""Causal sliding-window / global attention with GQA and document masking: PyTorch reference.

Legend: B batch, T queries, S keys (S = S0 cached keys + the T new ones), H query heads,
K key/value heads, G = H // K query heads per kv head, D head dim.

Query i may see key j iff `fusiontree.ops.masks.visible(q_pos[i], k_pos[j], window, q_seq[i],
k_seq[j])`: a real key (position >= 0), causal, inside the window (local layers; `window=None`
is a global layer), in the same document when packed.

Memory stays O(T * (S0 + window)): queries are processed in blocks, and a block of queries
only looks at the cached keys plus the new keys that can fall inside its window. That
restriction assumes positions inside a document advance by one per token (true for
training, prefill and decoding alike).

`decode_attention_ref`: one query per row over a static-shape cache whose first `filled`
slots may be read (the static decode step; the reference of `fusiontree.ops.backends.decode`).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from fusiontree.ops.masks import visible


def _cached_and_span(t: Tensor, dim: int, S0: int, lo: int, hi: int) -> Tensor:
    span = t.narrow(dim, lo, hi - lo)
    return span if S0 == 0 else torch.cat([t.narrow(dim, 0, S0), span], dim=dim)


def attention_ref(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKD: Tensor,
    q_pos_BT: Tensor,
    k_pos_BS: Tensor,
    window: int | None = None,
    q_seq_BT: Tensor | None = None,
    k_seq_BS: Tensor | None = None,
    scale: float | None = None,
    block_size: int = 256,
) -> Tensor:
    """The last T keys must be the keys of the T queries (self-attention over the new tokens);
    the first S - T keys are cached context in any slot order. Returns o_BTHD in q's dtype.
    A query with no visible key (a padding slot) gets a zero output."""
    Bsz, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    S0 = S - T
    assert S0 >= 0 and H % K == 0, (S, T, H, K)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = rearrange(q_BTHD.float(), "b t (k g) d -> b k g t d", k=K)
    k = rearrange(k_BSKD.float(), "b s k d -> b k s d")
    v = rearrange(v_BSKD.float(), "b s k d -> b k s d")
    outs = []
    for s in range(0, T, block_size):
        e = min(T, s + block_size)
        lo = S0 if window is None else S0 + max(0, s - window + 1)
        # keys: every cached one, plus the new keys [lo, S0 + e) that the block can reach
        kb, vb, kpos = (_cached_and_span(t, dim, S0, lo, S0 + e)
                        for t, dim in ((k, 2), (v, 2), (k_pos_BS, 1)))
        qpos = q_pos_BT[:, s:e]
        qseq = kseq = None
        if q_seq_BT is not None:
            qseq, kseq = q_seq_BT[:, s:e, None], _cached_and_span(k_seq_BS, 1, S0, lo, S0 + e)[:, None]
        mask = visible(qpos[:, :, None], kpos[:, None, :], window, qseq, kseq)
        scores = torch.einsum("bkgtd,bksd->bkgts", q[:, :, :, s:e], kb) * scale
        mask = mask[:, None, None]
        # A finite fill keeps fully masked rows finite (they are zeroed below).
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)
        outs.append(torch.einsum("bkgts,bksd->bkgtd", probs, vb))
    o = torch.cat(outs, dim=3)
    return rearrange(o, "b k g t d -> b t (k g) d").to(q_BTHD.dtype)


def attention_naive(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKD: Tensor,
    q_pos_BT: Tensor,
    k_pos_BS: Tensor,
    window: int | None = None,
    q_seq_BT: Tensor | None = None,
    k_seq_BS: Tensor | None = None,
) -> Tensor:
    """The full T x S masked softmax, for tests only (O(T * S) memory)."""
    K = k_BSKD.shape[2]
    G = q_BTHD.shape[2] // K
    k = k_BSKD.float().repeat_interleave(G, dim=2)
    v = v_BSKD.float().repeat_interleave(G, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q_BTHD.float(), k) / math.sqrt(q_BTHD.shape[-1])
    mask = visible(q_pos_BT[:, :, None], k_pos_BS[:, None, :], window,
                   None if q_seq_BT is None else q_seq_BT[:, :, None],
                   None if k_seq_BS is None else k_seq_BS[:, None, :])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v).to(q_BTHD.dtype)


def decode_attention_ref(
    q_B1HD: Tensor,
    k_BSKD: Tensor,
    v_BSKD: Tensor,
    q_pos_B1: Tensor,
    k_pos_BS: Tensor,
    filled_1: Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """One decode query per row over a static cache of S slots, of which only the first
    `filled_1` (a [1] int64 device tensor) may be read: the contract of the decode attention
    backends (`fusiontree.ops.backends.decode`). The query's own key is already in its slot,
    and slots are in any order inside the filled part (a ring buffer wraps).
    Static shapes, no host sync: the slots past `filled_1` are masked here, not skipped."""
    slot_S = torch.arange(k_BSKD.shape[1], device=k_BSKD.device)
    k_pos_BS = k_pos_BS.masked_fill(slot_S >= filled_1, -1)
    return attention_ref(q_B1HD, k_BSKD, v_BSKD, q_pos_B1, k_pos_BS, window=window, scale=scale)
