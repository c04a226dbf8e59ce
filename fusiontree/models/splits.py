"""How every tensor of the model splits under tensor parallelism: the one table that config
validation (`ParallelConfig.validate`), `parallelize` and checkpoint resharding all read.

Legend: D model width, H attention heads, K kv heads, E attention head dim, I Mamba inner
width, Hs Mamba heads, G SSM groups, N SSM state, F MLP hidden width, k tensor-parallel size.

A parallelized model keeps the plain model's parameter names; a rank's tensor is its share of
the plain tensor. Most shares are one contiguous slice along one dimension. Fused tensors are
partitioned per component: Mamba's `in_proj` rows [z (I) | x (I) | B (G N) | C (G N) | dt (Hs)]
become [z_r | x_r | B_r | C_r | dt_r] on rank r, and the conv weights [x | B | C] likewise, so
that a rank's projection feeds exactly its own heads and groups. With fewer kv heads than
ranks (k a multiple of K), each rank holds a copy of the one kv head its query heads use.

Each component is divided into `Units` (heads, groups, channels): k must divide their count,
or, for units that may be replicated (kv heads), be a multiple of it. A layout that breaks
the rule is a `ValueError` naming the count and the fix. Parameters without a `TensorSplit`
(embedding, LM head, norms, gate, SRTE) are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from fusiontree.models.config import ModelConfig


def divisors_of(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Units:
    """What a component is divided into, and the error that names the fix when k does not fit."""
    count: int
    problem: Callable[[int], str]  # tensor-parallel size -> what is wrong and how to fix it
    replicable: bool = False  # k a multiple of `count`: each rank holds one whole unit

    def fits(self, tp: int) -> bool:
        return self.count % tp == 0 or (self.replicable and tp % self.count == 0)

    def check(self, tp: int) -> None:
        if not self.fits(tp):
            raise ValueError(f"parallel config: {self.problem(tp)}")


@dataclass(frozen=True)
class TensorSplit:
    """`parts`: consecutive components along `dim`, each (size, units): split evenly over the
    ranks when k divides the units, else (replicable units, k a multiple of their count) rank
    r holds whole unit r // (k // count)."""
    dim: int
    parts: tuple[tuple[int, Units], ...]

    def _split_evenly(self, units: Units, tp: int) -> bool:
        units.check(tp)
        return units.count % tp == 0

    def local_sizes(self, tp: int) -> list[int]:
        return [size // tp if self._split_evenly(units, tp) else size // units.count for size, units in self.parts]

    def full_size(self) -> int:
        return sum(size for size, _ in self.parts)

    def is_replicated(self, tp: int) -> bool:
        return any(not self._split_evenly(units, tp) for _, units in self.parts)

    def replica_set(self, tp: int, rank: int) -> tuple[int, int]:
        """(number of distinct replicas, which one rank holds), for a single replicated part."""
        (_, units), = self.parts
        return units.count, rank // (tp // units.count)

    def shard(self, full: Tensor, tp: int, rank: int) -> Tensor:
        if full.shape[self.dim] != self.full_size():
            raise ValueError(f"cannot shard a tensor of shape {tuple(full.shape)}: dimension {self.dim} should "
                             f"have {self.full_size()} entries; is the checkpoint from another model config?")
        out = []
        for piece, (size, units) in zip(full.split([s for s, _ in self.parts], self.dim), self.parts):
            if self._split_evenly(units, tp):
                out.append(piece.chunk(tp, self.dim)[rank])
            else:
                out.append(piece.chunk(units.count, self.dim)[rank // (tp // units.count)])
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
            if self._split_evenly(units, tp):
                out.extend(per_rank[r][c] for r in range(tp))
            else:  # one copy of each replicated unit: the first rank that holds it
                out.extend(per_rank[u * (tp // units.count)][c] for u in range(units.count))
        return torch.cat(out, self.dim)


def _units(cfg: ModelConfig) -> dict[str, Units]:
    H, K, Hs, G, F = cfg.n_heads, cfg.n_kv_heads, cfg.ssm_heads, cfg.ssm_groups, cfg.mlp_hidden_size
    return {
        "heads": Units(H, lambda tp: f"model.n_heads={H} is not divisible by tensor_parallel={tp}; pick "
                                     f"tensor_parallel among {divisors_of(H)}"),
        "kv_heads": Units(K, lambda tp: f"model.n_kv_heads={K} and tensor_parallel={tp}: kv heads are split when "
                                        "tensor_parallel divides them and replicated when n_kv_heads divides "
                                        f"tensor_parallel; pick tensor_parallel among {divisors_of(K)} or a "
                                        f"multiple of {K}", replicable=True),
        "ssm_heads": Units(Hs, lambda tp: f"Mamba heads (ssm_expand*d_model/ssm_head_dim = {Hs}) are not divisible "
                                          f"by tensor_parallel={tp}; pick tensor_parallel among {divisors_of(Hs)}"),
        "ssm_groups": Units(G, lambda tp: f"model.ssm_groups={G} is not divisible by tensor_parallel={tp} (each "
                                          "rank keeps whole SSM groups, B/C and the gated norm are per group); set "
                                          f"ssm_groups to a multiple of {tp} that divides the {Hs} Mamba heads"),
        "mlp": Units(F, lambda tp: f"MLP hidden size {F} is not divisible by tensor_parallel={tp}; set "
                                   f"model.mlp_hidden to a multiple of {tp}"),
    }


def tensor_parallel_splits(cfg: ModelConfig) -> dict[str, TensorSplit]:
    """Parameter name (as in `model.state_dict()`) -> how it is split. Others are replicated."""
    E, I, N, F = cfg.attn_head_dim, cfg.ssm_d_inner, cfg.ssm_state, cfg.mlp_hidden_size
    u = _units(cfg)
    H, K, Hs, G = u["heads"], u["kv_heads"], u["ssm_heads"], u["ssm_groups"]
    splits: dict[str, TensorSplit] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if cfg.has_attention:
            splits[p + "attn.wq.weight"] = TensorSplit(0, ((H.count * E, H),))
            splits[p + "attn.wk.weight"] = TensorSplit(0, ((K.count * E, K),))
            splits[p + "attn.wv.weight"] = TensorSplit(0, ((K.count * E, K),))
            splits[p + "attn.wo.weight"] = TensorSplit(1, ((H.count * E, H),))
        if cfg.has_mamba:
            GN = G.count * N
            # z and x split by head, B and C by group: a rank's heads all belong to its groups.
            splits[p + "mamba.in_proj.weight"] = TensorSplit(0, ((I, Hs), (I, Hs), (GN, G), (GN, G), (Hs.count, Hs)))
            for name in ("conv_weight", "conv_bias"):
                splits[p + "mamba." + name] = TensorSplit(0, ((I, Hs), (GN, G), (GN, G)))
            for name in ("A_log", "D", "dt_bias"):
                splits[p + "mamba." + name] = TensorSplit(0, ((Hs.count, Hs),))
            splits[p + "mamba.norm.weight"] = TensorSplit(0, ((I, G),))  # whole norm groups per rank
            splits[p + "mamba.out_proj.weight"] = TensorSplit(1, ((I, Hs),))
        splits[p + "mlp.w_gate.weight"] = TensorSplit(0, ((F, u["mlp"]),))
        splits[p + "mlp.w_up.weight"] = TensorSplit(0, ((F, u["mlp"]),))
        splits[p + "mlp.w_down.weight"] = TensorSplit(1, ((F, u["mlp"]),))
    return splits


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Every split of the table fits `tp` ranks; the first that does not raises, in table order
    (attention, Mamba, MLP)."""
    seen: set[int] = set()
    for split in tensor_parallel_splits(cfg).values():
        for _, units in split.parts:
            if id(units) not in seen:
                seen.add(id(units))
                units.check(tp)
