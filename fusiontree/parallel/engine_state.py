"""A DeepSpeed engine's training state carried across parallel layouts: a checkpoint written
by one (data-parallel size, tensor-parallel size, ZeRO stage) resumes under another.

DeepSpeed's own loader reads a checkpoint only under the layout that wrote it: ZeRO splits
the fp32 master weights and the Adam moments into one flat partition per data-parallel
rank, and tensor parallelism splits each tensor over its group. Here the saved files are
read back per parameter instead, and written into a freshly built engine of any layout:

    saved = SavedEngineState(ckpt / "engine", layout, model_cfg, load)   # the checkpoint's layout
    load_engine_state(engine, saved, model_cfg, tp, tp_rank, param_names, params)

`SavedEngineState.full(name)` gives a parameter's plain (TP=1) fp32 master weight and Adam
moments: for each saved tensor-parallel rank, the rank's tensor is put together from the
data-parallel partitions of DeepSpeed's files (ZeRO-1/2: the slice of each rank's flat
partition that DeepSpeed records per parameter; ZeRO-3: ceil(numel / dp) elements of each
rank's flat groups, in parameter order; ZeRO-0: the module and torch's optimizer state),
then the ranks' tensors are consolidated by the split table (fusiontree.models.splits),
as the weights of model.pt are. `load_engine_state` shards each parameter for the new
tensor-parallel rank and hands it to DeepSpeed's per-parameter setters
(`deepspeed.utils.safe_set_full_*`), which put each data-parallel rank's fragment in place
whatever the new partitioning is. Files are memory-mapped and read one parameter at a time,
so no rank holds more than a few full parameters at once.

What it relies on from DeepSpeed (tested end to end by resuming 2 -> 1 and 1 -> 2 processes
for ZeRO 0-3 and TP=2 -> 1, tests/train/test_resume_layouts.py): the file names of
`engine.save_checkpoint`, the keys `param_slice_mappings`, `single_partition_of_fp32_groups`,
`base_optimizer_state` (ZeRO-1/2), `fp32_flat_groups`, `optimizer_state_dict` and
`param_shapes` (ZeRO-3), and, to create the optimizer state a fresh engine does not have
before its first step, the base optimizer's flat parameters (`single_partition_of_fp32_groups`,
`fp32_partitioned_groups_flat`). Runs in bf16 with ZeRO-0 use DeepSpeed's BF16 optimizer,
which shards like ZeRO-1 in files of another name: resuming those on another layout is
refused with the reason.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from fusiontree.models.config import ModelConfig
from fusiontree.parallel.reshard import consolidate_state_dicts, shard_state_dict

KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the master weight and AdamW's moments


@dataclass(frozen=True)
class EngineLayout:
    """How a run's engine state is split: by data-parallel rank (ZeRO 1-3) and by tensor-
    parallel rank. `param_names`: the optimizer's parameter groups, names in optimizer order."""
    zero_stage: int
    data_parallel: int
    tensor_parallel: int
    bf16: bool
    param_names: tuple[tuple[str, ...], ...]

    def to_dict(self) -> dict:
        return {"zero_stage": self.zero_stage, "data_parallel": self.data_parallel,
                "tensor_parallel": self.tensor_parallel, "bf16": self.bf16,
                "param_names": [list(g) for g in self.param_names]}

    @classmethod
    def from_dict(cls, d: dict) -> EngineLayout:
        return cls(int(d["zero_stage"]), int(d["data_parallel"]), int(d["tensor_parallel"]), bool(d["bf16"]),
                   tuple(tuple(g) for g in d["param_names"]))

    def same_partitioning(self, other: EngineLayout) -> bool:
        """Whether DeepSpeed's own loader can read one's files under the other."""
        return (self.zero_stage, self.data_parallel, self.tensor_parallel, self.bf16) == \
            (other.zero_stage, other.data_parallel, other.tensor_parallel, other.bf16)


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[tuple[str, ...], ...]:
    """The names of the optimizer's parameters, group by group (before DeepSpeed flattens them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return tuple(tuple(names[id(p)] for p in g["params"]) for g in optimizer.param_groups)


Loader = Callable[..., dict]  # torch.load with the checkpoint's safety rules: (path, mmap=bool) -> object


class _TensorParallelRank:
    """The state of one saved tensor-parallel rank, over all its data-parallel partitions."""

    def __init__(self, engine_dir: Path, layout: EngineLayout, tp_rank: int, load: Loader):
        def _load(path: Path) -> dict:
            # Memory-mapped when in torch's zip format (DeepSpeed's default): only the
            # parameters read are paged in.
            if not path.is_file():
                raise ValueError(f"{path} is missing: the checkpoint's engine files are incomplete")
            return load(path, mmap=zipfile.is_zipfile(path))

        self.layout, self.names = layout, [n for g in layout.param_names for n in g]
        dp, stage = layout.data_parallel, layout.zero_stage
        mp = f"mp_rank_{tp_rank:02d}"
        if stage == 0:
            if layout.bf16:
                raise ValueError("this checkpoint was written in bf16 under ZeRO-0, whose optimizer state DeepSpeed "
                                 "shards in its own format; resume it with its own layout (data-parallel size "
                                 f"{dp}, tensor_parallel={layout.tensor_parallel}), or train in bf16 with ZeRO 1-3")
            sd = _load(engine_dir / f"{mp}_model_states.pt")
            self.module, opt = sd["module"], sd["optimizer"]
            index = [i for g in opt["param_groups"] for i in g["params"]]
            if len(index) != len(self.names):
                raise ValueError(f"{engine_dir}: the optimizer holds {len(index)} parameters, the checkpoint's "
                                 f"meta.json names {len(self.names)}")
            self.state = {n: opt["state"][i] for n, i in zip(self.names, index)}
            first = next(iter(self.state.values()), {})
            self.step = float(first.get("step", 0))
            counters = sd
        elif stage in (1, 2):
            self.parts = [_load(engine_dir / f"zero_pp_rank_{d}_{mp}_optim_states.pt")["optimizer_state_dict"]
                          for d in range(dp)]
            counters = _load(engine_dir / f"{mp}_model_states.pt")
            self.group_of = {n: g for g, names in enumerate(layout.param_names) for n in names}
            self.step = float(self.parts[0]["base_optimizer_state"]["state"][0]["step"])
        elif stage == 3:
            files = [_load(engine_dir / f"zero_pp_rank_{d}_{mp}_optim_states.pt")["optimizer_state_dict"]
                     for d in range(dp)]
            counters = _load(engine_dir / f"zero_pp_rank_0_{mp}_model_states.pt")
            shapes = {n: s for g in counters["param_shapes"] for n, s in g.items()}
            self.flat = {"fp32": [torch.cat(list(f["fp32_flat_groups"])) for f in files]}
            for key in KEYS[1:]:
                self.flat[key] = [torch.cat([f["optimizer_state_dict"]["state"][i][key]
                                             for i in sorted(f["optimizer_state_dict"]["state"])]) for f in files]
            self.offset, off = {}, 0
            for name, shape in shapes.items():  # in DeepSpeed's order: each takes ceil(numel / dp) per rank
                numel = math.prod(shape)
                self.offset[name] = (off, numel, tuple(shape))
                off += math.ceil(numel / dp)
            self.step = float(files[0]["optimizer_state_dict"]["state"][0]["step"])
        else:
            raise ValueError(f"unknown ZeRO stage {stage} in the checkpoint's meta.json")
        self.counters = {k: counters.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}

    def local(self, name: str, key: str, shape: tuple[int, ...]) -> Tensor:
        """This tensor-parallel rank's full `key` tensor of parameter `name` (of `shape`)."""
        stage = self.layout.zero_stage
        if stage == 0:
            t = self.module[name] if key == "fp32" else self.state[name][key]
            return t.float().reshape(shape)
        if stage in (1, 2):
            g, pieces = self.group_of[name], []
            for part in self.parts:  # the rank order is the order of the fragments in the flat group
                where = part["param_slice_mappings"][g].get(name)
                if where is None:
                    continue
                flat = part["single_partition_of_fp32_groups"][g] if key == "fp32" else \
                    part["base_optimizer_state"]["state"][g][key]
                pieces.append(flat.narrow(0, where.start, where.numel))
            full = torch.cat(pieces)
        else:
            off, numel, saved_shape = self.offset[name]
            per_rank = math.ceil(numel / self.layout.data_parallel)
            full = torch.cat([f.narrow(0, off, per_rank) for f in self.flat[key]])[:numel]
            shape = saved_shape if math.prod(saved_shape) == math.prod(shape) else shape
        if full.numel() != math.prod(shape):
            raise ValueError(f"the checkpoint holds {full.numel()} values of {name}'s {key}, its shape {shape} has "
                             f"{math.prod(shape)}; the engine files do not belong to this model")
        return full.float().reshape(shape)


