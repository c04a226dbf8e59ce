"""SSD backend `mamba_ssm`: mamba-ssm's Triton kernels under the contract of `ssd_chunked_ref`
and `ssd_step_ref`.

Legend: B batch, T time, H heads, P head dim, G groups, N state size.

- `mamba_chunk_scan_combined` (training, prefill, chunked prefill): initial state, packed
  documents (seq_idx, relabelled by `canonical_seq_idx` so that mamba-ssm's id comparison
  matches the reference's change-of-id rule), final state, and mamba-ssm's own backward for
  x, dt, A, B, C, D and the initial state. Internally it rounds the states passed between
  chunks, and the initial state's gradient, to x's dtype; the final state stays fp32.
- `selective_state_update` (decode): updates the fp32 state in place; it has no backward.

Backend `mamba_ssm_saved` (`ssd_chunked_mamba_saved`) runs the same Triton kernels under the
same contract, ordered by our own forward and backward:

- The forward keeps what its backward needs: the per-chunk cumulative decays and the processed
  dt (fp32), the states entering each chunk (x's dtype, as the forward's output used them) and
  the chunks' C·Bᵀ products (x's dtype; mamba-ssm's are fp32). mamba-ssm's own backward
  recomputes all four (four kernel launches and a copy of dt); here the backward starts from
  them. Memory: per layer C·Bᵀ is B·(T/chunk)·G·chunk² values (a `small` layer at 8 x 4096:
  134 MB in bf16), plus the states at half of x's size; the output, which mamba-ssm keeps, is
  not kept.
- In the backward, mamba-ssm's per-group gradient buffers carry a "split" dimension that is
  summed away; at training sizes it has one entry, and the sum is a full fp32 copy (three per
  layer: dB, dC, d(C·Bᵀ)). `unit_sums_as_views` returns the view without that dimension: the
  same values, no copy.
- `ssd_chunked_mamba_saved_xbc` takes x, B and C packed in one tensor, as the mixer's conv
  leaves them, and the kernels write their three gradients into one buffer of that shape: the
  concatenation that would otherwise join them before the conv's backward is not needed.
- The numbers differ from mamba-ssm's in two places: C·Bᵀ is rounded to x's dtype (the scan
  kernels scale it in fp32 and round the product to x's dtype before their matmuls either way),
  and the decay gradient at chunk ends reads the kept states in x's dtype, where mamba-ssm's
  recomputes them in fp32.

The conv1d of the Mamba mixer is an op of its own (`kernels.conv1d`: causal-conv1d's kernels or
the PyTorch reference), whichever SSD backend runs.
"""

from __future__ import annotations

import torch
from mamba_ssm.ops.triton.selective_state_update import selective_state_update
from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd, _bmm_chunk_fwd
from mamba_ssm.ops.triton.ssd_chunk_scan import (_chunk_scan_bwd_dC, _chunk_scan_bwd_dcb, _chunk_scan_bwd_ddAcs_stable,
                                                 _chunk_scan_bwd_dstates, _chunk_scan_fwd)
from mamba_ssm.ops.triton.ssd_chunk_state import (_chunk_cumsum_bwd, _chunk_cumsum_fwd, _chunk_state_bwd_db,
                                                  _chunk_state_fwd)
from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx, mamba_chunk_scan_combined
from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd
from torch import Tensor

from fusiontree.ops.backends.common import (canonical_seq_idx, require_cuda, run_before_first_kernel_call,
                                           unit_sums_as_views)
from fusiontree.ops.ssd import split_xbc


def _require_cuda(**tensors: Tensor | None) -> None:
    require_cuda("the mamba_ssm SSD backend runs Triton GPU kernels", "kernels.ssd=reference", **tensors)


def _check_inputs(x, dt, A, B, C, D, initial_state, seq_idx) -> Tensor | None:
    _require_cuda(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state, seq_idx=seq_idx)
    run_before_first_kernel_call()  # a process autotuning these kernels ahead: its choices first
    return None if seq_idx is None else canonical_seq_idx(seq_idx)


