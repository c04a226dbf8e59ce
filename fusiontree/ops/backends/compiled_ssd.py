"""SSD backend `compile`: torch.compile of the chunked reference and of the decode step.

Legend: B batch, T time, H heads, P head dim, G groups, N state size.

The same math as `ssd_chunked_ref` / `ssd_step_ref` (and so the same results up to the
reordering of fp32 sums), fused by Inductor. Each function is compiled on first use, once per
input signature (initial state or not, seq_idx or not, dtypes); after a change of length the
length becomes dynamic, so a new T does not compile again. `fullgraph=True`: a graph break
would be an error rather than a silent slowdown.

Measured on torch 2.11 + Triton 3.6 (H100): the decode step and short scans compile and match
the reference, but Inductor's code generation fails on the split scan it makes of the chunk
cumsum for the backward from T = 1000 on (InductorError: "list indices must be integers or
slices, not NoneType"), also at the 32K benchmark shape. That is why `auto` never picks this
backend on CUDA.
"""

from __future__ import annotations

from torch import Tensor

from fusiontree.ops.backends.common import compile_once
from fusiontree.ops.ssd import ssd_chunked_ref, ssd_step_ref


def _fn(name: str):
    # one compiled entry per signature: initial state, seq_idx, dtypes, grad mode
    return compile_once({"chunked": ssd_chunked_ref, "step": ssd_step_ref}[name], fullgraph=True)


def ssd_chunked_compiled(
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
    return _fn("chunked")(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, chunk_size=chunk_size,
                          initial_state_BHPN=initial_state_BHPN, seq_idx_BT=seq_idx_BT)


def ssd_step_compiled(
    state_BHPN: Tensor,
    x_BHP: Tensor,
    dt_BH: Tensor,
    A_H: Tensor,
    B_BGN: Tensor,
    C_BGN: Tensor,
    D_H: Tensor | None = None,
) -> Tensor:
    """One decode step: updates `state_BHPN` (fp32) in place, returns y_BHP in x's dtype."""
    return _fn("step")(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H)