class SavedEngineState:
    """The engine state of a checkpoint, readable one parameter at a time under any layout."""

    def __init__(self, engine_dir: str | Path, layout: EngineLayout, cfg: ModelConfig, load: Loader):
        self.layout, self.cfg = layout, cfg
        engine_dir = Path(engine_dir)
        self.ranks = [_TensorParallelRank(engine_dir, layout, t, load) for t in range(layout.tensor_parallel)]
        self.step = self.ranks[0].step
        self.counters = self.ranks[0].counters
        with torch.device("meta"):
            from fusiontree.models import HybridLanguageModel

            plain = HybridLanguageModel(cfg)
        self.plain_shapes = {n: tuple(p.shape) for n, p in plain.named_parameters()}
        self.tp_shapes = [{n: tuple(t.shape) for n, t in shard_state_dict(
            {n: torch.empty(s, device="meta") for n, s in self.plain_shapes.items()}, cfg,
            layout.tensor_parallel, r).items()} for r in range(layout.tensor_parallel)]
        names = [n for g in layout.param_names for n in g]
        if sorted(names) != sorted(self.plain_shapes):
            raise ValueError(f"{engine_dir}: the checkpoint's parameters are not those of this model config "
                             f"(differing: {sorted(set(names) ^ set(self.plain_shapes))[:4]})")

    def full(self, name: str) -> dict[str, Tensor]:
        """Parameter `name`'s plain (TP=1) fp32 master weight and Adam moments."""
        out = {}
        for key in KEYS:
            shards = [{name: r.local(name, key, self.tp_shapes[t][name])} for t, r in enumerate(self.ranks)]
            out[key] = consolidate_state_dicts(shards, self.cfg)[name]
        return out


