"""conv1d backend `causal_conv1d`: the CUDA kernels of the causal-conv1d package under the
contract of `causal_conv1d_ref` (training and prefill; the decode step stays the reference).

Legend: B batch, T time, C channels, K kernel width (2 to 4).

The kernels run on the channels-last layout the Mamba mixer already has (the conv's input is a
slice of the input projection, channels contiguous): forward and backward are one kernel each,
with the SiLU, packed documents (`seq_idx`: a tap reaching into another document reads zero)
and an initial state inside. They are torch custom ops with their own backward
(`conv1d_custom_ops`), so a compiled block keeps them in its graph (no graph break) and CUDA
graphs capture them.
The final state is the last K-1 inputs (`conv1d_final_state`, plain PyTorch on a few rows,
differentiable).

The kernels need C divisible by 8 and strides (batch, time) that are multiples of 8 elements;
an input whose strides are not is copied to a contiguous tensor first (C % 8 != 0 is an error).
Both ops take their inputs in whatever layout a compiled graph holds them (`flexible_layout`).
Under a custom op's default, Inductor hands the op a copy whenever its strides differ from
eager's, and on CUDA it pads the rows of the input projection's output to 128 bytes (`small`:
6176 channels at a row stride of 6208), so the conv's slice of it was copied before the forward
and again before the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

import causal_conv1d_cuda  # noqa: F401  (the package's compiled extension; ImportError names it)
from fusiontree.ops.backends.common import check_conv_shape, conv1d_custom_ops, require_cuda
from fusiontree.ops.conv1d import conv1d_final_state


def _kernel_layout(t_BTC: Tensor) -> Tensor:
    """`t_BTC` as the kernels read it: channel stride 1, other strides and the start aligned to
    8 elements (vector loads of 16 bytes); copied to a contiguous tensor otherwise."""
    aligned = (t_BTC.stride(2) == 1 and t_BTC.stride(1) % 8 == 0 and t_BTC.stride(0) % 8 == 0
               and t_BTC.storage_offset() % 8 == 0)
    return t_BTC if aligned else t_BTC.contiguous()


def _contiguous(t: Tensor | None) -> Tensor | None:
    # the bias and the document ids, which the kernels read as contiguous (a compiled graph can
    # hand over ids whose rows it padded)
    return None if t is None else t.contiguous()


def _state_layout(state_BCK: Tensor | None) -> Tensor | None:
    # [B, C, K-1] with channel stride 1, as the kernels read and write states.
    return None if state_BCK is None else state_BCK.transpose(1, 2).contiguous().transpose(1, 2)


def _conv_fwd_kernel(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
                     initial_state_BCK: Tensor | None, silu: bool) -> Tensor:
    x = _kernel_layout(x_BTC)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    causal_conv1d_cuda.causal_conv1d_fwd(x.transpose(1, 2), weight_CK, _contiguous(bias_C), _contiguous(seq_idx_BT),
                                         _state_layout(initial_state_BCK), y.transpose(1, 2), None, silu)
    return y


def _conv_bwd_kernel(x_BTC: Tensor, weight_CK: Tensor, bias_C: Tensor | None, seq_idx_BT: Tensor | None,
                     initial_state_BCK: Tensor | None, dy_BTC: Tensor, silu: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, dy = _kernel_layout(x_BTC), _kernel_layout(dy_BTC)
    C = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dweight = torch.zeros(weight_CK.shape, dtype=torch.float32, device=x.device)  # accumulated atomically
    dbias = None if bias_C is None else torch.zeros(C, dtype=torch.float32, device=x.device)
    init = _state_layout(initial_state_BCK)
    dinit = None if init is None else torch.empty_like(init)
    causal_conv1d_cuda.causal_conv1d_bwd(x.transpose(1, 2), weight_CK, _contiguous(bias_C), dy.transpose(1, 2),
                                         _contiguous(seq_idx_BT), init, None, dx.transpose(1, 2), dweight, dbias,
                                         dinit, silu)
    # an absent bias and initial state give two empty tensors (a custom op's outputs must not alias)
    return (dx, dweight.to(weight_CK.dtype), x.new_empty(0) if dbias is None else dbias.to(bias_C.dtype),
            x.new_empty(0) if dinit is None else dinit.contiguous())


_conv_fwd = conv1d_custom_ops("causal_conv1d", _conv_fwd_kernel, _conv_bwd_kernel)


def causal_conv1d_cuda_fn(
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
    require_cuda("the causal_conv1d conv1d backend runs CUDA kernels", "kernels.conv1d=reference", x=x_BTC,
                 weight=weight_CK, bias=bias_C, initial_state=initial_state_BCK, seq_idx=seq_idx_BT)
    C, K = x_BTC.shape[-1], weight_CK.shape[1]
    check_conv_shape(C, K)
    if bias_C is not None and bias_C.dtype != weight_CK.dtype:
        bias_C = bias_C.to(weight_CK.dtype)
    init = None if initial_state_BCK is None else initial_state_BCK.to(x_BTC.dtype)
    # The kernels compare ids for equality, like the reference, but give negative ids' tokens a
    # zero output: shifted to start at 0 (no host sync). The ops make them contiguous.
    seq = None if seq_idx_BT is None else (seq_idx_BT - seq_idx_BT.amin()).to(torch.int32)
    y = _conv_fwd(x_BTC, weight_CK, bias_C, seq, init, activation == "silu")
    return y, conv1d_final_state(x_BTC, K, initial_state_BCK, seq_idx_BT)
