"""Decode attention backend `filled_blocks`: one query per row over the filled blocks of a
static-shape cache, through FlexAttention's decoding kernel, under the contract of
`fusiontree.ops.attention.decode_attention_ref`.

Legend: B batch, S cache slots, H query heads, K kv heads, D head dim, N key blocks of the cache.

Why: the static decode step (one captured CUDA graph replays it for every token) has the
shapes of the allocation, so the default path (`all_slots`) hands every allocated slot of a
global layer's cache to masked SDPA. That kernel reads all of them and, with a single query
row per head, runs on about B x K thread blocks that each loop over every key (measured at
about 1.5 ms per global layer at 32K on an H200, BENCHMARKS.md). Here the slots are cut into
blocks of `KV_BLOCK` and described to FlexAttention by a BlockMask whose block count,
ceil(filled / KV_BLOCK), is computed on the device from the step counter:

- compiled (on CUDA, or `compiled=True`), FlexAttention's decoding kernel spreads the counted
  blocks over the GPU (split-KV: partial softmaxes merged) and never loads a block past the
  count, so a step reads the filled part of the cache, not the allocation;
- the shapes, the block indices and the code path stay the same from one step to the next,
  so the step stays inside one CUDA graph (nothing is read on the host).

Inside the counted blocks the mask (`visible`, plus slot < filled) drops left padding, empty
slots and the tail of the last block. Every row of a batch holds the same number of tokens
(rows advance together), so one block count serves all rows and heads: the BlockMask
broadcasts over B and H.

Eager FlexAttention (CPU without `compiled=True`) evaluates every slot under the same mask:
the same result without the skipping. Inductor's CPU kernel skips blocks like the GPU one,
which is how the tests check the block count on a machine without a GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fusiontree.ops.backends.common import compile_once, window_tensor
from fusiontree.ops.masks import visible

# Slots per key block: FlexAttention's default sparse block, a multiple of every tile its
# decoding kernel picks.
KV_BLOCK = 128
# FlexAttention kernel options of the decoding kernel (empty: FlexAttention's own choice, such
# as its split of the keys, SPLIT_KV, or ours below); `benchmarks/decode_gpu.py
# --decode-kernel-options` sets them.
DECODE_KERNEL_OPTIONS: dict = {}
# On CUDA, each program of the decoding kernel streams at most this many cache slots of one row
# and kv head (an upper bound: the kernel splits the filled blocks only). FlexAttention splits
# each (row, kv head)'s keys into SMs // (B x K) * 2 parts: on an H200 with 4 kv heads, 8 parts
# of 4K slots at batch 8 and 2 of 16K at batch 32 for a 32K cache. `1b` at 32K decoded in
# 2.65 ms per token at batch 8 with parts of 1K against 2.93 ms with parts of 4K (2.68 with
# 512), and at batch 32 in 5.10 ms either way, against 6.32 ms with FlexAttention's 2 parts
# (BENCHMARKS.md). Where FlexAttention's own split is finer (batch 1: 66 parts), it stands.
MAX_SLOTS_PER_SPLIT = 1024


def decode_kernel_options(batch: int, kv_heads: int, slots: int, sms: int | None) -> dict | None:
    """The decoding kernel's options: DECODE_KERNEL_OPTIONS, plus a split of the keys fine enough
    for MAX_SLOTS_PER_SPLIT (rounded up to a power of two) where FlexAttention's own (from `sms`,
    the GPU's multiprocessor count; None off CUDA) is coarser. None: FlexAttention's defaults."""
    options = dict(DECODE_KERNEL_OPTIONS)
    if "SPLIT_KV" not in options and sms is not None:
        flex_split = max(1, sms // max(1, batch * kv_heads) * 2)
        split = 1 << (-(-slots // MAX_SLOTS_PER_SPLIT) - 1).bit_length()  # a power of two
        if split > flex_split:
            options["SPLIT_KV"] = split
    return options or None


_SMS: dict[int, int] = {}


@torch.compiler.assume_constant_result  # a compiled decode block reads it once, while tracing
def _multiprocessors(device_index: int) -> int:
    if device_index not in _SMS:
        _SMS[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return _SMS[device_index]


@lru_cache(maxsize=32)
def _block_indices(n_blocks: int, device: torch.device) -> Tensor:
    """[1, 1, 1, N] int32: the key blocks in slot order (the first `count` of them are read)."""
    return torch.arange(n_blocks, dtype=torch.int32, device=device).view(1, 1, 1, n_blocks)


def filled_block_mask(q_pos_B1: Tensor, k_pos_BS: Tensor, filled_1: Tensor, window: int | None) -> BlockMask:
    """The BlockMask of one decode step: the first ceil(filled / KV_BLOCK) blocks, and inside
    them the keys the query may see. Device ops only (no host sync), so it can be captured."""
    S = k_pos_BS.shape[1]
    n_blocks = -(-S // KV_BLOCK)
    count_111 = torch.div(filled_1 + (KV_BLOCK - 1), KV_BLOCK, rounding_mode="floor").to(torch.int32).view(1, 1, 1)
    window_t = None if window is None else window_tensor(window, k_pos_BS.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_pos_B1[b, q_idx], k_pos_BS[b, kv_idx], window_t) & (kv_idx < filled_1[0])

    # compute_q_blocks=False: the transposed index that only a backward pass reads is not built.
    return BlockMask.from_kv_blocks(count_111, _block_indices(n_blocks, k_pos_BS.device), BLOCK_SIZE=KV_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(1, S), compute_q_blocks=False)


def decode_attention_filled_blocks(
    q_B1HD: Tensor,
    k_BSKD: Tensor,
    v_BSKD: Tensor,
    q_pos_B1: Tensor,
    k_pos_BS: Tensor,
    filled_1: Tensor,
    window: int | None = None,
    scale: float | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """Same contract as `decode_attention_ref`; returns o_B1HD. `compiled`: run FlexAttention
    compiled, which skips the blocks past `filled_1` (default: on CUDA only).

    Inside an enclosing torch.compile (the compiled decode step's blocks) on CUDA, the BlockMask
    and FlexAttention are traced into that graph: one compiled graph per block, its
    neighbours fused around the decoding kernel. On CPU, Inductor's FlexAttention template takes
    no neighbours, so there it stays a separate compiled call."""
    if not q_B1HD.is_cuda and torch.compiler.is_compiling():
        return _filled_blocks_opaque(q_B1HD, k_BSKD, v_BSKD, q_pos_B1, k_pos_BS, filled_1, window, scale, compiled)
    if q_B1HD.ndim != 4 or q_B1HD.shape[1] != 1 or k_BSKD.ndim != 4 or v_BSKD.shape != k_BSKD.shape:
        raise ValueError(f"decode attention expects q [B, 1, H, D] and k, v [B, S, K, D], got q "
                         f"{tuple(q_B1HD.shape)}, k {tuple(k_BSKD.shape)}, v {tuple(v_BSKD.shape)}")
    B, _, H, D = q_B1HD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if H % K or k_BSKD.shape[3] != D or k_BSKD.shape[0] != B:
        raise ValueError(f"need H % K == 0, equal head dims and batch sizes; got H={H}, K={K}, q head dim {D}, "
                         f"k head dim {k_BSKD.shape[3]}, batch {B} vs {k_BSKD.shape[0]}")
    if (tuple(q_pos_B1.shape) != (B, 1) or tuple(k_pos_BS.shape) != (B, S) or not isinstance(filled_1, Tensor)
            or tuple(filled_1.shape) != (1,)):
        raise ValueError(f"need q_pos [B, 1], k_pos [B, S] and filled [1] (a device tensor); got "
                         f"{tuple(q_pos_B1.shape)}, {tuple(k_pos_BS.shape)}, {getattr(filled_1, 'shape', filled_1)}")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (it counts the query itself), or None for global")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if torch.compiler.is_compiling():  # traced into the enclosing graph
        fn = flex_attention
    else:
        compiled = q_B1HD.is_cuda if compiled is None else compiled
        fn = compile_once(flex_attention) if compiled else flex_attention
    block_mask = filled_block_mask(q_pos_B1, k_pos_BS, filled_1, window)
    options = decode_kernel_options(B, K, S, _multiprocessors(q_B1HD.device.index or 0) if q_B1HD.is_cuda else None)
    o = fn(q_B1HD.transpose(1, 2), k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2), block_mask=block_mask,
           scale=scale, enable_gqa=K != H, kernel_options=options)
    return o.transpose(1, 2)


_filled_blocks_opaque = torch.compiler.disable(decode_attention_filled_blocks)
