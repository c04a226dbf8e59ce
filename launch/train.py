"""Train FusionTree: DeepSpeed ZeRO, length curriculum, gate monitoring, checkpoints, resume.

    deepspeed launch/train.py --ds_config configs/ds/zero2.json --config configs/pretrain_v1.yaml
    torchrun --nproc_per_node 2 launch/train.py --ds_config configs/ds/zero2.json --config ...
    python launch/train.py --config ...            (one process)

Options: --resume {none,auto,PATH}; any config field as a dotted override (--train.steps=100).
The file reads top to bottom: set-up, the step, the loop; side concerns (metrics, eval,
gate monitor, checkpoints) hang on the hooks in fusiontree/train/hooks.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusiontree.config import RunConfig, config_to_dict, dump_config, load_config  # noqa: E402
from fusiontree.data import build_train_loader, build_val_loaders, load_tokenizer  # noqa: E402
from fusiontree.models import HybridLanguageModel  # noqa: E402
from fusiontree.models.flops import flops_per_token as model_flops_per_token  # noqa: E402
from fusiontree.ops import resolve_kernels  # noqa: E402
from fusiontree.parallel import (DeepSpeedMPU, consolidate_state_dicts, init_parallel_state,  # noqa: E402
                                 parallelize)
from fusiontree.train.checkpoint import CheckpointManager  # noqa: E402
from fusiontree.train.distributed import DistInfo, init_distributed, shutdown  # noqa: E402
from fusiontree.train.gate_monitor import GateMonitor  # noqa: E402
from fusiontree.train.hooks import (CheckpointHook, EvalHook, GateMonitorHook, Hooks, MetricsHook,  # noqa: E402
                                    TrainContext, TrainState)
from fusiontree.train.losses import HybridModelLoss  # noqa: E402
from fusiontree.train.metrics import MetricsSink, RankZeroMetrics, device_peak_flops, memory_gib  # noqa: E402
from fusiontree.train.optim import SkippableAdamW, lr_at, param_groups  # noqa: E402

log = logging.getLogger("fusiontree.train")


# ------------------------------------------------------------------------------ set-up

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="run config YAML (default: the embedded defaults)")
    ap.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=str(ROOT / "configs/ds/zero2.json"),
                    help="DeepSpeed JSON (ZeRO stage and buckets; batch sizes come from the run config)")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("--resume", default="none", help="none | auto (latest valid checkpoint) | a checkpoint dir")
    ap.add_argument("--init_from", "--init-from", dest="init_from", default="",
                    help="start from the weights (model.pt) of this checkpoint or run directory, with a fresh "
                         "optimizer, schedule and data order (e.g. an import of a Hugging Face export); a "
                         "--resume checkpoint, when there is one, takes precedence")
    ap.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted from launchers
    return ap.parse_known_args(argv)


def setup_logging(run_dir: Path, rank: int) -> None:
    handlers = [logging.StreamHandler(sys.stderr)] if rank == 0 else []
    handlers.append(logging.FileHandler(run_dir / "logs" / f"rank{rank:03d}.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def deepspeed_config(path: str, cfg: RunConfig, micro_batch_size: int, grad_accum: int, bf16: bool) -> dict:
    """The DeepSpeed JSON with batch sizes, clipping and precision filled from the run config
    (one source of truth): a JSON that sets them differently is an error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--ds_config {path} does not exist; see configs/ds/zero{{0,1,2,3}}.json")
    ds = json.loads(p.read_text())
    ours = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": cfg.train.grad_clip}
    for key, value in ours.items():
        if key in ds and ds[key] != value and ds[key] != "auto":
            raise ValueError(f"{path} sets {key}={ds[key]}, but the run config implies {value}; remove it from "
                             "the DeepSpeed JSON (batch sizes come from data.*, clipping from train.grad_clip)")
    ds.pop("train_batch_size", None)
    ds.update(ours)
    ds["bf16"] = {"enabled": bf16}
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW: no C++ op to build
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def consolidated_model_state(engine, cfg: RunConfig, zero_stage: int, is_main: bool) -> dict | None:
    """The plain (single-device) model state dict on rank 0. Collective: ZeRO-3 shards the
    weights over data-parallel ranks, tensor parallelism splits them over its group."""
    module = engine.module

    def local() -> dict:
        sd = module.state_dict()
        return {k: v.detach().cpu().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = local()
    else:
        sd = local()
    tp = cfg.parallel.tensor_parallel
    if tp == 1:
        return sd if is_main else None
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank() != 0:
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [None] * tp if is_main else None
    dist.gather_object(sd, shards, dst=dist.get_process_group_ranks(group)[0], group=group)
    return consolidate_state_dicts(shards, cfg.model) if is_main else None


def load_initial_weights(model: HybridLanguageModel, path: str) -> None:
    """The weights of a checkpoint's model.pt, into the plain model (before parallelize shards it)."""
    from fusiontree.eval.loading import resolve_checkpoint
    from fusiontree.train.checkpoint import safe_load

    ckpt = resolve_checkpoint(path)
    try:
        model.load_state_dict(safe_load(ckpt / "model.pt"))
    except RuntimeError as e:
        raise ValueError(f"--init_from {path}: its weights do not fit this run's model config ({str(e)[:300]}); "
                         f"use the model section of {ckpt / 'config.yaml'}") from e
    log.info("initial weights from %s", ckpt)


# ------------------------------------------------------------------------------ the step

def train_step(engine, optimizer: SkippableAdamW, batches, loss_fn: HybridModelLoss, ctx: TrainContext,
               gate_hook: GateMonitorHook, zero_stage: int) -> dict:
    """One optimizer step over `len(batches)` micro-batches. Returns this rank's metrics."""
    cfg, device = ctx.cfg, ctx.device
    loss_sum = torch.zeros((), device=device)
    ce_sum = torch.zeros((), device=device)
    tokens = 0
    optimizer.last_step_skipped = False
    ds_skipped_before = engine.skipped_steps
    grad_norm = None
    for i, batch in enumerate(batches):
        ids = batch["input_ids"].to(device, non_blocking=True)
        pos = batch["position_ids"].to(device, non_blocking=True)
        seq = batch["seq_idx"].to(device, non_blocking=True)
        want_stats = i == 0 and gate_hook.wants_stats(ctx.state.step + 1)
        out = engine(ids, position_ids=pos, seq_idx=seq, collect_gate_stats=want_stats)
        if want_stats:
            gate_hook.pending = out.gate_stats
        loss, parts = loss_fn(out.logits, ids, out.gates, seq_idx_BT=seq)
        if ctx.state.step + 1 in cfg.train.inject_nan_steps:
            loss = loss * float("nan")
        engine.backward(loss)
        if i == len(batches) - 1 and zero_stage == 0:
            # ZeRO-0 reports no norm of its own; gradients are reduced after the last backward.
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]))
        engine.step()
        loss_sum += loss.detach().float()
        ce_sum += parts["ce"].float()
        tokens += ids.numel()
    skipped = optimizer.last_step_skipped or engine.skipped_steps > ds_skipped_before
    if grad_norm is None:
        gn = engine.get_global_grad_norm()
        grad_norm = torch.tensor(float("nan") if gn is None else float(gn))
    n = len(batches)
    return {"loss": loss_sum / n, "ce": ce_sum / n, "tokens": tokens, "skipped": skipped,
            "grad_norm": grad_norm.float().to(device)}


