"""conv1d backend `triton`: the depthwise causal conv in two Triton kernels of our own, under
the contract of `causal_conv1d_ref` (training and prefill; the decode step stays the reference).

Legend: B batch, T time, C channels, K kernel width (1 to 4, padded on the left to 4 taps of
zero weight), BT / BC a program's block of times / channels.

Each program owns a [BT, BC] block of one row and reads shifted [BT, BC] tiles of the input
(the shifts hit in cache, so HBM sees each input about once):

- forward: y = act(bias + sum_k w[k] * x[t - 3 + k]), a tap counted only where it lies in the
  output's document (`seq_idx`); before t = 0 taps read the initial state (which belongs to the
  first document), or zero;
- backward, one kernel: dx at times s needs dz (the gradient at the pre-activation) at s .. s+3,
  which needs the inputs at s-3 .. s+3: seven shifted tiles, four pre-activations recomputed,
  dx summed from them. The outputs s also give this block's share of dweight and dbias (written
  per block, summed afterwards in a fixed order: deterministic). Nothing but x and dy is read,
  nothing but dx is written.

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

KP = 4  # taps, padded on the left with zero weights
BLOCK_T, BLOCK_C, WARPS = 32, 64, 4


@triton.jit
def _inputs(x_ptr, init_ptr, b, src, cols, T, C, sxb, sxt, sxc, sib, sic, sik,
            K: tl.constexpr, HAS_INIT: tl.constexpr):
    """Inputs at times `src` [BT] (negative: the initial state's K-1 columns, else zero; at or
    past T: zero), as fp32 [BT, BC]."""
    cm = (cols < C)[None, :]
    v = tl.load(x_ptr + b * sxb + src[:, None] * sxt + cols[None, :] * sxc,
                mask=((src >= 0) & (src < T))[:, None] & cm, other=0.0).to(tl.float32)
    if HAS_INIT:
        v += tl.load(init_ptr + b * sib + cols[None, :] * sic + (K - 1 + src)[:, None] * sik,
                     mask=((src < 0) & (src >= 1 - K))[:, None] & cm, other=0.0).to(tl.float32)
    return v


@triton.jit
def _doc(seq_ptr, b, src, T, ssb, sst, HAS_SEQ: tl.constexpr):
    """Document id at times `src`, clamped into [0, T): an initial state belongs to the first
    document. Without ids, one document."""
    if HAS_SEQ:
        return tl.load(seq_ptr + b * ssb + tl.minimum(tl.maximum(src, 0), T - 1) * sst)
    return tl.zeros_like(src)


@triton.jit
def _tap(w_ptr, cols, C, k: tl.constexpr, K: tl.constexpr):
    """Padded tap k of 4 (taps before 4 - K have weight zero), fp32 [1, BC]."""
    kw = k - (4 - K)
    return tl.load(w_ptr + cols * K + (kw if kw > 0 else 0), mask=(cols < C) & (kw >= 0), other=0.0).to(tl.float32)[None, :]


@triton.jit
def _same(a, b):
    return (a == b)[:, None]


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, T, C,
                     sxb, sxt, sxc, sib, sic, sik, ssb, sst, syb, syt, syc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    d = _doc(seq_ptr, b, t, T, ssb, sst, HAS_SEQ)
    z = _tap(w_ptr, cols, C, 3, K) * _inputs(x_ptr, init_ptr, b, t, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    for k in tl.static_range(3):
        src = t - 3 + k
        xk = _inputs(x_ptr, init_ptr, b, src, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
        z += _tap(w_ptr, cols, C, k, K) * tl.where(_same(_doc(seq_ptr, b, src, T, ssb, sst, HAS_SEQ), d), xk, 0.0)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + b * syb + t[:, None] * syt + cols[None, :] * syc, z.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & (cols < C)[None, :])


@triton.jit
def _dz(z, bias, dy_ptr, b, t, cols, T, C, sdb, sdt, sdc, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """The gradient at the pre-activation of outputs `t`, from dy and the recomputed z."""
    if HAS_BIAS:
        z += bias
    g = tl.load(dy_ptr + b * sdb + t[:, None] * sdt + cols[None, :] * sdc,
                mask=(t < T)[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dx_ptr, dwp_ptr, dbp_ptr, T, C,
                     sxb, sxt, sxc, sib, sic, sik, ssb, sst, sdb, sdt, sdc, sgb, sgt, sgc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx at times s of this block needs dz at s .. s+3, which needs the inputs at s-3 .. s+3:
    seven shifted loads (X0..X6 below, Xm at s - 3 + m), four pre-activations recomputed."""
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    cm = cols < C
    w0, w1 = _tap(w_ptr, cols, C, 0, K), _tap(w_ptr, cols, C, 1, K)
    w2, w3 = _tap(w_ptr, cols, C, 2, K), _tap(w_ptr, cols, C, 3, K)
    bias = tl.zeros((1, BC), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    X0 = _inputs(x_ptr, init_ptr, b, s - 3, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    X1 = _inputs(x_ptr, init_ptr, b, s - 2, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    X2 = _inputs(x_ptr, init_ptr, b, s - 1, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    X3 = _inputs(x_ptr, init_ptr, b, s, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    X4 = _inputs(x_ptr, init_ptr, b, s + 1, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    X5 = _inputs(x_ptr, init_ptr, b, s + 2, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    X6 = _inputs(x_ptr, init_ptr, b, s + 3, cols, T, C, sxb, sxt, sxc, sib, sic, sik, K, HAS_INIT)
    S0 = _doc(seq_ptr, b, s - 3, T, ssb, sst, HAS_SEQ)
    S1 = _doc(seq_ptr, b, s - 2, T, ssb, sst, HAS_SEQ)
    S2 = _doc(seq_ptr, b, s - 1, T, ssb, sst, HAS_SEQ)
    S3 = _doc(seq_ptr, b, s, T, ssb, sst, HAS_SEQ)
    S4 = _doc(seq_ptr, b, s + 1, T, ssb, sst, HAS_SEQ)
    S5 = _doc(seq_ptr, b, s + 2, T, ssb, sst, HAS_SEQ)
    S6 = _doc(seq_ptr, b, s + 3, T, ssb, sst, HAS_SEQ)
    # Tap k of output s + j reads X(j + k), counted where it lies in the output's document.
    m00, m01, m02 = _same(S0, S3), _same(S1, S3), _same(S2, S3)
    dz0 = _dz(w0 * tl.where(m00, X0, 0.0) + w1 * tl.where(m01, X1, 0.0) + w2 * tl.where(m02, X2, 0.0) + w3 * X3,
              bias, dy_ptr, b, s, cols, T, C, sdb, sdt, sdc, HAS_BIAS, SILU)
    dz1 = _dz(w0 * tl.where(_same(S1, S4), X1, 0.0) + w1 * tl.where(_same(S2, S4), X2, 0.0)
              + w2 * tl.where(_same(S3, S4), X3, 0.0) + w3 * X4, bias, dy_ptr, b, s + 1, cols, T, C,
              sdb, sdt, sdc, HAS_BIAS, SILU)
    dz2 = _dz(w0 * tl.where(_same(S2, S5), X2, 0.0) + w1 * tl.where(_same(S3, S5), X3, 0.0)
              + w2 * tl.where(_same(S4, S5), X4, 0.0) + w3 * X5, bias, dy_ptr, b, s + 2, cols, T, C,
              sdb, sdt, sdc, HAS_BIAS, SILU)
    dz3 = _dz(w0 * tl.where(_same(S3, S6), X3, 0.0) + w1 * tl.where(_same(S4, S6), X4, 0.0)
              + w2 * tl.where(_same(S5, S6), X5, 0.0) + w3 * X6, bias, dy_ptr, b, s + 3, cols, T, C,
              sdb, sdt, sdc, HAS_BIAS, SILU)
    # Tap 3 - j of output s + j reads s: counted where s + j lies in s's document.
    dx = w3 * dz0 + w2 * tl.where(_same(S4, S3), dz1, 0.0) + w1 * tl.where(_same(S5, S3), dz2, 0.0) \
        + w0 * tl.where(_same(S6, S3), dz3, 0.0)
    live = (s < T)[:, None] & cm[None, :]
    tl.store(dx_ptr + b * sgb + s[:, None] * sgt + cols[None, :] * sgc, dx.to(dx_ptr.dtype.element_ty), mask=live)
    # This block's share of dweight (padded taps) and dbias: outputs s, i.e. dz0.
    blk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    base = dwp_ptr + blk * 4 * C + cols
    tl.store(base, tl.sum(tl.where(m00, X0, 0.0) * dz0, axis=0), mask=cm)
    tl.store(base + C, tl.sum(tl.where(m01, X1, 0.0) * dz0, axis=0), mask=cm)
    tl.store(base + 2 * C, tl.sum(tl.where(m02, X2, 0.0) * dz0, axis=0), mask=cm)
    tl.store(base + 3 * C, tl.sum(X3 * dz0, axis=0), mask=cm)
    if HAS_BIAS:
        tl.store(dbp_ptr + blk * C + cols, tl.sum(dz0, axis=0), mask=cm)


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
        K=w.shape[1], HAS_BIAS=bias_C is not None, HAS_INIT=initial_state_BCK is not None,
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
    dw_parts = torch.empty(blocks, KP, C, dtype=torch.float32, device=x_BTC.device)  # every entry written
    db_parts = torch.empty(blocks if bias_C is not None else 0, C, dtype=torch.float32, device=x_BTC.device)
    _conv_bwd_kernel[grid](
        x_BTC, w, bias_C, initial_state_BCK, seq_idx_BT, dy_BTC, dx, dw_parts, db_parts, T, C,
        *x_BTC.stride(), *_state_strides(initial_state_BCK), *_seq_strides(seq_idx_BT), *dy_BTC.stride(),
        *dx.stride(), K=w.shape[1], HAS_BIAS=bias_C is not None, HAS_INIT=initial_state_BCK is not None,
        HAS_SEQ=seq_idx_BT is not None, SILU=silu, BT=BLOCK_T, BC=BLOCK_C, num_warps=WARPS)
    dweight = dw_parts.sum(0)[KP - w.shape[1]:].t().contiguous().to(weight_CK.dtype)  # the op's strides
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
