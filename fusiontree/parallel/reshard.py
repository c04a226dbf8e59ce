"""Checkpoint resharding between tensor-parallel sizes, by the split table of
`fusiontree.models.splits` (which says how every tensor splits and why).

    sd_k = shard_state_dict(plain_sd, model_cfg, tensor_parallel=k, rank=r)  # TP=1 -> TP=k
    plain_sd = consolidate_state_dicts([sd_0, ..., sd_{k-1}], model_cfg)       # TP=k -> TP=1

Parameters without a `TensorSplit` (embedding, LM head, norms, gate, SRTE) are replicated.
`consolidated_model_state` gathers a training model's plain state dict (through ZeRO-3 and
tensor parallelism) for the portable model.pt of every checkpoint.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fusiontree.models.config import ModelConfig
from fusiontree.models.splits import tensor_parallel_splits

EXTRA_STATE_SUFFIX = "_extra_state"  # megatron-core layers add an empty one per linear


def _strip_extra_state(sd: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in sd.items() if not k.endswith(EXTRA_STATE_SUFFIX)}


def shard_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig, tensor_parallel: int,
                     rank: int) -> dict[str, Tensor]:
    """A TP=1 (plain) state dict -> rank `rank`'s state dict at TP=`tensor_parallel`, ready for
    `model.load_state_dict` on the parallelized model."""
    if not 0 <= rank < tensor_parallel:
        raise ValueError(f"rank={rank} must lie in [0, tensor_parallel={tensor_parallel})")
    splits = tensor_parallel_splits(cfg)
    out = {}
    for name, t in _strip_extra_state(state_dict).items():
        split = splits.get(name)
        out[name] = t.clone() if split is None else split.shard(t, tensor_parallel, rank)
    return out


def consolidate_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]], cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dicts of all ranks of one tensor-parallel group, in rank order -> the plain
    (TP=1) state dict. Replicated tensors are taken from rank 0."""
    if not state_dicts:
        raise ValueError("consolidate_state_dicts needs the state dict of every tensor-parallel rank")
    sds = [_strip_extra_state(sd) for sd in state_dicts]
    names = list(sds[0])
    for r, sd in enumerate(sds[1:], 1):
        if list(sd) != names:
            raise ValueError(f"rank {r}'s state dict has other keys than rank 0's; pass the state dicts of "
                             "one tensor-parallel group (same pipeline and data-parallel position)")
    splits = tensor_parallel_splits(cfg)
    out = {}
    for name in names:
        split = splits.get(name)
        if split is None or len(sds) == 1:
            out[name] = sds[0][name].clone()
        else:
            out[name] = split.unshard([sd[name] for sd in sds])
    return out


def weights_stay_on_device(tensor_parallel: int, zero_stage: int) -> bool:
    """Whether `consolidated_model_state(on_device=True)` hands out the training tensors
    themselves (no gathering needed: neither tensor parallelism nor ZeRO-3)."""
    return tensor_parallel == 1 and zero_stage != 3


def consolidated_model_state(module: torch.nn.Module, cfg: ModelConfig, tensor_parallel: int, zero_stage: int,
                             is_main: bool, on_device: bool = False) -> dict[str, Tensor] | None:
    """The plain (single-device) state dict of a training model, on the main rank only (None
    elsewhere). Collective: ZeRO-3 shards the weights over the data-parallel ranks (gathered
    for the copy), tensor parallelism splits them over its group (gathered to the group's first
    rank and consolidated; only the first data-parallel replica sends). Only the ranks whose
    copy is used make one. `on_device`: without tensor parallelism or ZeRO-3, the detached
    training tensors themselves where they are on a GPU (no copy: the caller must copy them
    before the next step)."""
    if tensor_parallel == 1:
        sends = is_main
    else:
        from megatron.core import parallel_state  # tensor parallelism only: a seconds-long import

        sends = parallel_state.get_data_parallel_rank() == 0

    def local() -> dict[str, Tensor] | None:
        if not sends:
            return None
        views = on_device and weights_stay_on_device(tensor_parallel, zero_stage)
        # A host copy that training cannot change: .cpu() of a device tensor is one already.
        return {k: v.detach() if views and v.is_cuda else v.detach().clone() if v.device.type == "cpu"
                else v.detach().cpu() for k, v in module.state_dict().items() if isinstance(v, Tensor)}

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = local()
    else:
        sd = local()
    if tensor_parallel == 1 or not sends:
        return sd
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [None] * tensor_parallel if is_main else None
    dist.gather_object(sd, shards, dst=dist.get_process_group_ranks(group)[0], group=group)
    return consolidate_state_dicts(shards, cfg) if is_main else None