def _create_flat_states(base: torch.optim.Optimizer, flats: list[Tensor], step: float) -> None:
    """AdamW's state for DeepSpeed's flat fp32 partitions, which a fresh engine creates only in
    its first step; the values are set parameter by parameter afterwards."""
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                            "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}


def load_engine_state(engine, saved: SavedEngineState, cfg: ModelConfig, tensor_parallel: int, tp_rank: int,
                      param_names: tuple[tuple[str, ...], ...], params: dict[str, torch.nn.Parameter]) -> None:
    """Collective (ZeRO-3 gathers each parameter to set it). Put `saved` into `engine`, a
    freshly built DeepSpeed engine of any layout, before its first step: module weights, fp32
    master weights, Adam moments and step counts, DeepSpeed's step counters. `params`: the
    engine's parameters by their plain model's names (wrappers such as torch.compile's or
    activation checkpointing's rename them in the module)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    if stage in (1, 2):
        _create_flat_states(opt.optimizer, list(opt.single_partition_of_fp32_groups), saved.step)
        opt._lazy_init_hp_params_optimizer_state()
    elif stage == 3:
        _create_flat_states(opt.optimizer, list(opt.fp32_partitioned_groups_flat), saved.step)
    elif engine.bfloat16_enabled():
        raise ValueError("resuming on another layout needs ZeRO 1-3 in bf16 (DeepSpeed's BF16 optimizer of ZeRO-0 "
                         "keeps its own partitioning); use configs/ds/zero1.json or the checkpoint's layout")
    torch_state = {}
    for name in [n for g in param_names for n in g]:
        full = saved.full(name)
        local = {k: shard_state_dict({name: v}, cfg, tensor_parallel, tp_rank)[name] for k, v in full.items()}
        p = params[name]
        if stage == 0:
            with torch.no_grad():
                p.copy_(local["fp32"].to(p.dtype))
            torch_state[p] = {"step": torch.tensor(saved.step, dtype=torch.float32),
                              "exp_avg": local["exp_avg"].to(p.device), "exp_avg_sq": local["exp_avg_sq"].to(p.device)}
            continue
        device = p.device
        safe_set_full_fp32_param(p, local["fp32"].to(device))
        for key in KEYS[1:]:
            safe_set_full_optimizer_state(p, local[key].to(device), key)
        if stage == 3:
            import deepspeed

            # The module's own (partitioned) copy: set on the gathered parameter, re-partitioned on exit.
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                with torch.no_grad():
                    p.copy_(local["fp32"].to(p.dtype))
        else:
            with torch.no_grad():
                p.copy_(local["fp32"].to(p.dtype))
    if stage == 0:
        opt.state.update(torch_state)
    for key, value in saved.counters.items():
        if value is not None and hasattr(engine, key):
            setattr(engine, key, value)
