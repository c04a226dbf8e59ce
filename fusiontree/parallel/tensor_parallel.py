"""`parallelize(model, cfg.parallel)`: turn a plain HybridLanguageModel into this rank's
tensor- (and sequence-) parallel share of it, in place.

Legend: k tensor-parallel size, r this rank's position in the tensor-parallel group.

The plain model is built first, identically on every rank; `parallelize` broadcasts it from
the group's first rank (so a rank-dependent seed cannot desynchronise the shards), then swaps
each mixer and MLP for its tensor-parallel subclass (`fusiontree.parallel.layers`) holding
rank r's share of every split parameter (`fusiontree.models.splits.tensor_parallel_splits`).
Parameter names do not change. Build optimizers after this call.

Gradients of replicated parameters (see comm.py for the hooks):
- without sequence parallelism each rank sees the whole sequence and the backward of the
  region entry all-reduces the activations' gradients, so replicated parameters get
  identical full gradients with no extra communication;
- under sequence parallelism the norm gains, the gate and the SRTE projection of each block,
  and the final norm, see one time shard: hooks all-reduce their gradients over the
  tensor-parallel group inside the backward. They carry `p.sequence_parallel = True`
  (megatron-core's marker); `sequence_parallel_params(model)` lists them.
- kv heads replicated over several ranks (fewer kv heads than ranks) get their gradient
  summed over the ranks that share them, likewise inside the backward.

Split parameters carry megatron-core's `tensor_model_parallel` / `partition_dim` attributes,
which DeepSpeed's gradient-norm also reads (`is_model_parallel_parameter`): a replicated kv
head counts as model-parallel on the first rank that holds it only, so it is counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state

from fusiontree.config import ParallelConfig
from fusiontree.models.splits import TensorSplit, tensor_parallel_splits
from fusiontree.parallel.comm import sync_grad_over, sync_replica_grad_over
from fusiontree.parallel.layers import (ColumnLinear, RowLinear, SequenceGatherRMSNorm, SequenceParallelHybridBlock,
                                        SequenceScatterEmbedding, SequenceShardSRTE, TensorParallelAttention,
                                        TensorParallelMamba2Mixer, TensorParallelSwiGLU)


def _swap_class(module: nn.Module, cls: type, **attrs) -> None:
    """Give `module` the parallel subclass `cls` of its class, keeping its parameters (and so
    their names); `attrs` is the state the subclass adds."""
    assert issubclass(cls, type(module)), (cls, type(module))
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)


def _mark_split(p: nn.Parameter, split: TensorSplit, tp: int, rank: int) -> None:
    p.tensor_model_parallel = True
    p.partition_dim = split.dim
    p.partition_stride = 1
    if split.is_replicated(tp):
        n_sets, _ = split.replica_set(tp, rank)
        # Counted once by gradient norms: on the first rank that holds this replica.
        p.tensor_model_parallel = rank % (tp // n_sets) == 0


def _copy_tags(src: nn.Parameter, dst: nn.Parameter) -> None:
    """The plain parameter's Python attributes (`_no_weight_decay`, `_keep_fp32`, ...)."""
    for k, v in vars(src).items():
        setattr(dst, k, v)


def _shard_param(full: nn.Parameter, split: TensorSplit, tp: int, rank: int) -> nn.Parameter:
    shard = nn.Parameter(split.shard(full.detach(), tp, rank), requires_grad=full.requires_grad)
    _copy_tags(full, shard)
    _mark_split(shard, split, tp, rank)
    return shard


class _Ctx:
    def __init__(self, cfg: ParallelConfig, splits: dict[str, TensorSplit]):
        self.tp = cfg.tensor_parallel
        self.sp = cfg.sequence_parallel
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.splits = splits

    def linear(self, kind: type, plain: nn.Linear, name: str) -> nn.Module:
        split = self.splits[name]
        w = plain.weight
        if kind is ColumnLinear:
            # k shares of the rank's size: the full width, or for replicated kv heads a layer
            # over k virtual copies of them.
            out_size = sum(split.local_sizes(self.tp)) * self.tp
            layer = ColumnLinear(plain.in_features, out_size, w.dtype, self.group)
        else:
            layer = RowLinear(split.full_size(), plain.out_features, w.dtype, self.group, self.sp)
        layer.weight.data = split.shard(w.detach(), self.tp, self.rank)
        layer.weight.requires_grad_(w.requires_grad)
        _copy_tags(w, layer.weight)
        _mark_split(layer.weight, split, self.tp, self.rank)
        return layer

    def param(self, module: nn.Module, attr: str, name: str) -> None:
        setattr(module, attr, _shard_param(getattr(module, attr), self.splits[name], self.tp, self.rank))


def _parallelize_attention(attn, prefix: str, c: _Ctx) -> None:
    tp = c.tp
    for lin in ("wq", "wk", "wv"):
        setattr(attn, lin, c.linear(ColumnLinear, getattr(attn, lin), f"{prefix}{lin}.weight"))
    attn.wo = c.linear(RowLinear, attn.wo, f"{prefix}wo.weight")
    replicated_kv = attn.n_kv_heads % tp != 0
    attn.n_heads //= tp
    attn.n_kv_heads = 1 if replicated_kv else attn.n_kv_heads // tp
    if replicated_kv:
        split = c.splits[f"{prefix}wk.weight"]
        n_sets, mine = split.replica_set(tp, c.rank)
        for lin in (attn.wk, attn.wv):
            sync_replica_grad_over(lin.weight, c.group, n_sets, mine)
    _swap_class(attn, TensorParallelAttention, tp_group=c.group, sequence_parallel=c.sp)


