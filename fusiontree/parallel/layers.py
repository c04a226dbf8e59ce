"""Tensor- and sequence-parallel versions of the model's modules, swapped in by `parallelize`.

Legend: B batch, T time, t time on one rank (T / k under sequence parallelism), D model width,
k tensor-parallel size.

Each class subclasses the plain module and keeps its math: the plain `forward` runs on the
rank's heads / channels, with megatron-core's `ColumnParallelLinear` and `RowParallelLinear`
in place of `nn.Linear`. Communication happens at three places only:

- entry of a mixer or MLP (`enter_tensor_parallel`): all-gather the sequence shards (SP) or
  mark the replicated input for a backward all-reduce (TP only); the column-parallel
  projections then do no communication of their own, so one collective serves wq, wk and wv
  (or the MLP's two input projections);
- the row-parallel output projection: all-reduce (TP) or reduce-scatter (SP);
- under SP, the embedding output is split over the time axis, the final norm's output and a
  per-token gate (for the loss) are all-gathered.

Parameter names stay those of the plain model, so checkpoints reshard by slicing
(`fusiontree.parallel.reshard`).
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

from fusiontree.models.attention import LocalGlobalAttention
from fusiontree.models.block import HybridBlock
from fusiontree.models.layers import RMSNorm, SwiGLU
from fusiontree.models.mamba2 import Mamba2Mixer
from fusiontree.models.positions import SRTE
from fusiontree.parallel.comm import (enter_tensor_parallel, gather_sequence, reduce_scatter_sequence,
                                      scatter_sequence, share_grad_over)


def _no_init(_weight: Tensor) -> None:
    """Weights are copied from the plain model; megatron-core never initialises them here."""


def megatron_config(tensor_parallel: int, sequence_parallel: bool, dtype) -> ModelParallelConfig:
    # CPU allocation keeps construction device-agnostic; the shards are then moved onto the
    # plain model's device by `parallelize`.
    return ModelParallelConfig(tensor_model_parallel_size=tensor_parallel, sequence_parallel=sequence_parallel,
                               use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype,
                               gradient_accumulation_fusion=False)


class ColumnLinear(ColumnParallelLinear):
    """Column-parallel projection that returns a tensor and communicates nothing: its input is
    already entered into the tensor-parallel region (see `enter_tensor_parallel`)."""

    def __init__(self, in_features: int, out_features: int, dtype, group: dist.ProcessGroup):
        cfg = megatron_config(dist.get_world_size(group), False, dtype)
        super().__init__(in_features, out_features, config=cfg, init_method=_no_init, bias=False,
                         gather_output=False, disable_grad_reduce=True, tp_group=group)

    @property
    def in_features(self) -> int:
        return self.input_size

    @property
    def out_features(self) -> int:  # this rank's share
        return self.output_size_per_partition

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """Row-parallel projection that sums the ranks' partial outputs: all-reduce, or under
    sequence parallelism reduce-scatter onto the time shards. Returns a tensor."""

    def __init__(self, in_features: int, out_features: int, dtype, group: dist.ProcessGroup,
                 sequence_parallel: bool):
        cfg = megatron_config(dist.get_world_size(group), sequence_parallel, dtype)
        super().__init__(in_features, out_features, config=cfg, init_method=_no_init, bias=False,
                         input_is_parallel=True, skip_bias_add=False, tp_group=group)

    @property
    def in_features(self) -> int:  # this rank's share
        return self.input_size_per_partition

    @property
    def out_features(self) -> int:
        return self.output_size

    def forward(self, x_BTI: Tensor) -> Tensor:
        if not self.sequence_parallel:
            return super().forward(x_BTI)[0]
        if x_BTI.is_cuda:  # megatron-core's reduce-scatter works on the first (time) dimension
            return super().forward(x_BTI.transpose(0, 1).contiguous())[0].transpose(0, 1)
        # megatron-core's reduce-scatter allocates on the current CUDA device: same math on CPU.
        return reduce_scatter_sequence(F.linear(x_BTI, self.weight), self.tp_group)


class _TensorParallel:
    """State shared by the tensor-parallel mixers (set by `parallelize`)."""
    tp_group: dist.ProcessGroup
    sequence_parallel: bool

    def _enter(self, x: Tensor) -> Tensor:
        return enter_tensor_parallel(x, self.sequence_parallel, self.tp_group)


class TensorParallelAttention(_TensorParallel, LocalGlobalAttention):
    """Query heads split over the ranks; kv heads split, or each rank holding the kv head its
    query heads use (when there are fewer kv heads than ranks). The KV cache holds this
    rank's kv heads."""

    def forward(self, x_BTD: Tensor, info, cache=None) -> Tensor:
        return super().forward(self._enter(x_BTD), info, cache)

    step = forward


