"""How each parameter is split over the tensor-parallel group, and checkpoint resharding.

Legend: D model width, H attention heads, K kv heads, E attention head dim, I Mamba inner
width, Hs Mamba heads, G SSM groups, N SSM state, F MLP hidden width, k tensor-parallel size.

A parallelized model keeps the plain model's parameter names; a rank's tensor is its share of
the plain tensor. Most shares are one contiguous slice along one dimension. Fused tensors are
partitioned per component: Mamba's `in_proj` rows [z (I) | x (I) | B (G N) | C (G N) | dt (Hs)]
become [z_r | x_r | B_r | C_r | dt_r] on rank r, and the conv weights [x | B | C] likewise, so
that a rank's projection feeds exactly its own heads and groups. With fewer kv heads than
ranks (k a multiple of K), each rank holds a copy of the one kv head its query heads use.

    sd_k = shard_state_dict(plain_sd, model_cfg, tensor_parallel=k, rank=r)  # TP=1 -> TP=k
    plain_sd = consolidate_state_dicts([sd_0, ..., sd_{k-1}], model_cfg)       # TP=k -> TP=1

Parameters without a `TensorSplit` (embedding, LM head, norms, gate, SRTE) are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fusiontree.config import ModelConfig

EXTRA_STATE_SUFFIX = "_extra_state"  # megatron-core layers add an empty one per linear


@dataclass(frozen=True)
class TensorSplit:
    """`parts`: consecutive components along `dim`, each (size, units): split evenly over the
    ranks when k divides `units` (heads, groups, channels), else (k a multiple of `units`)
    rank r holds whole unit r // (k // units), replicated."""
    dim: int
    parts: tuple[tuple[int, int], ...]

    def _check(self, tp: int) -> None:
        for size, units in self.parts:
            assert size % units == 0 and (units % tp == 0 or tp % units == 0), (self, tp)

    def local_sizes(self, tp: int) -> list[int]:
        self._check(tp)
        return [size // tp if units % tp == 0 else size // units for size, units in self.parts]

    def full_size(self) -> int:
        return sum(size for size, _ in self.parts)

    def is_replicated(self, tp: int) -> bool:
        return any(units % tp for _, units in self.parts)

    def replica_set(self, tp: int, rank: int) -> tuple[int, int]:
        """(number of distinct replicas, which one rank holds), for a single replicated part."""
        (_, units), = self.parts
        return units, rank // (tp // units)

    def shard(self, full: Tensor, tp: int, rank: int) -> Tensor:
        self._check(tp)
        if full.shape[self.dim] != self.full_size():
            raise ValueError(f"cannot shard a tensor of shape {tuple(full.shape)}: dimension {self.dim} should "
                             f"have {self.full_size()} entries; is the checkpoint from another model config?")
        out = []
        for piece, (size, units) in zip(full.split([s for s, _ in self.parts], self.dim), self.parts):
            if units % tp == 0:
                out.append(piece.chunk(tp, self.dim)[rank])
            else:
                out.append(piece.chunk(units, self.dim)[rank // (tp // units)])
        return torch.cat(out, self.dim).contiguous()

    def unshard(self, shards: Sequence[Tensor]) -> Tensor:
        tp = len(shards)
        sizes = self.local_sizes(tp)
        for s in shards:
            if s.shape[self.dim] != sum(sizes):
                raise ValueError(f"a TP={tp} shard has shape {tuple(s.shape)}, dimension {self.dim} should have "
                                 f"{sum(sizes)} entries; pass every rank's state dict, in rank order")
        per_rank = [s.split(sizes, self.dim) for s in shards]
        out = []
        for c, (_, units) in enumerate(self.parts):
            if units % tp == 0:
                out.extend(per_rank[r][c] for r in range(tp))
            else:  # one copy of each replicated unit: the first rank that holds it
                out.extend(per_rank[u * (tp // units)][c] for u in range(units))
        return torch.cat(out, self.dim)


def tensor_parallel_splits(cfg: ModelConfig) -> dict[str, TensorSplit]:
    """Parameter name (as in `model.state_dict()`) -> how it is split. Others are replicated."""
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
    I, Hs, G, N = cfg.ssm_d_inner, cfg.ssm_heads, cfg.ssm_groups, cfg.ssm_state
    F = cfg.mlp_hidden_size
    splits: dict[str, TensorSplit] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if cfg.has_attention:
            splits[p + "attn.wq.weight"] = TensorSplit(0, ((H * E, H),))
            splits[p + "attn.wk.weight"] = TensorSplit(0, ((K * E, K),))
            splits[p + "attn.wv.weight"] = TensorSplit(0, ((K * E, K),))
            splits[p + "attn.wo.weight"] = TensorSplit(1, ((H * E, H),))
        if cfg.has_mamba:
            # z and x split by head, B and C by group: a rank's heads all belong to its groups.
            splits[p + "mamba.in_proj.weight"] = TensorSplit(0, ((I, Hs), (I, Hs), (G * N, G), (G * N, G), (Hs, Hs)))
            for name in ("conv_weight", "conv_bias"):
                splits[p + "mamba." + name] = TensorSplit(0, ((I, Hs), (G * N, G), (G * N, G)))
            for name in ("A_log", "D", "dt_bias"):
                splits[p + "mamba." + name] = TensorSplit(0, ((Hs, Hs),))
            splits[p + "mamba.norm.weight"] = TensorSplit(0, ((I, G),))  # whole norm groups per rank
            splits[p + "mamba.out_proj.weight"] = TensorSplit(1, ((I, Hs),))
        splits[p + "mlp.w_gate.weight"] = TensorSplit(0, ((F, F),))
        splits[p + "mlp.w_up.weight"] = TensorSplit(0, ((F, F),))
        splits[p + "mlp.w_down.weight"] = TensorSplit(1, ((F, F),))
    return splits


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
