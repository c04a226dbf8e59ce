"""conv1d backend `triton`: the depthwise causal conv in two Triton kernels of our own, under
the contract of `causal_conv1d_ref` (training and prefill; the decode step stays the reference).

Legend: B batch, T time, C channels, K kernel width (2 to 4), KP = 4 (taps padded), BT / BC a
program's block of times / channels.

Each program owns a [BT, BC] block of one row and reads its taps as one [BT, KP, BC] tile
(shifted rows of the same input, so HBM sees each input about once):

- forward: y = act(bias + sum_k w[k] * x[t - (K-1) + k]), taps masked where they reach into
  another document (`seq_idx`) or before t = 0 (then the initial state, which belongs to the
  first document);
- backward, one kernel: for each shift j = 0..K-1 it recomputes the pre-activation at times
  t + j, turns dy there into dz, and adds w[K-1-j] * dz to dx at t. The shift j = 0 also
  gives this block's share of dweight and dbias (written per block, summed afterwards in a
  fixed order: deterministic). Nothing but x and dy is read, nothing but dx is written.

The initial state's gradient comes from the first K-1 outputs alone (the only ones that read
it), through the reference on those few rows.

Inputs with any strides are read in place (no copies). Registered as torch custom ops with
their own backward, so compiled blocks keep them in the graph and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusiontree.ops.backends.common import check_conv_shape, require_cuda
from fusiontree.ops.conv1d import causal_conv1d_ref, conv1d_final_state

KP = 4  # taps, padded
BLOCK_T, BLOCK_C, WARPS = 32, 64, 4


@triton.jit
def _taps(x_ptr, init_ptr, seq_ptr, b, t, cols, T, C,
          sxb, sxt, sxc, sib, sic, sik, ssb, sst,
          K: tl.constexpr, KPAD: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The K inputs output times `t` [BT] read, as [BT, KPAD, BC] (zero where masked)."""
    kk = tl.arange(0, KPAD)
    src = t[:, None] - (K - 1) + kk[None, :]  # [BT, KPAD]
    live = (t < T)[:, None] & (kk < K)[None, :]
    inside = live & (src >= 0)
    before = live & (src < 0)
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + b * ssb + t * sst, mask=t < T, other=0)
        seq_src = tl.load(seq_ptr + b * ssb + src * sst, mask=inside, other=0)
        inside = inside & (seq_src == seq_t[:, None])
        seq_0 = tl.load(seq_ptr + b * ssb)
        before = before & (seq_t == seq_0)[:, None]
    cmask = (cols < C)[None, None, :]
    ptr = x_ptr + b * sxb + src[:, :, None] * sxt + cols[None, None, :] * sxc
    v = tl.load(ptr, mask=inside[:, :, None] & cmask, other=0.0).to(tl.float32)
    if HAS_INIT:
        iptr = init_ptr + b * sib + cols[None, None, :] * sic + (K - 1 + src)[:, :, None] * sik
        v += tl.load(iptr, mask=before[:, :, None] & cmask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, T, C,
                     sxb, sxt, sxc, sib, sic, sik, ssb, sst, syb, syt, syc,
                     K: tl.constexpr, KPAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    kk = tl.arange(0, KPAD)
    w = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=(kk < K)[:, None] & (cols < C)[None, :],
                other=0.0).to(tl.float32)  # [KPAD, BC]
    xt = _taps(x_ptr, init_ptr, seq_ptr, b, t, cols, T, C, sxb, sxt, sxc, sib, sic, sik, ssb, sst,
               K, KPAD, HAS_INIT, HAS_SEQ)
    z = tl.sum(xt * w[None, :, :], axis=1)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + b * syb + t[:, None] * syt + cols[None, :] * syc, z.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & (cols < C)[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dx_ptr, dwp_ptr, dbp_ptr, T, C,
                     sxb, sxt, sxc, sib, sic, sik, ssb, sst, sdb, sdt, sdc, sgb, sgt, sgc,
                     K: tl.constexpr, KPAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BT + tl.arange(0, BT)  # the times whose dx this program writes
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    cmask = cols < C
    kk = tl.arange(0, KPAD)
    w = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=(kk < K)[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)  # [KPAD, BC]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * ssb + s * sst, mask=s < T, other=0)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        t = s + j  # outputs whose tap K-1-j reads time s
        xt = _taps(x_ptr, init_ptr, seq_ptr, b, t, cols, T, C, sxb, sxt, sxc, sib, sic, sik, ssb, sst,
                   K, KPAD, HAS_INIT, HAS_SEQ)
        z = tl.sum(xt * w[None, :, :], axis=1)
        if HAS_BIAS:
            z += bias[None, :]
        live = (t < T)[:, None] & cmask[None, :]
        dz = tl.load(dy_ptr + b * sdb + t[:, None] * sdt + cols[None, :] * sdc, mask=live, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        if j == 0:  # t = s: this block's share of dweight [KPAD, BC] and dbias [BC]
            blk = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * KPAD * C
            tl.store(dwp_ptr + blk + kk[:, None] * C + cols[None, :], tl.sum(xt * dz[:, None, :], axis=0),
                     mask=(kk < K)[:, None] & cmask[None, :])
            if HAS_BIAS:
                tl.store(dbp_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * C + cols,
                         tl.sum(dz, axis=0), mask=cmask)
        reads = live
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b * ssb + t * sst, mask=t < T, other=0)
            reads = reads & (seq_t == seq_s)[:, None]
        w_tap = tl.sum(tl.where((kk == K - 1 - j)[:, None], w, 0.0), axis=0)  # w[K-1-j], [BC]
        dx += tl.where(reads, dz * w_tap[None, :], 0.0)
    tl.store(dx_ptr + b * sgb + s[:, None] * sgt + cols[None, :] * sgc, dx.to(dx_ptr.dtype.element_ty),
             mask=(s < T)[:, None] & cmask[None, :])


def _grid(x: Tensor) -> tuple[int, int, int]:
    B, T, C = x.shape
    return triton.cdiv(T, BLOCK_T), B, triton.cdiv(C, BLOCK_C)


def _state_strides(init: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if init is None else init.stride()


def _seq_strides(seq: Tensor | None) -> tuple[int, int]:
    return (0, 0) if seq is None else seq.stride()


def launch_fwd(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
               initial_state_BCK: Tensor | None, silu: bool) -> Tensor:
    """The forward kernel on any device Triton runs on (the custom op's body)."""
    y = torch.empty(x_BTC.shape, dtype=x_BTC.dtype, device=x_BTC.device)
    w = weight_CK.contiguous()
    _conv_fwd_kernel[_grid(x_BTC)](
        x_BTC, w, bias_C, initial_state_BCK, seq_idx_BT, y, x_BTC.shape[1], x_BTC.shape[2],
        *x_BTC.stride(), *_state_strides(initial_state_BCK), *_seq_strides(seq_idx_BT), *y.stride(),
        K=w.shape[1], KPAD=KP, HAS_BIAS=bias_C is not None, HAS_INIT=initial_state_BCK is not None,
        HAS_SEQ=seq_idx_BT is not None, SILU=silu, BT=BLOCK_T, BC=BLOCK_C, num_warps=WARPS)
    return y


@torch.library.custom_op("fusiontree::triton_conv1d_fwd", mutates_args=(), device_types="cuda")
def _conv_fwd(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
              initial_state_BCK: Tensor | None, silu: bool) -> Tensor:
    return launch_fwd(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, silu)


@_conv_fwd.register_fake
def _(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, silu):
    return x_BTC.new_empty(x_BTC.shape)


def launch_bwd(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
               initial_state_BCK: Tensor | None, dy_BTC: Tensor, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel (the custom op's body): (dx, dweight, dbias); dbias is an empty tensor
    when there is no bias."""
    B, T, C = x_BTC.shape
    w = weight_CK.contiguous()
    grid = _grid(x_BTC)
    blocks = grid[0] * grid[1]
    dx = torch.empty(x_BTC.shape, dtype=x_BTC.dtype, device=x_BTC.device)
    dw_parts = torch.zeros(blocks, KP, C, dtype=torch.float32, device=x_BTC.device)
    db_parts = torch.empty(blocks if bias_C is not None else 0, C, dtype=torch.float32, device=x_BTC.device)
    _conv_bwd_kernel[grid](
        x_BTC, w, bias_C, initial_state_BCK, seq_idx_BT, dy_BTC, dx, dw_parts, db_parts, T, C,
        *x_BTC.stride(), *_state_strides(initial_state_BCK), *_seq_strides(seq_idx_BT), *dy_BTC.stride(),
        *dx.stride(), K=w.shape[1], KPAD=KP, HAS_BIAS=bias_C is not None, HAS_INIT=initial_state_BCK is not None,
        HAS_SEQ=seq_idx_BT is not None, SILU=silu, BT=BLOCK_T, BC=BLOCK_C, num_warps=WARPS)
    dweight = dw_parts.sum(0)[: w.shape[1]].t().to(weight_CK.dtype)
    dbias = x_BTC.new_empty(0) if bias_C is None else db_parts.sum(0).to(bias_C.dtype)
    return dx, dweight, dbias


@torch.library.custom_op("fusiontree::triton_conv1d_bwd", mutates_args=(), device_types="cuda")
def _conv_bwd(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
              initial_state_BCK: Tensor | None, dy_BTC: Tensor, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return launch_bwd(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, dy_BTC, silu)


@_conv_bwd.register_fake
def _(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, dy_BTC, silu):
    return (x_BTC.new_empty(x_BTC.shape), weight_CK.new_empty(weight_CK.shape),
            x_BTC.new_empty(0) if bias_C is None else bias_C.new_empty(bias_C.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, init, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, init)
    ctx.silu = silu
    ctx.has_bias = bias is not None


def _initial_state_grad(x, weight, bias, seq_idx, init, dy, silu: bool) -> Tensor:
    """d(loss)/d(initial state): only the first K-1 outputs read it; the reference on them."""
    K = weight.shape[1]
    n = min(K - 1, x.shape[1])
    with torch.enable_grad():
        state = init.detach().requires_grad_(True)
        y, _ = causal_conv1d_ref(x[:, :n].detach(), weight.detach(), None if bias is None else bias.detach(), state,
                                 None if seq_idx is None else seq_idx[:, :n], "silu" if silu else None)
        (grad,) = torch.autograd.grad(y, state, dy[:, :n].to(y.dtype))
    return grad


def _backward(ctx, dy):
    x, weight, bias, seq_idx, init = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fusiontree.triton_conv1d_bwd(x, weight, bias, seq_idx, init, dy, ctx.silu)
    dinit = None
    if init is not None and ctx.needs_input_grad[4]:
        dinit = _initial_state_grad(x, weight, bias, seq_idx, init, dy, ctx.silu)
    return dx, dweight, dbias if ctx.has_bias else None, None, dinit, None


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    require_cuda("the triton conv1d backend runs Triton kernels", "kernels.conv1d=reference", x=x_BTC,
                 weight=weight_CK, bias=bias_C, initial_state=initial_state_BCK, seq_idx=seq_idx_BT)
    K = weight_CK.shape[1]
    check_conv_shape("triton", x_BTC.shape[-1], K)
    seq = None if seq_idx_BT is None else seq_idx_BT.to(torch.int32)
    y = _conv_fwd(x_BTC, weight_CK, bias_C, seq, initial_state_BCK, activation == "silu")
    return y, conv1d_final_state(x_BTC, K, initial_state_BCK, seq_idx_BT)
