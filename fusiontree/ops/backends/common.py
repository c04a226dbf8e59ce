"""Helpers shared by backends that need no optional package (so CPU tests can import them).

Legend: B batch, T time.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fusiontree.ops.masks import document_starts


# Work that a backend's first kernel call must wait for (an autotuning process that fills the
# cache the kernels read: fusiontree.train.autotune_warmup); each runs once, then is dropped.
_before_first_call: list = []


def before_first_kernel_call(fn) -> None:
    """Run `fn()` once, at the next call of a backend that autotunes (the SSD's chunked scan)."""
    _before_first_call.append(fn)


def run_before_first_kernel_call() -> None:
    """Run (and drop) what `before_first_kernel_call` registered; nothing once it has run."""
    while _before_first_call:
        _before_first_call.pop(0)()


def raise_recompile_limit() -> None:
    """Raise torch's limit of 8 compiled entries per function to 64. Blocks compile once per
    structure (local / global / pruned), grad mode and curriculum length; FlexAttention once per
    shape, window path and kernel option. Past the limit torch silently runs the function
    eagerly, which for FlexAttention means materialising every T x T score (64 GiB at 32K)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def einops_calls_in_graph() -> None:
    """Dynamo records each einops call (rearrange, repeat, reduce, einsum) as one call in the
    graph instead of tracing into it. Traced into, a call re-runs einops' pattern parser
    symbolically every time (its cache does not apply while tracing), which is most of the time
    a block takes to trace; recorded as a call, the graph's tracer runs it as eager code does
    (parser cached) and keeps the views it makes."""
    import einops

    for fn in (einops.rearrange, einops.repeat, einops.reduce, einops.einsum):
        torch._dynamo.allow_in_graph(fn)


def require_cuda(backend: str, setting: str, **tensors: Tensor | None) -> None:
    """A GPU backend's inputs are CUDA tensors, or a one-line error naming the CPU setting."""
    off = [name for name, t in tensors.items() if t is not None and not t.is_cuda]
    if off:
        raise ValueError(f"{backend}, but {off} are not CUDA tensors; move the model to the GPU or use "
                         f"{setting} on CPU")


def check_conv_shape(channels: int, width: int) -> None:
    """The shapes the `causal_conv1d` conv1d backend's kernels take, or a one-line error."""
    if channels % 8 or not 2 <= width <= 4:
        raise ValueError(f"kernels.conv1d=causal_conv1d needs channels divisible by 8 and a width of 2 to 4 "
                         f"(got {channels} channels, width {width}: the Mamba conv's channels are "
                         "d_inner + 2 * ssm_groups * ssm_state per tensor-parallel rank); set "
                         "kernels.conv1d=triton (any shape) or kernels.conv1d=reference")


def conv1d_custom_ops(name: str, fwd, bwd, device_types: str = "cuda"):
    """A conv1d backend's kernels as torch custom ops `fusiontree::{name}_fwd` and
    `fusiontree::{name}_bwd`, the backward registered as the forward's gradient; returns the
    forward op. A compiled block keeps them in its graph (no break) and CUDA graphs capture them.

    fwd(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, silu) -> y_BTC;
    bwd(the same inputs but silu, dy_BTC, silu) -> (dx, dweight, dbias, dinitial_state), dbias
    and dinitial_state empty when there is no bias or initial state. Both are annotated as
    the ops' schemas, read any input strides and return fresh contiguous tensors: the ops are
    tagged `flexible_layout`, so Inductor hands them its own layouts instead of a copy with
    eager's strides (on CUDA it pads the rows of the input projection the conv reads a slice of)."""
    any_layout = (torch.Tag.flexible_layout,)
    fwd_op = torch.library.custom_op(f"fusiontree::{name}_fwd", fwd, mutates_args=(), device_types=device_types,
                                     tags=any_layout)
    bwd_op = torch.library.custom_op(f"fusiontree::{name}_bwd", bwd, mutates_args=(), device_types=device_types,
                                     tags=any_layout)

    @fwd_op.register_fake
    def _(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, silu):
        return x_BTC.new_empty(x_BTC.shape)

    @bwd_op.register_fake
    def _(x_BTC, weight_CK, bias_C, seq_idx_BT, initial_state_BCK, dy_BTC, silu):
        # two absent outputs are two empty tensors, not one (outputs must not alias each other)
        return (x_BTC.new_empty(x_BTC.shape), weight_CK.new_empty(weight_CK.shape),
                x_BTC.new_empty(0) if bias_C is None else bias_C.new_empty(bias_C.shape),
                x_BTC.new_empty(0) if initial_state_BCK is None else
                initial_state_BCK.new_empty(initial_state_BCK.shape))

    def setup_context(ctx, inputs, output):
        x, weight, bias, seq_idx, init, silu = inputs
        ctx.save_for_backward(x, weight, bias, seq_idx, init)
        ctx.silu = silu
        ctx.has_bias, ctx.has_init = bias is not None, init is not None

    def backward(ctx, dy):
        x, weight, bias, seq_idx, init = ctx.saved_tensors
        dx, dweight, dbias, dinit = bwd_op(x, weight, bias, seq_idx, init, dy, ctx.silu)
        return dx, dweight, dbias if ctx.has_bias else None, None, dinit if ctx.has_init else None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op


_compiled: dict = {}  # (function, compile options) -> its torch.compile wrapper


def _frozen(value):
    """A hashable form of compile options (Inductor's `options` is a dict inside them)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def compile_once(fn, **compile_kwargs):
    """`torch.compile(fn, **compile_kwargs)`, built once per function and options (the backends'
    compiled kernels), after raising the recompile limit and putting einops calls in the graph
    whole (`einops_calls_in_graph`)."""
    key = (fn, _frozen(compile_kwargs))
    if key not in _compiled:
        raise_recompile_limit()
        einops_calls_in_graph()
        _compiled[key] = torch.compile(fn, **compile_kwargs)
    return _compiled[key]


@lru_cache(maxsize=16)
def window_tensor(window: int, device: torch.device) -> Tensor:
    """A window as a tensor for FlexAttention's mask functions: a tensor, not a Python int, inside
    the mask, so every window shares one compiled kernel."""
    return torch.tensor(window, dtype=torch.int32, device=device)


def canonical_seq_idx(seq_idx_BT: Tensor) -> Tensor:
    """Relabel document ids as 0, 1, 2, ... in order of appearance along each row (int32).

    The reference starts a new document wherever the id changes between neighbours, and the
    initial state belongs to the first document whatever its id. Kernels that instead compare
    ids for equality and give the initial state to id 0 (mamba-ssm) agree with the reference
    on the relabelled ids, also for rows that start at an id other than 0 or reuse an id.
    Computed on the device, without a host sync."""
    return torch.cumsum(document_starts(seq_idx_BT, first=False), dim=1, dtype=torch.int32).contiguous()


class unit_sums_as_views(TorchFunctionMode):
    """While active, `t.sum(d)` / `t.sum(dim=d)` over one dimension of size 1 of a floating
    tensor returns `t.squeeze(d)`: the same values (a sum of one term), as a view instead of a
    new tensor. Every other call runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.sum and len(args) + len(kwargs) == 2:
            t, dim = args[0], args[1] if len(args) == 2 else kwargs.get("dim")
            if isinstance(dim, int) and t.is_floating_point() and t.shape[dim] == 1:
                return t.squeeze(dim)
        return func(*args, **kwargs)
