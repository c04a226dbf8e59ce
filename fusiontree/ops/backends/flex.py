"""Attention backend `flex`: FlexAttention and PyTorch SDPA under the contract of `attention_ref`.

Legend: B batch, T queries, S keys (S0 cached + the T new ones), H query heads, K kv heads,
G = H // K query heads per kv head, D head dim.

The regime is told apart by shapes and tensor identity alone, so choosing costs no host sync:

- S == T, no cache (training, prefill). Positions are taken to advance by one per token inside
  a document: the assumption `attention_ref` already makes for its blocking, and what the
  model produces for plain rows, packed documents and left-padded prompts. The causal, window
  and document rules then become rules on indices, so the kernels skip whole blocks.
  * T below one FlexAttention block (128): SDPA with the reference's boolean mask on
    positions (T x T is tiny there). On torch 2.11 Inductor found no kernel configuration
    for FlexAttention at T = 63, so short sequences never take that path.
  * No document mask, `k_pos is q_pos` (the model passes the very same tensor when no token is
    padding) and a global layer (a window >= T acts as one): SDPA with `is_causal` (flash kernel).
  * Otherwise FlexAttention. Its block mask depends only on (T, window) when there is neither
    a document mask nor padding, and is cached per shape. With document masks or padding
    (keys with k_pos < 0) it depends on the data: `flex_block_masks` builds the masks of one
    forward once, one per window, and the model hands them to every layer (`SeqInfo.attn_masks`);
    called without them, the op builds its own. Building them in one place, from the forward's
    own tensors, is also what lets a CUDA graph capture the building and replay it on new data.
  A padding query sees no key on the FlexAttention path and gets zero (the reference leaves that row to its
  blocking, and the model discards it); every real token gets the reference's result.
  A document is a contiguous run of one seq id, as for the SSD and conv1d references and the
  model's positions (`positions_from_seq_idx`). `attention_ref` compares ids for equality, so
  in a row that reuses an id for two separate runs it lets the later run see the earlier one
  up to equal positions; FlexAttention keeps the runs apart (ids are relabelled per run).
- S > T (chunked prefill or decode with a cache; cached slots in any order, empty slots at
  position -1): SDPA with a boolean mask computed from positions by the reference's rule. That
  is the right algorithm here: the cache is not in position order and T is small. GQA folds the
  G query heads of each kv head into the query axis, so the cache is never copied per head.

On CUDA, FlexAttention and block-mask construction are compiled (torch.compile, once per
signature). On CPU they run uncompiled (materialising T x S scores) and FlexAttention has no
backward there: that path exists to test the masking logic on machines without a GPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from fusiontree.ops.backends.common import canonical_seq_idx, compile_once, window_tensor
from fusiontree.ops.masks import effective_window, visible

# Shorter training/prefill inputs take the masked SDPA path (one FlexAttention block is 128).
_FLEX_MIN_T = 128
# SDPA kernels allowed for the unmasked causal path on CUDA. The math kernel is left out on
# purpose: at 32K tokens it would build a 32K x 32K score matrix per head and run out of memory.
_FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
# SDPA kernels for the masked path (decode steps, chunked prefill): cuDNN is left out because
# it spent 2.8 ms of host time per call there (profile of a `1b` decode step on an H200, 20
# calls per token: 44% of the step's host time), against one kernel launch for the others.
_MASKED_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# FlexAttention `kernel_options` (tile sizes, warps, stages) for the window / document path;
# empty: FlexAttention's own choice. benchmarks/kernels_gpu.py --flex-options tries others.
FLEX_KERNEL_OPTIONS: dict = {}


def _on(device: torch.device, fn):
    """`fn` compiled (once) on CUDA; as it is on other devices."""
    return compile_once(fn) if device.type == "cuda" else fn


def _flex_fn(device: torch.device):
    return _on(device, flex_attention)


def _block_mask_fn(device: torch.device):
    # Compiled, create_block_mask evaluates the mask block by block instead of building the
    # full T x T boolean mask first (1 GiB at 32K).
    return _on(device, create_block_mask)


def _mask_mod(window_t: Tensor, q_seq_BT: Tensor | None, k_seq_BS: Tensor | None, k_pos_BS: Tensor | None):
    """Index-based rule (positions advance by one per token inside a document), plus the
    document and padding rules read from data when given."""
    def mask_mod(b, h, q_idx, kv_idx):
        keep = visible(q_idx, kv_idx, window_t, None if q_seq_BT is None else q_seq_BT[b, q_idx],
                       None if k_seq_BS is None else k_seq_BS[b, kv_idx])
        if k_pos_BS is not None:
            keep = keep & (k_pos_BS[b, kv_idx] >= 0)
        return keep
    return mask_mod


@lru_cache(maxsize=64)
def _index_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    mask_mod = _mask_mod(window_tensor(window, device), None, None, None)
    return _block_mask_fn(device)(mask_mod, None, None, T, T, device=device)


def _index_window(window: int | None, T: int) -> int:
    """The window in the masks' index math: global (None, or a window covering all T keys) is a
    window of every key."""
    w = effective_window(window, T)
    return T if w is None else w


def _data_block_mask(T: int, window: int, q_seq_BT: Tensor | None, k_seq_BS: Tensor | None,
                     k_pos_BS: Tensor | None, device: torch.device) -> BlockMask:
    Bsz = (q_seq_BT if q_seq_BT is not None else k_pos_BS).shape[0]
    # Relabelled ids: one per contiguous run, so a reused id never joins two runs.
    q_runs = None if q_seq_BT is None else canonical_seq_idx(q_seq_BT)
    k_runs = q_runs if k_seq_BS is q_seq_BT else canonical_seq_idx(k_seq_BS)
    mask_mod = _mask_mod(window_tensor(window, device), q_runs, k_runs, k_pos_BS)
    return _block_mask_fn(device)(mask_mod, Bsz, None, T, T, device=device)


def _needs_data_mask(T: int, q_pos_BT: Tensor, k_pos_BS: Tensor, q_seq_BT: Tensor | None) -> bool:
    """Whether a self-attention forward of T tokens takes the FlexAttention path with a mask
    read from data (documents or padding) rather than one of shapes alone."""
    return T >= _FLEX_MIN_T and (q_seq_BT is not None or k_pos_BS is not q_pos_BT)


def flex_block_masks(q_pos_BT: Tensor, k_pos_BS: Tensor, q_seq_BT: Tensor | None, k_seq_BS: Tensor | None,
                     windows) -> dict[int, BlockMask] | None:
    """The data-dependent block masks of one cache-free forward, one per window in `windows`
    (None: global), keyed as `attention_flex` looks them up; None when no layer needs one.
    Positions and documents are those of the whole forward (every layer's queries are its keys)."""
    T = q_pos_BT.shape[1]
    if k_pos_BS.shape[1] != T or not _needs_data_mask(T, q_pos_BT, k_pos_BS, q_seq_BT):
        return None
    padded = k_pos_BS is not q_pos_BT
    return {w: _data_block_mask(T, w, q_seq_BT, k_seq_BS, k_pos_BS if padded else None, q_pos_BT.device)
            for w in sorted({_index_window(x, T) for x in windows})}


def _sdpa(backends: list, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """SDPA restricted to `backends` on CUDA (the CPU has one kernel choice: no restriction)."""
    with sdpa_kernel(backends) if q.is_cuda else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _expand_kv_heads(t_BTKD: Tensor, G: int) -> Tensor:
    return t_BTKD if G == 1 else t_BTKD.repeat_interleave(G, dim=2)  # head h reads kv head h // G


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    G = q.shape[2] // k.shape[2]
    # kv heads are expanded (O(T * H * D) memory) rather than passed with enable_gqa, which
    # not every fused SDPA kernel accepts; the flash kernel then always applies.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, _expand_kv_heads(k, G), _expand_kv_heads(v, G)))
    return _sdpa(_FUSED_SDPA, qt, kt, vt, is_causal=True, scale=scale).transpose(1, 2)


def _masked_sdpa(q, k, v, q_pos, k_pos, window, q_seq, k_seq, scale) -> Tensor:
    """The reference's rule on positions, as one boolean [B, T, S] mask."""
    K = k.shape[2]
    G = q.shape[2] // K
    mask = visible(q_pos[:, :, None], k_pos[:, None, :], window, None if q_seq is None else q_seq[:, :, None],
                   None if k_seq is None else k_seq[:, None, :])
    seen_BT = mask.any(dim=-1)
    # A query that sees no key would be a 0/0 softmax: let it see every key, then zero its row.
    mask = mask | ~seen_BT[..., None]
    T, S = mask.shape[1:]
    mask = mask[:, None].expand(-1, G, T, S).reshape(mask.shape[0], G * T, S)
    qf = rearrange(q, "b t (k g) d -> b k (g t) d", k=K)
    o = _sdpa(_MASKED_SDPA, qf, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale)
    o = rearrange(o, "b k (g t) d -> b t (k g) d", g=G)
    return o * seen_BT[:, :, None, None].to(o.dtype)


def attention_flex(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKD: Tensor,
    q_pos_BT: Tensor,
    k_pos_BS: Tensor,
    window: int | None = None,
    q_seq_BT: Tensor | None = None,
    k_seq_BS: Tensor | None = None,
    scale: float | None = None,
    block_masks: dict[int, BlockMask] | None = None,
) -> Tensor:
    """Same contract as `attention_ref` (the last T keys are the queries' own); returns o_BTHD.
    `block_masks`: this forward's masks from `flex_block_masks` (built here when absent).

    The cached regime (more keys than queries: a decode step) is plain PyTorch chosen by shapes
    alone, so an enclosing torch.compile (a model compiled block by block) traces it into its
    graph; every other regime is opaque to it (`_attention_flex_opaque`): it chooses its path from
    tensor identity (padding) and host-side shapes, and compiles FlexAttention separately."""
    _check_inputs(q_BTHD, k_BSKD, v_BSKD, window, q_seq_BT, k_seq_BS)
    scale = 1.0 / math.sqrt(q_BTHD.shape[3]) if scale is None else scale
    if k_BSKD.shape[1] > q_BTHD.shape[1]:
        return _masked_sdpa(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, k_pos_BS, window, q_seq_BT, k_seq_BS, scale)
    return _attention_flex_opaque(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, k_pos_BS, window, q_seq_BT, k_seq_BS,
                                  scale, block_masks)


def _check_inputs(q_BTHD: Tensor, k_BSKD: Tensor, v_BSKD: Tensor, window: int | None, q_seq_BT: Tensor | None,
                  k_seq_BS: Tensor | None) -> None:
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.shape != k_BSKD.shape:
        raise ValueError(f"attention expects q [B, T, H, D] and k, v [B, S, K, D], got q "
                         f"{tuple(q_BTHD.shape)}, k {tuple(k_BSKD.shape)}, v {tuple(v_BSKD.shape)}")
    T, H, D = q_BTHD.shape[1:]
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if S < T or H % K or k_BSKD.shape[3] != D:
        raise ValueError(f"need S >= T keys (cache + the queries' own), H % K == 0 and equal head "
                         f"dims; got T={T}, S={S}, H={H}, K={K}, q head dim {D}, k head dim {k_BSKD.shape[3]}")
    if (q_seq_BT is None) != (k_seq_BS is None):
        raise ValueError("pass both q_seq_BT and k_seq_BS (document masks) or neither")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (it counts the query itself), or None for global")


@torch.compiler.disable
def _attention_flex_opaque(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKD: Tensor,
    q_pos_BT: Tensor,
    k_pos_BS: Tensor,
    window: int | None,
    q_seq_BT: Tensor | None,
    k_seq_BS: Tensor | None,
    scale: float,
    block_masks: dict[int, BlockMask] | None,
) -> Tensor:
    T, H = q_BTHD.shape[1:3]
    K = k_BSKD.shape[2]
    if T < _FLEX_MIN_T:
        return _masked_sdpa(q_BTHD, k_BSKD, v_BSKD, q_pos_BT, k_pos_BS, window, q_seq_BT, k_seq_BS, scale)

    padded = k_pos_BS is not q_pos_BT
    window = effective_window(window, T)
    if q_seq_BT is None and not padded and window is None:
        return _causal_sdpa(q_BTHD, k_BSKD, v_BSKD, scale)

    if not q_BTHD.is_cuda and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q_BTHD, k_BSKD, v_BSKD)):
        raise ValueError("the flex attention backend has no backward on CPU (FlexAttention runs "
                         "forward-only there); train on CPU with kernels.attention=reference")
    w = _index_window(window, T)
    device = q_BTHD.device
    if q_seq_BT is None and not padded:
        block_mask = _index_block_mask(T, w, device)
    elif block_masks is not None and w in block_masks:
        block_mask = block_masks[w]
        assert tuple(block_mask.seq_lengths) == (T, T), (block_mask.seq_lengths, T)
    else:
        block_mask = _data_block_mask(T, w, q_seq_BT, k_seq_BS, k_pos_BS if padded else None, device)
    o = _flex_fn(device)(q_BTHD.transpose(1, 2), k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2),
                         block_mask=block_mask, scale=scale, enable_gqa=K != H,
                         kernel_options=dict(FLEX_KERNEL_OPTIONS) or None)
    return o.transpose(1, 2)