# Opaque to an enclosing torch.compile (a model compiled block by block): the Triton kernels
# run as they are, the compiled graphs end and resume around them.
@torch.compiler.disable
def ssd_chunked_mamba(
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
    """Returns (y_BTHP in x's dtype, final_state_BHPN fp32), like `ssd_chunked_ref`."""
    seq = _check_inputs(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, initial_state_BHPN, seq_idx_BT)
    y_BTHP, final_BHPN = mamba_chunk_scan_combined(
        x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size, D=D_H,
        initial_states=initial_state_BHPN, seq_idx=seq, return_final_states=True)
    return y_BTHP, final_BHPN


def _kernel_layout(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SSDSavedFn(torch.autograd.Function):
    """Inputs x, B, C as three tensors, or packed: `xBC` in `x` and None for B and C (the
    gradient then comes back as one tensor of xBC's shape, written by the kernels in place)."""

    @staticmethod
    def forward(ctx, x, B, C, dt, A, D, chunk_size, head_dim, groups, initial_state, seq_idx):
        ctx.packed = B is None
        if ctx.packed:
            x, B, C = split_xbc(x, dt.shape[-1], head_dim, groups)
        x, B, C = _kernel_layout(x), _kernel_layout(B), _kernel_layout(C)
        dA_cs, dt_c = _chunk_cumsum_fwd(dt, A, chunk_size)  # [B, H, chunks, chunk] fp32 each
        chunk_states = _chunk_state_fwd(B, x, dt_c, dA_cs, seq_idx=seq_idx, states_in_fp32=True)
        Bsz, H, P, N = x.shape[0], x.shape[2], x.shape[3], B.shape[3]
        init = None if initial_state is None else initial_state.reshape(Bsz, H, P * N)
        # states[:, c]: the state entering chunk c, in x's dtype; final: after the last chunk, fp32
        states, final = _state_passing_fwd(chunk_states.flatten(-2), dA_cs[:, :, :, -1], initial_states=init,
                                           seq_idx=seq_idx, chunk_size=chunk_size, out_dtype=C.dtype)
        # C·Bᵀ in the inputs' dtype (mamba-ssm's own autograd keeps it in fp32): the scan kernels
        # scale it by the decay and dt in fp32 and round it to that dtype before their matmuls
        # anyway; the bf16 copy halves what the forward writes and three kernels read (each head
        # of a group re-reads it), and what is kept for the backward.
        CB = _bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=C.dtype)
        y, _ = _chunk_scan_fwd(CB, x, dt_c, dA_cs, C, states.unflatten(-1, (P, N)), D=D, seq_idx=seq_idx)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, seq_idx, dt_c, dA_cs, states, CB)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None: no zeros read
        return y, final.unflatten(-1, (P, N))

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, seq_idx, dt_c, dA_cs, states, CB = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else _kernel_layout(dy)
        G, N = B.shape[2], B.shape[3]
        if ctx.packed:  # one gradient buffer, the kernels writing its three parts
            dxBC = x.new_empty(*x.shape[:2], x.shape[2] * x.shape[3] + 2 * G * N)
            dx, dB, dC = split_xbc(dxBC, x.shape[2], x.shape[3], G)
        else:
            dx, dB, dC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
        with unit_sums_as_views():
            # gradient of the state entering each chunk, from the outputs of that chunk alone
            dstates = _chunk_scan_bwd_dstates(C, dA_cs, dy, seq_idx=seq_idx, dtype=torch.float32)
            # ... carried back through the chunks (and to the initial state); the decay gradient
            # at each chunk's end
            dstates, ddA_ends, dinit, states = _state_passing_bwd(
                states, dA_cs[:, :, :, -1], dstates.flatten(-2),
                dfinal_states=None if dfinal is None else dfinal.flatten(-2), seq_idx=seq_idx,
                has_initial_states=initial_state is not None, dstates_dtype=x.dtype, states_dtype=x.dtype,
                chunk_size=ctx.chunk_size)
            dstates, states = dstates.unflatten(-1, (-1, N)), states.unflatten(-1, (-1, N))
            _, ddt_c, dD = _chunk_scan_chunk_state_bwd_dx(x, dt_c, dA_cs, B, CB, dy, dstates, D=D, seq_idx=seq_idx,
                                                          dx=dx)
            dB_states, ddA_from_B = _chunk_state_bwd_db(x, dt_c, dA_cs, dstates, seq_idx=seq_idx, B=B, ngroups=G)
            dC_states, ddA_from_C = _chunk_scan_bwd_dC(states, dA_cs, dy, seq_idx=seq_idx, C=C, ngroups=G)
            dCB = _chunk_scan_bwd_dcb(x, dt_c, dA_cs, dy, seq_idx=seq_idx, ngroups=G)
            _bmm_chunk_bwd(C, dCB, residual=dB_states, out=dB)
            _bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_states, out=dC)
            # d(cumulative decay): the C-side terms summed from the chunk's end backwards, the
            # B-side and in-chunk terms as they are
            ddA_from_C[..., -1] += ddA_ends
            ddA = ddA_from_C.flip(-1).cumsum(-1).flip(-1)
            ddA += _chunk_scan_bwd_ddAcs_stable(x, dt_c, dA_cs, dy, CB)
            ddA += ddA_from_B
            ddt, dA, _ = _chunk_cumsum_bwd(ddA, ddt_c, dt, A, ddt=torch.empty_like(dt))
        dinit = None if dinit is None else dinit.unflatten(-1, (-1, N))
        grads_xbc = (dxBC, None, None) if ctx.packed else (dx, dB, dC)
        return *grads_xbc, ddt, dA, dD, None, None, None, dinit, None