@torch.no_grad()
def evaluate(engine, val_loaders: dict, loss_fn: HybridModelLoss, device: torch.device, max_batches: int) -> dict:
    """Mean validation cross entropy per bucket and overall, summed over all ranks."""
    model = engine.module
    was_training = model.training
    model.eval()
    out = {}
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for name, loader in val_loaders.items():
        acc = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            ids, seq = batch["input_ids"].to(device), batch["seq_idx"].to(device)
            res = engine(ids, position_ids=batch["position_ids"].to(device), seq_idx=seq)
            _, parts = loss_fn(res.logits, ids, res.gates, seq_idx_BT=seq)
            acc += torch.stack([parts["ce"].double() * parts["tokens"], parts["tokens"].double()])
        if dist.is_initialized():
            dist.all_reduce(acc)
        if acc[1] > 0:
            out[f"val_loss/{name}"] = float(acc[0] / acc[1])
        total += acc
    if total[1] > 0:
        out["val_loss"] = float(total[0] / total[1])
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    di: DistInfo = init_distributed(args.local_rank, cfg.train.device)
    init_parallel_state(cfg.parallel)  # megatron-core tensor- and data-parallel groups
    mpu = DeepSpeedMPU()
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    run_dir = Path(cfg.out_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, di.rank)
    if di.is_main:
        log.info("resolved config:\n%s", dump_config(cfg))
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.seed)

    # data: tokenizer, the curriculum loader for this data-parallel rank, validation loaders
    tokenizer = load_tokenizer(cfg.data)
    if tokenizer.vocab_size() != cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size()} ids but model.vocab_size="
                         f"{cfg.model.vocab_size}; set --model.vocab_size={tokenizer.vocab_size()}")
    # the ranks of one tensor-parallel group read the same batches
    train_loader = build_train_loader(cfg.data, rank=dp_rank, world_size=dp_size, seed=cfg.seed)
    val_loaders = build_val_loaders(cfg.data, rank=dp_rank, world_size=dp_size)

    # model, kernels, precision
    kernels = resolve_kernels(cfg.kernels, di.device)
    log.info("kernels: %s", kernels.describe())
    model = HybridLanguageModel(cfg.model, kernels).to(di.device)
    if args.init_from:
        load_initial_weights(model, args.init_from)
    model.check_inputs = False  # the data pipeline already checked the ids
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.checkpoint_num_layers = cfg.train.checkpoint_num_layers
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and di.device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, precision %s, %d process(es): tensor parallel %d%s x data parallel %d",
             cfg.model.preset, n_params / 1e6, "bf16" if bf16 else "fp32", di.world_size,
             cfg.parallel.tensor_parallel, " (+ sequence parallel)" if cfg.parallel.sequence_parallel else "",
             dp_size)
    if cfg.parallel.tensor_parallel > 1:
        model = parallelize(model, cfg.parallel)
    if cfg.train.compile:
        model.compile_blocks()  # per block; compiled on the first step of each sequence length

    # DeepSpeed engine over torch's AdamW
    import deepspeed

    optimizer = SkippableAdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr_peak,
                               betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)
    ds_cfg = deepspeed_config(args.ds_config, cfg, train_loader.micro_batch_size, train_loader.grad_accum_steps, bf16)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg, mpu=mpu)
    zero_stage = engine.zero_optimization_stage()
    loss_fn = HybridModelLoss(cfg.loss)

    # resume
    state = TrainState()
    ckpt = CheckpointManager(run_dir / "checkpoints", di.rank, di.world_size, keep=cfg.train.keep_checkpoints)
    monitor = GateMonitor(cfg.model.n_layers)
    resume_from = ckpt.latest_valid() if args.resume == "auto" else (None if args.resume == "none" else Path(args.resume))
    if args.resume == "none" and ckpt.latest_valid() is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, "
                         "or choose a new out_dir")
    if resume_from is not None:
        trainer, meta = ckpt.load(engine, resume_from)
        state = TrainState(**trainer["state"])
        train_loader.load_state_dict(trainer["loader"])
        monitor.load_state_dict(trainer["gate_monitor"])
        set_rng_state(trainer["rng"])
        log.info("resumed from %s at step %d (%d tokens seen)", resume_from, state.step, state.tokens_seen)

    def save() -> str:
        trainer = {"state": state.to_dict(), "loader": train_loader.state_dict(), "rng": rng_state(),
                   "gate_monitor": monitor.state_dict()}
        meta = {"tokens_seen": state.tokens_seen, "tokenizer": str(cfg.data.tokenizer_path()),
                "zero_stage": zero_stage, "preset": cfg.model.preset}
        path = ckpt.save(engine, state.step, trainer, dump_config(cfg), meta,
                         consolidated_model_state(engine, cfg, zero_stage, di.is_main))
        if di.is_main:
            monitor.export_pruning_plan(path / "pruning_plan.json") if any(s.updates for s in monitor.layers) else None
            log.info("checkpoint %s", path)
        return str(path)

    # hooks
    sink = RankZeroMetrics(run_dir, cfg.train.steps, config_to_dict(cfg), cfg.train.wandb_project,
                           start_step=state.step) if di.is_main else MetricsSink()
    gate_hook = GateMonitorHook(monitor, cfg.train.gate_stats_every_steps)
    hooks = Hooks([gate_hook,
                   EvalHook(cfg.train.eval_every_steps,
                            lambda: evaluate(engine, val_loaders, loss_fn, di.device, cfg.train.eval_batches)),
                   MetricsHook(sink, cfg.train.log_every_steps),
                   CheckpointHook(cfg.train.checkpoint_every_steps, save)])
    ctx = TrainContext(cfg, engine, state, run_dir, di.is_main, di.device)

    # a signal (Slurm's warning before the time limit, or preemption) saves and exits cleanly
    stop_signal = {"got": 0}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop_signal.__setitem__("got", s))

    flops_cache: dict[int, int] = {}  # of the plain model: a tensor-parallel module counts its share

    def flops_per_token(seq_len: int) -> int:
        if seq_len not in flops_cache:
            flops_cache[seq_len] = model_flops_per_token(cfg.model, seq_len)
        return flops_cache[seq_len]

    peak_flops, peak_src = device_peak_flops(di.device, cfg.train.peak_flops_per_device)
    log.info("MFU denominator: %.3g FLOP/s per device (%s)", peak_flops, peak_src)

    engine.train()
    t_last = time.perf_counter()
    while state.step < cfg.train.steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(state.applied_steps, cfg.train.lr_peak, cfg.train.lr_warmup_steps, cfg.train.steps,
                            cfg.train.lr_decay, cfg.train.lr_min_ratio, cfg.train.lr_decay_fraction)
        seq_len = train_loader.seq_len
        batches = [train_loader.next_batch() for _ in range(train_loader.grad_accum_steps)]
        m = train_step(engine, optimizer, batches, loss_fn, ctx, gate_hook, zero_stage)

        # one small all-reduce per step: mean loss over ranks (equal within a tensor-parallel
        # group), and whether any rank got a stop signal
        red = torch.stack([m["loss"], m["ce"], torch.tensor(float(stop_signal["got"] > 0), device=di.device)]).float()
        if dist.is_initialized() and di.world_size > 1:
            flag = red[2].clone()
            dist.all_reduce(red)
            red[0:2] /= di.world_size
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            red[2] = flag
        loss, ce, stop = (float(x) for x in red.tolist())  # host sync: once per step, for logging
        tokens = m["tokens"] * dp_size
        state.step += 1
        state.tokens_seen += int(tokens)
        bad = m["skipped"] or not math.isfinite(loss)
        if bad:
            state.skipped_steps += 1
            state.consecutive_bad += 1
            log.warning("step %d skipped: non-finite loss or gradients (loss %s); %d in a row, %d in total",
                        state.step, loss, state.consecutive_bad, state.skipped_steps)
        else:
            state.applied_steps += 1
            state.consecutive_bad = 0
        train_loader.advance(int(tokens))

        now = time.perf_counter()
        dt, t_last = now - t_last, now
        tps = tokens / dt
        ctx.metrics = {"loss": loss, "ce": ce, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(m["grad_norm"]), "tokens": int(tokens), "tokens_seen": state.tokens_seen,
                       "tokens_per_s": tps, "seq_len": seq_len, "skipped_steps": state.skipped_steps,
                       "mfu": (tps / di.world_size) * flops_per_token(seq_len) / peak_flops if peak_flops else None,
                       "mem_gib": memory_gib(di.device)}
        ctx.stop_requested = stop > 0
        if state.consecutive_bad > cfg.train.max_bad_steps:
            raise SystemExit(f"stopping: {state.consecutive_bad} consecutive steps with non-finite loss or "
                             f"gradients (train.max_bad_steps={cfg.train.max_bad_steps}); the last good "
                             f"checkpoint is {state.last_checkpoint or 'none (no checkpoint saved yet)'}")
        hooks.on_step_end(ctx)
        if ctx.stop_requested:
            log.warning("stop requested by signal: checkpoint saved at step %d, exiting", state.step)
            break

    if cfg.train.compile:
        from torch._dynamo.utils import counters

        # Graph breaks are expected around the SSD and attention kernels (opaque to the compiler).
        log.info("train.compile: %d graphs compiled, %d graph breaks", counters["stats"]["unique_graphs"],
                 sum(counters["graph_break"].values()))
    if not ctx.stop_requested:
        hooks.on_train_end(ctx)
        sharded = zero_stage == 3 or cfg.parallel.tensor_parallel > 1
        weights = consolidated_model_state(engine, cfg, zero_stage, di.is_main) if sharded else None
        if di.is_main:
            model = engine.module
            if weights is not None:  # the weights are sharded: sample from a gathered plain copy
                model = HybridLanguageModel(cfg.model, kernels).to(di.device)
                model.load_state_dict(weights)
            sample = generate_sample(model, tokenizer, cfg)
            log.info("sample: %r", sample)
            (run_dir / "sample.txt").write_text(sample)
    else:
        sink.close()
    shutdown()
    return 0


@torch.no_grad()
def generate_sample(model: HybridLanguageModel, tokenizer, cfg: RunConfig) -> str:
    model.eval()
    ids = torch.tensor([[tokenizer.bos_id()] + tokenizer.encode(cfg.generate.prompt)],
                       device=next(model.parameters()).device)
    out = model.generate(ids, cfg.generate.max_new_tokens, temperature=cfg.generate.temperature,
                         top_k=cfg.generate.top_k, top_p=cfg.generate.top_p, eos_token_id=tokenizer.eos_id())
    return tokenizer.decode(out[0, 1:].tolist())


if __name__ == "__main__":
    sys.exit(main())
