"""Scenarios that run inside spawned ranks: parallel model == single-device model.

Legend: B batch, T time, V vocabulary, k tensor-parallel size.

Each rank builds the same plain model and computes the single-device reference itself (the
model is tiny), then the parallel run, and compares locally. A scenario returns a Report of
mismatches (none = pass) instead of raising at the first one, so every rank reaches the same
collectives and the next scenario can run; an exception ends the rank (its peers then fail
in their next collective), and the harness reports the scenarios that did not run.

Device and precision: CPU + gloo unless GPUs are present (or FT_PARALLEL_DEVICE=cuda), then
NCCL, one GPU per rank, through megatron-core's own mappings. FT_PARALLEL_DTYPE=bf16 casts
the models (both sides) to bf16 and loosens the tolerances to bf16 round-off.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from fusiontree.config import LossConfig, ParallelConfig
from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from fusiontree.models.layers import cast_model
from fusiontree.ops import reference_kernels
from fusiontree.parallel import (DeepSpeedMPU, consolidate_state_dicts, destroy_parallel_state, init_parallel_state,
                                 parallelize, sequence_parallel_params, shard_state_dict)
from fusiontree.inference import generate
from fusiontree.train.losses import HybridModelLoss
from fusiontree.train.mechanics import apply_activation_checkpointing

# Per-tensor error bounds, (max |got - want| / max |want|, ||got - want|| / ||want||). fp32:
# round-off of differently ordered sums (observed <= 1e-5 on CPU and H100). bf16: both sides round to
# 8 mantissa bits in different places (bf16 all-reduces too), which makes small gradient
# tensors noisy (observed up to 9e-2 on CPU and H100, on a 4-element shard of Mamba's D). Wrong
# shards, a missing or doubled reduction give errors of order 1; the fp32 run is the tight one.
TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (0.3, 0.15)}
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
# Weights after a few AdamW steps: Adam divides by sqrt(v), so an element whose gradient is
# near zero carries its gradient's round-off into the update at full lr scale (observed 2e-4
# max, 9e-6 norm; a missing gradient all-reduce gives 0.7).
TRAINED_TOLERANCE = (2e-3, 1e-4)
B, T = 2, 32  # T > window (16) and two SSD chunks (16); T / 2 per rank under sequence parallelism
LR = 1e-2
STEPS = 3


@dataclasses.dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype_name == "bf16" else torch.float32


def model_cfg(**overrides):
    # The debug preset with two SSM groups, so that two ranks each keep one.
    return dataclasses.replace(model_preset("debug"), ssm_groups=2, **overrides)


def build_plain(cfg, ctx: Ctx, seed: int = 0) -> HybridLanguageModel:
    torch.manual_seed(seed)
    model = HybridLanguageModel(cfg, reference_kernels())
    # Move every parameter off its initial value: the per-token gate's up-projection and the
    # SRTE projection start at zero and would hide mistakes in their paths.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.std() if p.numel() > 1 and p.std() > 0 else torch.tensor(1.0)
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * scale)
    cast_model(model, ctx.dtype)
    return model.to(ctx.device)


def batch(cfg, ctx: Ctx, seed: int, packed: bool = False) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    out = {"input_ids": torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(ctx.device)}
    if packed:  # two documents in row 0, three in row 1: seq_idx restarts positions, conv and SSM
        seq = torch.zeros(B, T, dtype=torch.long)
        seq[0, 11:] = 1
        seq[1, 7:] = 1
        seq[1, 23:] = 2
        out["seq_idx"] = seq.to(ctx.device)
    return out


LOSS = HybridModelLoss(LossConfig(gate_reg="entropy", gate_reg_weight=0.1))  # a visible gate term


def forward_loss(model, b: dict, rows: slice = slice(None)):
    b = {k: v[rows] for k, v in b.items()}
    out = model(**b)
    loss, _ = LOSS(out.logits, b["input_ids"], out.gates, seq_idx_BT=b.get("seq_idx"))
    return out, loss


def rel_errs(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        return float("inf"), float("inf")
    diff = got - want
    return (float(diff.abs().max() / want.abs().max().clamp(min=1e-12)),
            float(diff.norm() / want.norm().clamp(min=1e-12)))


class Report:
    def __init__(self, ctx: Ctx):
        self.ctx, self.errors, self.worst = ctx, [], {}

    def close(self, name: str, got, want, tol: float | tuple[float, float] | None = None) -> None:
        """`tol`: (max, norm) bounds, or one bound for both; default: TOLERANCE of the dtype."""
        tol = TOLERANCE[self.ctx.dtype_name] if tol is None else tol
        max_tol, norm_tol = tol if isinstance(tol, tuple) else (tol, tol)
        got = got if isinstance(got, torch.Tensor) else torch.as_tensor(got)
        want = want if isinstance(want, torch.Tensor) else torch.as_tensor(want)
        err_max, err_norm = rel_errs(got, want)
        kind = name.split("[")[0]
        w = self.worst.get(kind, (0.0, 0.0))
        self.worst[kind] = (max(w[0], err_max), max(w[1], err_norm))
        if not (err_max <= max_tol and err_norm <= norm_tol):
            shapes = f" (shapes {tuple(got.shape)} vs {tuple(want.shape)})" if err_max == float("inf") else ""
            self.errors.append(f"rank {self.ctx.rank}: {name}: relative error max {err_max:.2e} (bound {max_tol:.0e}), "
                               f"norm {err_norm:.2e} (bound {norm_tol:.0e}){shapes}")

    def check(self, ok: bool, msg: str) -> None:
        if not ok:
            self.errors.append(f"rank {self.ctx.rank}: {msg}")


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


def gather_objects(obj, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def average_grads(model, group) -> None:
    """Plain data parallelism for the torch-optimizer runs (DeepSpeed does this itself)."""
    n = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(n)


def compare_model_grads(rep: Report, cfg, ref, par, tp: int, tp_rank: int, tp_group) -> None:
    """Every rank's local gradients vs its share of the reference's, and the gathered
    (consolidated) gradients vs the reference's, name by name."""
    ref_g, par_g = grads_of(ref), grads_of(par)
    rep.check(set(ref_g) == set(par_g), f"gradient sets differ: {sorted(set(ref_g) ^ set(par_g))}")
    mine = shard_state_dict(ref_g, cfg, tp, tp_rank)
    for name in sorted(par_g):
        rep.close(f"grad[{name}]", par_g[name], mine[name])
    gathered = consolidate_state_dicts(gather_objects(par_g, tp_group), cfg) if tp > 1 else par_g
    for name in sorted(ref_g):
        rep.close(f"gathered-grad[{name}]", gathered.get(name, torch.empty(0)), ref_g[name])


