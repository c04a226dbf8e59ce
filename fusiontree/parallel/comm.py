"""Tensor- and sequence-parallel collectives for batch-first activations.

Legend: B batch, T time (whole sequence), t time on one rank (T / tensor-parallel size),
D model width.

Under sequence parallelism the residual stream of a rank is `x_BtD`, its contiguous share of
the time axis. On CUDA tensors every collective here is megatron-core's own mapping
(`megatron.core.tensor_parallel.mappings`), which works on the first dimension, so the
tensor is viewed time-first around the call (free for B = 1, one copy otherwise). Several of
those mappings allocate their output on `torch.cuda.current_device()`, so CPU tensors (gloo,
the CI tests) take the small autograd functions below instead: same forward and backward,
device-agnostic.

Parameters that are replicated over the tensor-parallel group but see only a sequence shard
(norm gains, gate, SRTE projection) get a partial gradient on each rank. `sync_grad_over`
registers a hook that all-reduces it before it is accumulated into `.grad`, so every
optimizer (DeepSpeed ZeRO included, which never does this itself) sees the full gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings
from torch import Tensor

SEQ_DIM = 1  # time axis of batch-first activations


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def _world(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


def _check_divisible(T: int, world: int) -> None:
    if T % world:
        raise ValueError(f"sequence parallelism splits the sequence over {world} ranks, but the sequence "
                         f"has {T} tokens; use sequence lengths that are multiples of {world} (pad the "
                         "batch) or set parallel.sequence_parallel=false")


# ---------------------------------------------------------------------------- CPU primitives


def _all_gather(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    world = _world(group)
    xs = x.movedim(SEQ_DIM, 0).contiguous()
    out = xs.new_empty((world * xs.shape[0],) + xs.shape[1:])
    dist.all_gather_into_tensor(out, xs, group=group)
    return out.movedim(0, SEQ_DIM)


def _reduce_scatter(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    world = _world(group)
    _check_divisible(x.shape[SEQ_DIM], world)
    xs = x.movedim(SEQ_DIM, 0).contiguous()
    out = xs.new_empty((xs.shape[0] // world,) + xs.shape[1:])
    dist.reduce_scatter_tensor(out, xs, group=group)
    return out.movedim(0, SEQ_DIM)


def _split(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    world = _world(group)
    _check_divisible(x.shape[SEQ_DIM], world)
    return x.chunk(world, SEQ_DIM)[_rank(group)].contiguous()


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather; backward reduce-scatter (the gathered tensor feeds rank-local
    partial computations) or split (every rank computes the same thing from it)."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter if ctx.reduce_grad else _split)(grad, ctx.group), None, None


class _ScatterSequence(torch.autograd.Function):
    """Forward: keep this rank's time shard; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: sum the ranks' partial results and keep this rank's shard; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


# ---------------------------------------------------------------------------- public


def _time_first(fn, x_BTD: Tensor, *args, **kwargs) -> Tensor:
    """Run a megatron mapping (first-dim collectives) on a batch-first tensor."""
    return fn(x_BTD.transpose(0, 1).contiguous(), *args, **kwargs).transpose(0, 1)


def gather_sequence(x_BtD: Tensor, reduce_grad: bool = True, group: dist.ProcessGroup | None = None) -> Tensor:
    """[B, t, ...] shards -> [B, T, ...] on every rank. `reduce_grad`: the backward sums the
    ranks' gradients (rank-local partial use, e.g. before column-parallel projections);
    otherwise every rank is assumed to compute the same loss from the result and keeps its own
    slice of the gradient (before the replicated LM head, or the gate given to the loss)."""
    group = group or tp_group()
    if x_BtD.is_cuda:
        return _time_first(mappings.gather_from_sequence_parallel_region, x_BtD,
                           tensor_parallel_output_grad=reduce_grad, group=group)
    return _GatherSequence.apply(x_BtD, group, reduce_grad)


def scatter_sequence(x_BTD: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """[B, T, ...] replicated -> this rank's [B, t, ...] shard (backward: all-gather)."""
    group = group or tp_group()
    _check_divisible(x_BTD.shape[SEQ_DIM], _world(group))
    if x_BTD.is_cuda:
        return _time_first(mappings.scatter_to_sequence_parallel_region, x_BTD, group=group)
    return _ScatterSequence.apply(x_BTD, group)


def reduce_scatter_sequence(x_BTD: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Partial [B, T, ...] results -> their sum's [B, t, ...] shard on this rank."""
    group = group or tp_group()
    if x_BTD.is_cuda:
        _check_divisible(x_BTD.shape[SEQ_DIM], _world(group))
        return _time_first(mappings.reduce_scatter_to_sequence_parallel_region, x_BTD, group=group)
    return _ReduceScatterSequence.apply(x_BTD, group)


def enter_tensor_parallel(x: Tensor, sequence_parallel: bool, group: dist.ProcessGroup | None = None) -> Tensor:
    """The input of a tensor-parallel region (column-parallel projections that do no
    communication of their own). Without sequence parallelism the input is replicated and
    its gradient is all-reduced in the backward; with it, the shards are all-gathered and the
    gradient reduce-scattered. `copy_to_tensor_model_parallel_region` only all-reduces in
    place, so it serves CPU and GPU alike."""
    group = group or tp_group()
    if sequence_parallel:
        return gather_sequence(x, reduce_grad=True, group=group)
    return mappings.copy_to_tensor_model_parallel_region(x, group=group)


class _ShareGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def share_grad_over(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Identity whose backward divides the gradient by the group size. For a tensor computed
    from parameters whose gradients `sync_grad_over` sums over the group, and used by every
    rank alike (a per-channel gate in the loss): each rank contributes 1/k of its gradient, so
    the sum counts it once."""
    return _ShareGrad.apply(x, _world(group))


def sync_grad_over(p: torch.nn.Parameter, group: dist.ProcessGroup) -> None:
    """All-reduce (sum) the gradient of `p` over `group` as autograd produces it, before it is
    accumulated into `p.grad`: hooks that read `.grad` afterwards (DeepSpeed's ZeRO reduction)
    see the summed gradient. Every rank of `group` runs the same graph, so the hooks of the
    ranks fire in the same order and the collectives match."""

    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    p.register_hook(hook)


def sync_replica_grad_over(p: torch.nn.Parameter, group: dist.ProcessGroup, n_replica_sets: int,
                           replica_set: int) -> None:
    """Sum the gradient of `p` over the ranks of `group` that hold the same replica (kv heads
    when there are fewer than ranks): rank r holds replica `replica_set` of `n_replica_sets`.
    One all-reduce of an [n_replica_sets, ...] buffer in which each rank fills its own slot
    does it without creating sub-groups."""

    def hook(grad: Tensor) -> Tensor:
        buf = grad.new_zeros((n_replica_sets,) + tuple(grad.shape))
        buf[replica_set] = grad
        dist.all_reduce(buf, group=group)
        return buf[replica_set].clone()

    p.register_hook(hook)
