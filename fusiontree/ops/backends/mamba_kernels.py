"""SSD backend `mamba_ssm`: mamba-ssm's Triton kernels under the contract of `ssd_chunked_ref`
and `ssd_step_ref`.

Legend: B batch, T time, H heads, P head dim, G groups, N state size.

- `mamba_chunk_scan_combined` (training, prefill, chunked prefill): initial state, packed
  documents (seq_idx, relabelled by `canonical_seq_idx` so that mamba-ssm's id comparison
  matches the reference's change-of-id rule), final state, and mamba-ssm's own backward for
  x, dt, A, B, C, D and the initial state. Internally it rounds the states passed between
  chunks, and the initial state's gradient, to x's dtype; the final state stays fp32.
- `selective_state_update` (decode): updates the fp32 state in place; it has no backward.

The conv1d of the Mamba mixer is an op of its own (`kernels.conv1d`: causal-conv1d's kernels or
the PyTorch reference), whichever SSD backend runs.
"""

from __future__ import annotations

import torch
from mamba_ssm.ops.triton.selective_state_update import selective_state_update
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
from torch import Tensor

from fusiontree.ops.backends.common import canonical_seq_idx, require_cuda, run_before_first_kernel_call


def _require_cuda(**tensors: Tensor | None) -> None:
    require_cuda("the mamba_ssm SSD backend runs Triton GPU kernels", "kernels.ssd=reference", **tensors)


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
    _require_cuda(x=x_BTHP, dt=dt_BTH, A=A_H, B=B_BTGN, C=C_BTGN, D=D_H,
                  initial_state=initial_state_BHPN, seq_idx=seq_idx_BT)
    run_before_first_kernel_call()  # a process autotuning these kernels ahead: its choices first
    seq = None if seq_idx_BT is None else canonical_seq_idx(seq_idx_BT)
    y_BTHP, final_BHPN = mamba_chunk_scan_combined(
        x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk_size, D=D_H,
        initial_states=initial_state_BHPN, seq_idx=seq, return_final_states=True)
    return y_BTHP, final_BHPN


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
