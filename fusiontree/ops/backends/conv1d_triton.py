"""conv1d backend `triton`: our Triton kernels under the contract of `causal_conv1d_ref`
(training and prefill; the decode step stays the reference).

Legend: B batch, T time, C channels, K kernel width (any; 4 in the model).

Kernels on the layout the Mamba mixer has (the conv's input is a slice of the input
projection: channels contiguous, any row stride). A program owns a tile of BLOCK_T time steps
x BLOCK_C channels and reads the K time-shifted copies of a tile it needs, which the cache
serves after the first, so each tensor crosses memory about once per kernel:

- forward, one kernel: y = act(bias + sum_k w[:, k] * x[t - (K-1) + k]), a tap that reaches
  into another document (`seq_idx`, ids compared for equality as the reference does) reading
  zero, taps before t = 0 reading the initial state (which belongs to the first document);
- backward, two kernels. The first recomputes the pre-activation of its rows (nothing is saved
  but the inputs), writes d(pre) = dy * act'(pre) in dy's dtype, and its tile's partial sums of
  dweight and dbias (fp32; and dinitial_state from each row's first tile). The second is the
  transposed conv, dx[t] = sum_j w[:, K-1-j] * d(pre)[t + j] within t's document, reading the
  K shifted copies of d(pre). The partials are summed in PyTorch in a fixed order, so the
  backward is deterministic (no atomics). d(pre) rounded to dy's dtype is what PyTorch's own
  autograd of the conv and SiLU in bf16 hands from one to the other.

Both directions are torch custom ops (`conv1d_custom_ops`: backward registered, any input
layout), so a compiled block keeps them in its graph and CUDA graphs capture them. The final
state is the last K-1 inputs (`conv1d_final_state`, plain PyTorch on a few rows,
differentiable).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusiontree.ops.backends.common import conv1d_custom_ops, require_cuda
from fusiontree.ops.conv1d import conv1d_final_state


def parse_tiles(spec: str) -> tuple[tuple[int, int, int], ...]:
    """"FWD/DPRE/DX": the tiles (time steps x channels x warps, powers of two) of the forward,
    the d(pre) kernel and the dx kernel, e.g. 16x256x4/32x128x4/16x256x4."""
    try:
        tiles = tuple(tuple(int(v) for v in part.lower().split("x")) for part in spec.split("/"))
    except ValueError:
        tiles = ()
    if len(tiles) != 3 or any(len(t) != 3 or any(v < 1 or v & (v - 1) for v in t) for t in tiles):
        raise ValueError(f"conv1d triton tiles {spec!r}: expected FWD/DPRE/DX, each BLOCK_TxBLOCK_CxWARPS in "
                         "powers of two, e.g. 16x256x4/32x128x4/16x256x4")
    return tiles


# The fastest of six measured on an H200 (BENCHMARKS.md). FUSIONTREE_CONV1D_TILES sets them for a
# process; benchmarks/kernels_gpu.py --conv-triton-tiles times others.
FWD_TILES, DPRE_TILES, DX_TILES = parse_tiles(os.environ.get("FUSIONTREE_CONV1D_TILES", "32x128x4/64x64x4/32x128x4"))


@triton.jit
def _taps(x_ptr, init_ptr, seq_ptr, b, s, seq_r, c, c_mask, T, sxb, sxt, sib, sic, sik, ssb, sst,
          K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Input values at rows `s` ([BLOCK_T], may be < 0: the initial state) as fp32
    [BLOCK_T, BLOCK_C], zero where outside the input or in another document than `seq_r`."""
    in_x = (s >= 0) & (s < T)
    v = tl.load(x_ptr + b * sxb + s[:, None] * sxt + c[None, :], mask=in_x[:, None] & c_mask[None, :],
                other=0.0).to(tl.float32)
    if HAS_INIT:
        j = s + (K - 1)  # slot of the state, 0 .. K-2, for s in [-(K-1), 0)
        in_init = (s < 0) & (j >= 0)
        v += tl.load(init_ptr + b * sib + c[None, :] * sic + j[:, None] * sik,
                     mask=in_init[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        seq0 = tl.load(seq_ptr + b * ssb)
        seq_s = tl.load(seq_ptr + b * ssb + s * sst, mask=in_x, other=0)
        seq_s = tl.where(s < 0, seq0, seq_s)
        v = tl.where((seq_s == seq_r)[:, None], v, 0.0)
    return v


@triton.jit
def _row_seq(seq_ptr, b, r, T, ssb, sst, HAS_SEQ: tl.constexpr):
    """Document ids of rows `r` (zeros without documents)."""
    ids = r * 0
    if HAS_SEQ:
        ids = tl.load(seq_ptr + b * ssb + r * sst, mask=r < T, other=0)
    return ids


@triton.jit
def _pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, b, r, seq_r, c, c_mask, T, sxb, sxt, swc, swk, sib, sic,
         sik, ssb, sst, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The conv before its activation at rows `r`, fp32 [BLOCK_T, BLOCK_C]."""
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + c * swc + k * swk, mask=c_mask, other=0.0).to(tl.float32)
        acc += w[None, :] * _taps(x_ptr, init_ptr, seq_ptr, b, r - (K - 1) + k, seq_r, c, c_mask, T, sxb, sxt,
                                  sib, sic, sik, ssb, sst, K, HAS_INIT, HAS_SEQ)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, T, C, sxb, sxt, swc, swk, sib, sic, sik,
                     ssb, sst, syb, syt, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    seq_t = _row_seq(seq_ptr, b, t, T, ssb, sst, HAS_SEQ)
    acc = _pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, b, t, seq_t, c, c_mask, T, sxb, sxt, swc, swk, sib, sic,
               sik, ssb, sst, K, HAS_BIAS, HAS_INIT, HAS_SEQ, BLOCK_T, BLOCK_C)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * syb + t[:, None] * syt + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & c_mask[None, :])


@triton.jit
def _conv_dpre_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dpre_ptr, dw_ptr, db_ptr, dinit_ptr,
                      T, C, n_t, sxb, sxt, swc, swk, sib, sic, sik, ssb, sst, sdyb, sdyt,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                      SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """d(pre) [B, T, C] (contiguous, dy's dtype) for the tile's rows; the tile's partial
    dweight [n_tiles, K, C] and dbias [n_tiles, C] (tile index b * n_t + tile);
    dinitial_state [B, K-1, C] from each row's first tile."""
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    t_mask = t < T
    seq_t = _row_seq(seq_ptr, b, t, T, ssb, sst, HAS_SEQ)
    d = tl.load(dy_ptr + b * sdyb + t[:, None] * sdyt + c[None, :], mask=t_mask[:, None] & c_mask[None, :],
                other=0.0).to(tl.float32)
    if SILU:
        p = _pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, b, t, seq_t, c, c_mask, T, sxb, sxt, swc, swk, sib,
                 sic, sik, ssb, sst, K, HAS_BIAS, HAS_INIT, HAS_SEQ, BLOCK_T, BLOCK_C)
        sig = tl.sigmoid(p)
        d = d * sig * (1.0 + p * (1.0 - sig))
    tl.store(dpre_ptr + (b * T + t[:, None]) * C + c[None, :], d.to(dpre_ptr.dtype.element_ty),
             mask=t_mask[:, None] & c_mask[None, :])
    tile = b * n_t + pid_t
    for k in tl.static_range(K):
        v = _taps(x_ptr, init_ptr, seq_ptr, b, t - (K - 1) + k, seq_t, c, c_mask, T, sxb, sxt, sib, sic, sik, ssb,
                  sst, K, HAS_INIT, HAS_SEQ)
        tl.store(dw_ptr + (tile * K + k) * C + c, tl.sum(d * v, axis=0), mask=c_mask)
    if HAS_BIAS:
        tl.store(db_ptr + tile * C + c, tl.sum(d, axis=0), mask=c_mask)
    if HAS_INIT:
        if pid_t == 0:
            if HAS_SEQ:
                seq0 = tl.load(seq_ptr + b * ssb)
                d = tl.where((seq_t == seq0)[:, None], d, 0.0)
            # state slot i is input s = i - (K-1), read by row t through tap k = i - t
            for i in tl.static_range(K - 1):
                acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
                for k in tl.static_range(i + 1):
                    w = tl.load(w_ptr + c * swc + k * swk, mask=c_mask, other=0.0).to(tl.float32)
                    acc += w * tl.sum(tl.where((t == i - k)[:, None], d, 0.0), axis=0)
                tl.store(dinit_ptr + (b * (K - 1) + i) * C + c, acc, mask=c_mask)


@triton.jit
def _conv_dx_kernel(dpre_ptr, w_ptr, seq_ptr, dx_ptr, T, C, swc, swk, ssb, sst, sdxb, sdxt,
                    K: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[t] = sum_j w[:, K-1-j] * d(pre)[t + j], over the rows t + j of t's document."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    seq_t = _row_seq(seq_ptr, b, t, T, ssb, sst, HAS_SEQ)
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        r = t + j
        keep = r < T
        if HAS_SEQ:
            keep = keep & (_row_seq(seq_ptr, b, r, T, ssb, sst, HAS_SEQ) == seq_t)
        d = tl.load(dpre_ptr + (b * T + r[:, None]) * C + c[None, :], mask=keep[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c * swc + (K - 1 - j) * swk, mask=c_mask, other=0.0).to(tl.float32)
        dx += w[None, :] * d
    tl.store(dx_ptr + b * sdxb + t[:, None] * sdxt + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & c_mask[None, :])


def _flags(bias_C, initial_state_BCK, seq_idx_BT, silu: bool, K: int) -> dict:
    return dict(K=K, HAS_BIAS=bias_C is not None, HAS_INIT=initial_state_BCK is not None,
                HAS_SEQ=seq_idx_BT is not None, SILU=silu)


def _tile_args(tiles: tuple[int, int, int]) -> dict:
    block_t, block_c, warps = tiles
    return dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)


def _grid(tiles: tuple[int, int, int], Bsz: int, T: int, C: int) -> tuple[int, int, int]:
    return (triton.cdiv(T, tiles[0]), triton.cdiv(C, tiles[1]), Bsz)


def _seq_strides(seq_idx_BT) -> tuple:
    return (0, 0) if seq_idx_BT is None else seq_idx_BT.stride()


def _ptr_strides(x_BTC, weight_CK, initial_state_BCK, seq_idx_BT) -> tuple:
    init_s = (0, 0, 0) if initial_state_BCK is None else initial_state_BCK.stride()
    return (x_BTC.stride(0), x_BTC.stride(1), *weight_CK.stride(), *init_s, *_seq_strides(seq_idx_BT))


def _channels_unit_stride(t_BTC: Tensor) -> Tensor:
    return t_BTC if t_BTC.stride(2) == 1 else t_BTC.contiguous()


def conv1d_fwd(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
               initial_state_BCK: Tensor | None, silu: bool) -> Tensor:
    """The forward kernel's launch (the custom op's body; on CPU tensors under TRITON_INTERPRET=1)."""
    x = _channels_unit_stride(x_BTC)
    Bsz, T, C = x.shape
    y = torch.empty((Bsz, T, C), dtype=x.dtype, device=x.device)
    _conv_fwd_kernel[_grid(FWD_TILES, Bsz, T, C)](
        x, weight_CK, bias_C, initial_state_BCK, seq_idx_BT, y, T, C,
        *_ptr_strides(x, weight_CK, initial_state_BCK, seq_idx_BT), y.stride(0), y.stride(1),
        **_flags(bias_C, initial_state_BCK, seq_idx_BT, silu, weight_CK.shape[1]), **_tile_args(FWD_TILES))
    return y


def conv1d_bwd(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
               initial_state_BCK: Tensor | None, dy_BTC: Tensor, silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward kernels' launches and the sums of the partials: (dx, dweight, dbias,
    dinitial_state); dbias / dinitial_state are empty when there is no bias / initial state."""
    x, dy = _channels_unit_stride(x_BTC), _channels_unit_stride(dy_BTC)
    Bsz, T, C = x.shape
    K = weight_CK.shape[1]
    n_t = triton.cdiv(T, DPRE_TILES[0])
    dpre = torch.empty((Bsz, T, C), dtype=dy.dtype, device=x.device)
    dw_parts = torch.empty((Bsz * n_t, K, C), dtype=torch.float32, device=x.device)
    db_parts = torch.empty((Bsz * n_t, C) if bias_C is not None else (0,), dtype=torch.float32, device=x.device)
    dinit = torch.empty((Bsz, K - 1, C) if initial_state_BCK is not None else (0,), dtype=torch.float32,
                        device=x.device)
    flags = _flags(bias_C, initial_state_BCK, seq_idx_BT, silu, K)
    _conv_dpre_kernel[_grid(DPRE_TILES, Bsz, T, C)](
        x, weight_CK, bias_C, initial_state_BCK, seq_idx_BT, dy, dpre, dw_parts, db_parts, dinit, T, C, n_t,
        *_ptr_strides(x, weight_CK, initial_state_BCK, seq_idx_BT), dy.stride(0), dy.stride(1),
        **flags, **_tile_args(DPRE_TILES))
    dx = torch.empty((Bsz, T, C), dtype=x.dtype, device=x.device)
    _conv_dx_kernel[_grid(DX_TILES, Bsz, T, C)](
        dpre, weight_CK, seq_idx_BT, dx, T, C, *weight_CK.stride(), *_seq_strides(seq_idx_BT), dx.stride(0),
        dx.stride(1), K=K, HAS_SEQ=seq_idx_BT is not None, **_tile_args(DX_TILES))
    dbias = x.new_empty(0) if bias_C is None else db_parts.sum(0).to(bias_C.dtype)
    if initial_state_BCK is None:
        dinit = x.new_empty(0)
    else:  # [B, K-1, C] as the kernel writes it, to the state's [B, C, K-1]
        dinit = dinit.transpose(1, 2).to(initial_state_BCK.dtype).contiguous()
    return dx, dw_parts.sum(0).t().to(weight_CK.dtype).contiguous(), dbias, dinit


_conv_fwd = conv1d_custom_ops("conv1d_triton", conv1d_fwd, conv1d_bwd)


def causal_conv1d_triton_fn(
    x_BTC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor | None = None,
    initial_state_BCK: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Returns (y_BTC in x's dtype, final_state_BCK fp32), like `causal_conv1d_ref`."""
    if activation not in (None, "silu"):
        raise ValueError(f"unknown conv1d activation {activation!r}; use 'silu' or None")
    require_cuda("the triton conv1d backend runs GPU kernels", "kernels.conv1d=reference", x=x_BTC,
                 weight=weight_CK, bias=bias_C, initial_state=initial_state_BCK, seq_idx=seq_idx_BT)
    y = _conv_fwd(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, activation == "silu")
    return y, conv1d_final_state(x_BTC, weight_CK.shape[1], initial_state_BCK, seq_idx_BT)
