"""Checkpoint resharding between tensor-parallel sizes, by the split table of
`fusiontree.models.splits` (which says how every tensor splits and why).

    sd_k = shard_state_dict(plain_sd, model_cfg, tensor_parallel=k, rank=r)  # TP=1 -> TP=k
    plain_sd = consolidate_state_dicts([sd_0, ..., sd_{k-1}], model_cfg)       # TP=k -> TP=1

Parameters without a `TensorSplit` (embedding, LM head, norms, gate, SRTE) are replicated.
"""

from __future__ import annotations

from typing import Mapping, Sequence

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
