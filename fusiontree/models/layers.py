"""Small building blocks: RMSNorm, gated RMSNorm, SwiGLU MLP, and parameter tags.

Legend: B batch, T time, D model width, F MLP hidden width.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def no_weight_decay(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter that the optimizer must not decay (norm gains, biases, A_log, D, dt_bias)."""
    p._no_weight_decay = True
    return p


def keep_fp32(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter that stays fp32 when the model is cast to bf16 (see `cast_model`)."""
    p._keep_fp32 = True
    return p


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters to `dtype`, leaving those tagged `keep_fp32` in fp32."""
    for p in model.parameters():
        if p.is_floating_point() and not getattr(p, "_keep_fp32", False):
            p.data = p.data.to(dtype)
    return model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of `group_size` channels (one group per SSM group,
    so that sharding the Mamba heads by group keeps the norm local)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        assert dim % group_size == 0
        self.group_size, self.eps = group_size, eps
        self.weight = no_weight_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = y.float() * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], -1, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.view(shape) * self.weight.float()).to(y.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class PackedProjections(nn.Module):
    """A module whose bias-free linears `packable` read the same input. `pack_projections(True)`
    moves their weights into one buffer (each weight becomes a view of its rows, so the
    parameters, the state dict and in-place loads are unchanged) and `project` then runs one
    matmul over it instead of one per linear: at decode, one token's projections are each too
    small to fill the GPU, and every launch costs about as much as the weights take to read.
    Only without gradients (the weights' own gradients need the separate matmuls); moving or
    casting the module, or re-pointing a weight elsewhere, drops the packing. Weights that are
    views into storage shared with other tensors (an optimizer's flat buffer, say: DeepSpeed's
    ZeRO keeps its bf16 parameters so) are not packed, since packing would cut them loose from it."""

    packable: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.packed_weight: Tensor | None = None

    def _linears(self) -> list[nn.Linear]:
        return [getattr(self, name) for name in self.packable]

    def pack_projections(self, on: bool = True) -> bool:
        """Pack (or, on=False, unpack) the weights; returns whether they are packed."""
        lins = self._linears()
        if not on or any(type(lin) is not nn.Linear or lin.bias is not None for lin in lins):
            self.packed_weight = None
            return False
        if self.packed_weight is not None and self._intact(self.packed_weight):
            return True
        self.packed_weight = self._buffer_in_place()  # packed before (and unpacked since): reuse it
        if self.packed_weight is not None:
            return True
        if not all(_owns_storage(lin.weight) for lin in lins):
            logging.getLogger(__name__).warning(
                "%s: its weights are views into storage shared with other tensors (an optimizer's flat "
                "buffer, say); projecting them one by one, since packing would cut them loose from it",
                type(self).__name__)
            return False
        packed = torch.cat([lin.weight.detach() for lin in lins], 0)
        start = 0
        for lin in lins:
            rows = lin.weight.shape[0]
            lin.weight.data = packed[start:start + rows]
            start += rows
        self.packed_weight = packed
        return True

    def _buffer_in_place(self) -> Tensor | None:
        """The weights as one [rows, in] tensor when they already lie in order, back to back,
        in a storage of their own (a packing undone by pack_projections(False)); else None."""
        lins = self._linears()
        w0 = lins[0].weight
        rows = sum(lin.weight.shape[0] for lin in lins)
        if w0.storage_offset() != 0 or w0.untyped_storage().nbytes() != rows * w0.shape[1] * w0.element_size():
            return None
        packed = w0.detach().new_empty(0).set_(w0.untyped_storage(), 0, (rows, w0.shape[1]))
        return packed if self._intact(packed) else None

    def _intact(self, packed: Tensor) -> bool:
        """Whether the weights are `packed`'s rows, in order."""
        ptr, start = packed.untyped_storage().data_ptr(), packed.storage_offset()
        for lin in self._linears():
            w = lin.weight
            if (w.untyped_storage().data_ptr() != ptr or w.storage_offset() != start or w.dtype != packed.dtype
                    or not w.is_contiguous()):
                return False
            start += w.numel()
        return True

    def check_packing(self) -> None:
        """Drop a packing whose weights were moved out of the buffer since, with a warning."""
        if self.packed_weight is not None and not self._intact(self.packed_weight):
            logging.getLogger(__name__).warning(
                "%s: its weights were moved out of their packed buffer; projecting them one by one "
                "(call pack_projections() again to repack)", type(self).__name__)
            self.packed_weight = None

    def project(self, x: Tensor) -> list[Tensor]:
        """Each packable linear applied to `x`, in `packable` order. Compiled callers run
        `check_packing` first, outside the compiled code (`decode_step` does)."""
        if not torch.compiler.is_compiling():
            self.check_packing()
        if self.packed_weight is not None and not torch.is_grad_enabled():
            return list(F.linear(x, self.packed_weight).split([lin.out_features for lin in self._linears()], -1))
        return [lin(x) for lin in self._linears()]

    def _apply(self, fn, recurse=True):
        self.packed_weight = None  # .to(), .cuda(), casts: the weights get new storage
        return super()._apply(fn, recurse)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, sizes: tuple[int, ...]):
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        return F.linear(x, weight).split(sizes, -1)

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx, dws = None, []
        for g, w in zip(grads, weight.split(ctx.sizes)):
            if g is None:  # an output that took no part in the loss
                dws.append(torch.zeros_like(w))
                continue
            g2 = g.reshape(-1, g.shape[-1])
            dws.append(g2.t() @ x2)
            part = g2 @ w
            dx = part if dx is None else dx + part
        dx = torch.zeros_like(x) if dx is None else dx.view(x.shape)
        return dx, torch.cat(dws), None


def split_linear(x: Tensor, weight: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """`F.linear(x, weight).split(sizes, -1)` (no bias), with a backward that takes each part's
    gradient where it lies: the input's gradient is the sum of one matmul per part, and the
    weight's the parts' weight gradients stacked (rows, a small tensor), where autograd of the
    plain form first concatenates the parts' gradients into one tensor of the output's size."""
    return _SplitLinear.apply(x, weight, tuple(sizes))


def _owns_storage(w: Tensor) -> bool:
    """Whether `w` is its storage, whole: no other tensor's elements lie in it."""
    return w.is_contiguous() and w.storage_offset() == 0 and w.untyped_storage().nbytes() == w.numel() * w.element_size()


class SwiGLU(PackedProjections):
    packable = ("w_gate", "w_up")

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        gate, up = self.project(x_BTD)
        return self.w_down(F.silu(gate) * up)

    def init_weights(self, std: float, n_layers: int) -> None:
        nn.init.normal_(self.w_gate.weight, std=std)
        nn.init.normal_(self.w_up.weight, std=std)
        # The MLP writes straight into the residual stream: scale by depth (GPT-2 style).
        nn.init.normal_(self.w_down.weight, std=std / math.sqrt(2 * n_layers))

    def flops_per_token(self) -> int:
        return 2 * 3 * self.w_gate.in_features * self.w_gate.out_features