def compare_forward(rep: Report, out_par, loss_par, out_ref, loss_ref, rows: slice = slice(None)) -> None:
    rep.close("logits", out_par.logits, out_ref.logits[rows])
    rep.close("loss", loss_par, loss_ref, LOSS_TOLERANCE[rep.ctx.dtype_name])
    for i, (gp, gr) in enumerate(zip(out_par.gates, out_ref.gates)):
        if gr is not None:
            rep.close(f"gate[{i}]", gp, gr if gr.ndim == 1 else gr[rows])


def train_losses(model, cfg, ctx: Ctx, rows: slice = slice(None), dp_group=None, packed=False,
                 grad_norms: list[float] | None = None) -> list[float]:
    """The losses of STEPS AdamW steps; `grad_norms`: gets each step's global gradient norm."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, loss = forward_loss(model, batch(cfg, ctx, 100 + step, packed), rows)
        loss.backward()
        if dp_group is not None:
            average_grads(model, dp_group)
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=dp_group)
            loss /= dist.get_world_size(dp_group)
        if grad_norms is not None:
            grad_norms.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]))))
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def compare_losses(rep: Report, got: list[float], want: list[float]) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        rep.close(f"step-loss[{i}]", torch.tensor(a), torch.tensor(b), LOSS_TOLERANCE[rep.ctx.dtype_name])


# ---------------------------------------------------------------------------- scenarios


def tensor_parallel_equality(ctx: Ctx, tp: int, sp: bool, packed: bool = False, checkpointing: bool = False,
                             **model_overrides) -> Report:
    """TP (x DP when world > tp): forward, loss, gates, every gradient, then optimizer steps.
    `checkpointing`: both models recompute their blocks in the backward (the parallel one
    re-runs its collectives there)."""
    rep = Report(ctx)
    cfg = model_cfg(**model_overrides)
    pcfg = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp)
    init_parallel_state(pcfg)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    rows = slice(dp_rank * (B // dp), (dp_rank + 1) * (B // dp))
    ref = build_plain(cfg, ctx)
    par = parallelize(build_plain(cfg, ctx), pcfg) if tp > 1 else build_plain(cfg, ctx)
    if checkpointing:
        apply_activation_checkpointing(ref)
        apply_activation_checkpointing(par)
    if sp:
        n_sync = len(sequence_parallel_params(par))
        rep.check(n_sync > 0, "sequence parallelism registered no gradient all-reduce hooks")
    b = batch(cfg, ctx, 0, packed)
    out_ref, loss_ref = forward_loss(ref, b)
    loss_ref.backward()
    out_par, loss_par = forward_loss(par, b, rows)
    loss_par.backward()
    if dp > 1:
        average_grads(par, dp_group)
        loss_par = loss_par.detach().clone()
        dist.all_reduce(loss_par, group=dp_group)
        loss_par /= dp
    compare_forward(rep, out_par, loss_par, out_ref, loss_ref, rows)
    compare_model_grads(rep, cfg, ref, par, tp, ps.get_tensor_model_parallel_rank(), tp_group)
    ref_losses = train_losses(ref, cfg, ctx, packed=packed)
    par_losses = train_losses(par, cfg, ctx, rows, dp_group if dp > 1 else None, packed)
    compare_losses(rep, par_losses, ref_losses)
    destroy_parallel_state()
    return rep


def reshard_round_trip(ctx: Ctx) -> Report:
    """TP=2 weights -> consolidated TP=1 -> plain model (same logits) -> sharded again (the
    same tensors) -> a fresh TP=2 model (same logits)."""
    rep = Report(ctx)
    cfg = model_cfg(gate="token", n_kv_heads=1)  # kv heads replicated: the harder layout
    pcfg = ParallelConfig(tensor_parallel=2, sequence_parallel=True)
    init_parallel_state(pcfg)
    rank = ps.get_tensor_model_parallel_rank()
    par = parallelize(build_plain(cfg, ctx, seed=3), pcfg)
    train_losses(par, cfg, ctx)  # trained weights: every shard and replica has moved
    local = {k: v.detach().cpu().clone() for k, v in par.state_dict().items() if torch.is_tensor(v)}
    plain_sd = consolidate_state_dicts(gather_objects(local, ps.get_tensor_model_parallel_group()), cfg)
    plain = build_plain(cfg, ctx, seed=7)
    plain.load_state_dict(plain_sd, strict=True)
    b = batch(cfg, ctx, 5)
    with torch.no_grad():
        want = par(**b).logits
        rep.close("consolidated-logits", plain(**b).logits, want)
    again = shard_state_dict(plain_sd, cfg, 2, rank)
    rep.check(set(again) == set(local), f"resharded keys differ: {sorted(set(again) ^ set(local))}")
    for k in sorted(set(again) & set(local)):
        rep.check(torch.equal(again[k], local[k]), f"resharded {k} differs from the rank's own tensor")
    fresh = parallelize(build_plain(cfg, ctx, seed=11), pcfg)
    fresh.load_state_dict(again, strict=True)
    with torch.no_grad():
        rep.close("reloaded-logits", fresh(**b).logits, want)
    destroy_parallel_state()
    return rep


def generation(ctx: Ctx) -> Report:
    """Cached greedy generation under TP=2 gives the TP=1 tokens (left-padded prompts)."""
    rep = Report(ctx)
    cfg = model_cfg(gate="token")
    pcfg = ParallelConfig(tensor_parallel=2)
    init_parallel_state(pcfg)
    ref = build_plain(cfg, ctx, seed=5).eval()
    par = parallelize(build_plain(cfg, ctx, seed=5), pcfg).eval()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=g).to(ctx.device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1: a shorter prompt, left-padded
    want = generate(ref, ids, 24, attention_mask=mask)
    got = generate(par, ids, 24, attention_mask=mask)
    rep.check(torch.equal(got, want), f"TP=2 tokens {got.tolist()} != TP=1 tokens {want.tolist()}")
    kv, ms = par.allocate_inference_cache(2, 36)
    rep.check(kv.layers[0].k_BSKD.shape[2] == cfg.n_kv_heads // 2, "the KV cache does not hold the rank's kv heads")
    rep.check(ms.layers[0].ssm_BHPN.shape[1] == cfg.ssm_heads // 2, "the SSM state does not hold the rank's heads")
    destroy_parallel_state()
    return rep


def deepspeed_equality(ctx: Ctx, tp: int, sp: bool, zero_stage: int) -> Report:
    """deepspeed.initialize(mpu=DeepSpeedMPU()) with ZeRO over the data-parallel group only:
    the same losses, global gradient norms (which a uniform gradient-scale error, a sum for a
    mean over ranks, changes while AdamW's update hides it) and trained weights as a single-
    device torch AdamW run on the global batch."""
    import deepspeed

    rep = Report(ctx)
    cfg = model_cfg(gate="token")
    pcfg = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp)
    init_parallel_state(pcfg)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * (B // dp), (dp_rank + 1) * (B // dp))
    ref = build_plain(cfg, ctx)
    ref_norms: list[float] = []
    ref_losses = train_losses(ref, cfg, ctx, grad_norms=ref_norms)
    model = parallelize(build_plain(cfg, ctx), pcfg)
    ds_config = {"train_micro_batch_size_per_gpu": B // dp, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": 1 << 20},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
                 "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                           config=ds_config, mpu=DeepSpeedMPU())
    rep.check(engine.dp_world_size == dp, f"DeepSpeed sees data-parallel size {engine.dp_world_size}, want {dp}")
    losses = []
    for step in range(STEPS):
        _, loss = forward_loss(engine, batch(cfg, ctx, 100 + step), rows)
        engine.backward(loss)
        engine.step()
        rep.close(f"grad-norm[{step}]", torch.tensor(float(engine.get_global_grad_norm())), torch.tensor(ref_norms[step]))
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=ps.get_data_parallel_group())
        losses.append(float(mean / dp))
    compare_losses(rep, losses, ref_losses)
    local = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
    trained = consolidate_state_dicts(gather_objects(local, ps.get_tensor_model_parallel_group()), cfg)
    for name, want in ref.state_dict().items():
        rep.close(f"trained-weight[{name}]", trained[name], want, TRAINED_TOLERANCE)
    engine.destroy()
    destroy_parallel_state()
    return rep


# name -> (processes, fp32 only, fn)
SCENARIOS = {
    "tp2-channel": (2, False, lambda c: tensor_parallel_equality(c, 2, sp=False)),
    "tp2-sp-channel": (2, False, lambda c: tensor_parallel_equality(c, 2, sp=True)),
    "tp2-token": (2, False, lambda c: tensor_parallel_equality(c, 2, sp=False, gate="token")),
    "tp2-sp-token-packed-kvrep": (2, False, lambda c: tensor_parallel_equality(
        c, 2, sp=True, packed=True, gate="token", n_kv_heads=1)),
    "tp2-serial": (2, False, lambda c: tensor_parallel_equality(c, 2, sp=False, block="serial")),
    "tp2-sp-serial": (2, False, lambda c: tensor_parallel_equality(c, 2, sp=True, block="serial")),
    "tp2-sp-checkpointed": (2, False, lambda c: tensor_parallel_equality(c, 2, sp=True, checkpointing=True,
                                                                         gate="token")),
    "dp2": (2, False, lambda c: tensor_parallel_equality(c, 1, sp=False, gate="token")),
    "reshard": (2, False, reshard_round_trip),
    "generate": (2, False, generation),
    "deepspeed-tp2-zero2": (2, True, lambda c: deepspeed_equality(c, 2, sp=True, zero_stage=2)),
    "tp2xdp2-sp-token": (4, False, lambda c: tensor_parallel_equality(c, 2, sp=True, gate="token")),
    "deepspeed-tp2xdp2-zero1": (4, True, lambda c: deepspeed_equality(c, 2, sp=True, zero_stage=1)),
}


def run_rank(rank: int, world: int, port: int, names: list[str], out_dir: str, device: str, dtype_name: str) -> None:
    """Entry point of one spawned rank: runs `names` in order, writes results_<rank>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two cores shared by all ranks (and other jobs)
    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
        torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                            **({"device_id": dev} if device == "cuda" else {}))
    ctx = Ctx(rank, world, dev, dtype_name)
    results = {}
    path = Path(out_dir) / f"results_{rank}.json"

    def save():
        path.write_text(json.dumps(results))

    for name in names:
        t0 = time.perf_counter()
        try:
            rep = SCENARIOS[name][2](ctx)
        except Exception:
            results[name] = {"ok": False, "errors": [f"rank {rank} raised:\n{traceback.format_exc()}"],
                             "seconds": time.perf_counter() - t0}
            save()
            os._exit(1)  # peers fail in their next collective; the harness reports the rest as not run
        results[name] = {"ok": not rep.errors, "errors": rep.errors[:20], "worst": rep.worst,
                         "seconds": time.perf_counter() - t0}
        save()
    dist.barrier()
    dist.destroy_process_group()