def _parallelize_mamba(m, prefix: str, c: _Ctx) -> None:
    tp = c.tp
    m.in_proj = c.linear(ColumnLinear, m.in_proj, f"{prefix}in_proj.weight")
    m.out_proj = c.linear(RowLinear, m.out_proj, f"{prefix}out_proj.weight")
    for attr in ("conv_weight", "conv_bias", "A_log", "D", "dt_bias"):
        c.param(m, attr, f"{prefix}{attr}")
    c.param(m.norm, "weight", f"{prefix}norm.weight")
    m.d_inner //= tp
    m.n_heads //= tp
    m.n_groups //= tp
    m.conv_dim //= tp
    assert m.norm.weight.numel() == m.d_inner and m.conv_weight.shape[0] == m.conv_dim
    _swap_class(m, TensorParallelMamba2Mixer, tp_group=c.group, sequence_parallel=c.sp)


def _parallelize_mlp(mlp, prefix: str, c: _Ctx) -> None:
    mlp.w_gate = c.linear(ColumnLinear, mlp.w_gate, f"{prefix}w_gate.weight")
    mlp.w_up = c.linear(ColumnLinear, mlp.w_up, f"{prefix}w_up.weight")
    mlp.w_down = c.linear(RowLinear, mlp.w_down, f"{prefix}w_down.weight")
    _swap_class(mlp, TensorParallelSwiGLU, tp_group=c.group, sequence_parallel=c.sp)


def _sync_sequence_parallel_grads(module: nn.Module, group: dist.ProcessGroup) -> None:
    for p in module.parameters():
        if not hasattr(p, "tensor_model_parallel") and not getattr(p, "sequence_parallel", False):
            p.sequence_parallel = True
            sync_grad_over(p, group)


def parallelize(model: nn.Module, cfg: ParallelConfig, broadcast: bool = True) -> nn.Module:
    """Make `model` (a plain HybridLanguageModel, identical on every rank of the tensor-parallel
    group) this rank's tensor-parallel share, in place, and return it. Needs megatron-core's
    parallel state (`init_parallel_state`) with the same tensor-parallel size.

    `broadcast`: copy every parameter from the group's first rank first (one broadcast per
    tensor at start-up; turn it off only if the plain models are known to be identical)."""
    cfg.validate(model.cfg)
    tp = cfg.tensor_parallel
    if tp == 1:
        model.parallel_config = cfg
        return model
    if not parallel_state.model_parallel_is_initialized():
        raise ValueError("parallelize needs megatron-core's parallel state: call "
                         "fusiontree.parallel.init_parallel_state(cfg.parallel) after init_distributed")
    have = parallel_state.get_tensor_model_parallel_world_size()
    if have != tp:
        raise ValueError(f"parallel.tensor_parallel={tp} but the parallel state was initialised with "
                         f"tensor-parallel size {have}; initialise it from the same config")
    if getattr(model, "parallel_config", None) is not None:
        raise ValueError("this model is already parallelized; build a fresh plain model")
    if any("forward" in vars(block) for block in model.layers):
        raise ValueError("the blocks already have training mechanics (fusiontree.train.mechanics), which wrap the "
                         "forward that parallelize replaces; parallelize the plain model first, then apply them")
    c = _Ctx(cfg, tensor_parallel_splits(model.cfg))
    if broadcast:
        src = parallel_state.get_tensor_model_parallel_src_rank()
        if dist.get_backend(c.group) == "nccl" and not model.embed.weight.is_cuda:
            raise ValueError("the tensor-parallel group uses NCCL but the model is on the CPU; move the plain "
                             "model to this rank's GPU before parallelize")
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=src, group=c.group)
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        if block.attn is not None:
            _parallelize_attention(block.attn, p + "attn.", c)
        if block.mamba is not None:
            _parallelize_mamba(block.mamba, p + "mamba.", c)
        _parallelize_mlp(block.mlp, p + "mlp.", c)
        if c.sp:
            _swap_class(block, SequenceParallelHybridBlock, tp_group=c.group)
            if block.srte is not None:
                _swap_class(block.srte, SequenceShardSRTE, tp_group=c.group)
            _sync_sequence_parallel_grads(block, c.group)
    if c.sp:
        _swap_class(model.embed, SequenceScatterEmbedding, tp_group=c.group)
        _swap_class(model.norm_out, SequenceGatherRMSNorm, tp_group=c.group)
        _sync_sequence_parallel_grads(model.norm_out, c.group)
    _check_shapes(model, c)
    model.parallel_config = cfg
    return model


def _check_shapes(model: nn.Module, c: _Ctx) -> None:
    """Every split parameter has its share's shape; nothing else changed shape."""
    for name, p in model.named_parameters():
        split = c.splits.get(name)
        if split is not None:
            want = split.local_sizes(c.tp)
            assert p.shape[split.dim] == sum(want) and getattr(p, "partition_dim", None) == split.dim, name
        else:
            assert not hasattr(p, "partition_dim"), name


def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters that see one time shard (their gradients are all-reduced over the
    tensor-parallel group by hooks registered in `parallelize`)."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]