class TensorParallelMamba2Mixer(_TensorParallel, Mamba2Mixer):
    """Mamba heads and SSM groups split over the ranks: the fused in_proj, conv weights,
    A_log, D, dt_bias and the gated norm (one group per SSM group) are the rank's share; SSM
    and conv states hold the rank's heads and channels.

    `step` (decode) is the plain one: its input is replicated (decode runs without sequence
    parallelism) and it runs without autograd, where entering the region is the identity."""

    def forward(self, u_BTD: Tensor, info, state=None) -> Tensor:
        return super().forward(self._enter(u_BTD), info, state)


class TensorParallelSwiGLU(_TensorParallel, SwiGLU):
    """Hidden units split over the ranks: w_gate, w_up column-parallel, w_down row-parallel."""

    def forward(self, x_BTD: Tensor) -> Tensor:
        return super().forward(self._enter(x_BTD))


# ---------------------------------------------------------------------------- sequence parallel


class SequenceParallelHybridBlock(HybridBlock):
    """The block on a time shard `x_BtD`. Norms, residuals, the gate and SRTE run on the shard;
    the mixers and the MLP gather and scatter inside.

    The gate goes on to the loss (regulariser) and the gate statistics, which every rank
    computes alike over the whole sequence: a per-token gate is all-gathered over time (the
    backward keeps the rank's slice); a per-channel gate is the same on every rank, and its
    gradient from the loss is shared out so that the summing hooks on the gate's parameters
    count it once."""

    def forward(self, x_BtD: Tensor, info, attn_cache=None, mamba_state=None):
        if attn_cache is not None or mamba_state is not None:
            raise ValueError("sequence parallelism shards the time axis, which decoding with caches cannot do; "
                             "parallelize the model for generation with parallel.sequence_parallel=false")
        x_BtD, g = super().forward(x_BtD, info)
        if g is not None:
            g = gather_sequence(g, reduce_grad=False, group=self.tp_group) if g.ndim == 3 \
                else share_grad_over(g, self.tp_group)
        return x_BtD, g


class SequenceShardSRTE(SRTE):
    """SRTE for this rank's time shard: the block passes positions of the whole sequence."""

    def forward(self, pos_BT: Tensor, dtype) -> Tensor:
        world, rank = dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)
        return super().forward(pos_BT.chunk(world, dim=1)[rank], dtype)


class SequenceScatterEmbedding(nn.Embedding):
    """Embeds the whole sequence (replicated) and keeps this rank's time shard."""

    def forward(self, input_ids: Tensor) -> Tensor:
        return scatter_sequence(super().forward(input_ids), self.tp_group)


class SequenceGatherRMSNorm(RMSNorm):
    """The final norm on the time shard, then all-gathered for the replicated LM head. Every
    rank computes the same loss from it, so the backward keeps this rank's slice."""

    def forward(self, x_BtD: Tensor) -> Tensor:
        return gather_sequence(super().forward(x_BtD), reduce_grad=False, group=self.tp_group)