@torch.compiler.disable
def ssd_chunked_mamba_saved(
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
    """`ssd_chunked_mamba` with the backward starting from what the forward kept (module
    docstring). Returns (y_BTHP in x's dtype, final_state_BHPN fp32)."""
    seq = _check_inputs(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, initial_state_BHPN, seq_idx_BT)
    return _SSDSavedFn.apply(x_BTHP, B_BTGN, C_BTGN, dt_BTH, A_H, D_H, chunk_size, None, None,
                             initial_state_BHPN, seq)


@torch.compiler.disable
def ssd_chunked_mamba_saved_xbc(
    xBC_BTW: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    D_H: Tensor | None,
    *,
    head_dim: int,
    groups: int,
    chunk_size: int,
    initial_state_BHPN: Tensor | None = None,
    seq_idx_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`ssd_chunked_mamba_saved` on x, B and C packed in one tensor (`split_xbc`); the gradient
    of `xBC_BTW` comes back as one tensor, with no concatenation of three."""
    seq = _check_inputs(xBC_BTW, dt_BTH, A_H, None, None, D_H, initial_state_BHPN, seq_idx_BT)
    return _SSDSavedFn.apply(xBC_BTW, None, None, dt_BTH, A_H, D_H, chunk_size, head_dim, groups,
                             initial_state_BHPN, seq)


_zero_bias: dict[tuple, Tensor] = {}


def _zeros_H(H: int, device: torch.device) -> Tensor:
    key = (H, device)
    if key not in _zero_bias:
        _zero_bias[key] = torch.zeros(H, dtype=torch.float32, device=device)
    return _zero_bias[key]


def ssd_step_mamba(
    state_BHPN: Tensor,
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
    D_H: Tensor | None = None,
) -> Tensor:
    """One decode step: updates `state_BHPN` (fp32) in place, returns y_BHP in x's dtype.

    The kernel is a custom op that mutates the state, so a compiled decode step holds it inside
    its graph: the block stays one graph and Inductor fuses the work on both sides of it."""
    _require_cuda(state=state_BHPN, x=x_BHP, dt=dt_BH, A=A_H, B=B_BGN, C=C_BGN, D=D_H)
    if state_BHPN.dtype != torch.float32:
        raise ValueError(f"the SSM decode state must be fp32, got {state_BHPN.dtype}; allocate it "
                         "with Mamba2Mixer.allocate_inference_cache")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H)):
        raise ValueError("mamba-ssm's selective_state_update has no backward; decode under "
                         "torch.no_grad() (or use kernels.ssd=reference to differentiate a decode step)")
    return _ssd_step_op(state_BHPN, x_BHP, dt_BH, A_H.float(), B_BGN, C_BGN, D_H)


@torch.library.custom_op("fusiontree::ssd_step_mamba", mutates_args=("state_BHPN",), device_types="cuda")
def _ssd_step_op(state_BHPN: Tensor, x_BHP: Tensor, dt_BH: Tensor, A_H: Tensor, B_BGN: Tensor, C_BGN: Tensor,
                 D_H: Tensor | None) -> Tensor:
    Bsz, H, P, N = state_BHPN.shape
    # Stride-0 views of the per-head A, dt and bias: mamba-ssm then takes its tied-head-dim
    # path (one exp per head instead of one per state entry). Its check reads the bias's
    # strides, so a zero bias is passed rather than None.
    A = A_H[:, None, None].expand(H, P, N)
    dt = dt_BH[..., None].expand(Bsz, H, P)
    dt_bias = _zeros_H(H, state_BHPN.device)[:, None].expand(H, P)
    D = None if D_H is None else D_H[:, None].expand(H, P)
    return selective_state_update(state_BHPN, x_BHP, dt, A, B_BGN, C_BGN, D=D, dt_bias=dt_bias,
                                  dt_softplus=False)


@_ssd_step_op.register_fake
def _(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H):
    return torch.empty_like(x_BHP)
