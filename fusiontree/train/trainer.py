"""The trainer: set up, step, evaluate, save, resume. `launch/train.py` parses the command line
and calls `run_training`.

    run_training(load_config("configs/pretrain_v1.yaml"), ds_config="configs/ds/zero2.json", resume="auto")

It reads top to bottom: `Trainer.__init__` sets up the processes, the data, the model (plain,
then parallelized and given its training mechanics from outside), the DeepSpeed engine and
the state to resume; `train_step` is one optimizer step; `Trainer.fit` is the loop;
`Trainer.finish` the end of the run. Side concerns (metrics, evaluation, gate monitor,
checkpoints) hang on the hooks of fusiontree/train/hooks.py.

A signal (SIGUSR1: Slurm's warning before the time limit; SIGTERM: preemption) finishes the
step in flight; the ranks agree on stopping through one all-reduce, save a checkpoint and
exit cleanly, and `--resume auto` continues with the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from fusiontree.checkpoint import CONFIG_FILE, CheckpointManager, load_model_weights, tokenizer_files
from fusiontree.config import RunConfig, check_resume_config, config_to_dict, dump_config, read_yaml
from fusiontree.data import build_train_loader, build_val_loaders
from fusiontree.host import cpu_count
from fusiontree.inference import generate
from fusiontree.models import HybridLanguageModel
from fusiontree.models.flops import flops_per_token as model_flops_per_token
from fusiontree.ops import resolve_kernels
from fusiontree.ops.backends.autotune import parallel_autotune_compile
from fusiontree.ops.masks import effective_window
from fusiontree.parallel.engine_state import EngineLayout
from fusiontree.parallel.reshard import consolidated_model_state, weights_stay_on_device
from fusiontree.train import autotune_warmup
from fusiontree.train.distributed import init_distributed, local_world_size, shutdown
from fusiontree.train.gate_monitor import GateMonitor
from fusiontree.train.hooks import CheckpointHook, EvalHook, GateMonitorHook, Hooks, MetricsHook, TrainContext
from fusiontree.train.losses import HybridModelLoss
from fusiontree.train.mechanics import (apply_activation_checkpointing, apply_compile, apply_cuda_graphs,
                                        compiled_tensor_parallel_error, describe_mechanics)
from fusiontree.train.metrics import MetricsSink, RankZeroMetrics, StepProfiler, device_peak_flops, memory_gib
from fusiontree.train.optim import SkippableAdamW, build_optimizer, lr_at, misaligned_parameters
from fusiontree.train.preflight import check_ds_config, check_tokenizer, refuse_existing_run
from fusiontree.train.startup import StartupClock, compile_seconds, use_compile_cache
from fusiontree.train.state import TrainState, rng_state, seed_everything, set_rng_state
from fusiontree.train.validation import validation_metrics, validation_sums

log = logging.getLogger("fusiontree.train")


# ------------------------------------------------------------------------------ set-up helpers

def setup_logging(run_dir: Path, rank: int) -> None:
    handlers = [logging.StreamHandler(sys.stderr)] if rank == 0 else []
    handlers.append(logging.FileHandler(run_dir / "logs" / f"rank{rank:03d}.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s")


def deepspeed_config(path: str, cfg: RunConfig, micro_batch_size: int, grad_accum: int, bf16: bool,
                     optimizer: SkippableAdamW | None = None) -> dict:
    """The DeepSpeed JSON with batch sizes, clipping and precision filled from the run config
    (one source of truth): a JSON that sets them differently is an error. Given the `optimizer`
    DeepSpeed will wrap, clipping is left to it where clips_in_optimizer says so."""
    ds = check_ds_config(path)
    ours = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": cfg.train.grad_clip}
    for key, value in ours.items():
        if key in ds and ds[key] != value and ds[key] != "auto":
            raise ValueError(f"{path} sets {key}={ds[key]}, but the run config implies {value}; remove it from "
                             "the DeepSpeed JSON (batch sizes come from data.*, clipping from train.grad_clip)")
    ds.pop("train_batch_size", None)
    ds.update(ours)
    if optimizer is not None and clips_in_optimizer(optimizer, cfg.train.grad_clip,
                                                    ds.get("zero_optimization", {}).get("stage", 0)):
        if ds["zero_optimization"].get("compute_grad_norm") is False:
            raise ValueError(f"{path} sets zero_optimization.compute_grad_norm=false, but train.grad_clip="
                             f"{cfg.train.grad_clip} clips by DeepSpeed's norm; remove it or set train.grad_clip=0")
        ds["gradient_clipping"] = 0.0  # the optimizer clips (by DeepSpeed's norm), see clips_in_optimizer
    # The optimizer (SkippableAdamW) decides whether a step's gradients are finite, in every
    # precision and ZeRO stage, with one multi-tensor norm; DeepSpeed's own bf16 check would run
    # six small operations per parameter and a host sync on top of it.
    ds["bf16"] = {"enabled": True, "check_grad_overflow": False} if bf16 else {"enabled": False}
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW: no C++ op to build
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def clips_in_optimizer(optimizer: SkippableAdamW, grad_clip: float, zero_stage: int) -> bool:
    """Whether the fused AdamW clips the gradients instead of DeepSpeed: with the skip decision on
    the device (train.skip_on_device) under ZeRO-1 and 2. DeepSpeed's clipping reads whether
    the norm is finite on the host, which makes every optimizer step wait for the backward to
    finish before its kernels are launched; the optimizer divides by the same clip factor inside
    its kernel instead, from the norm DeepSpeed has just computed (SkippableAdamW.follow_global_norm)."""
    return optimizer.skip_on_device and grad_clip > 0 and zero_stage in (1, 2)


def follow_deepspeed_norm(engine, optimizer: SkippableAdamW, grad_clip: float) -> bool:
    """Under ZeRO-1/2, have `optimizer` (the `engine`'s base optimizer) decide its skip by the
    global norm DeepSpeed computes each step before it steps the parameter groups one by one,
    and clip by it where clips_in_optimizer holds (SkippableAdamW.follow_global_norm). Returns
    whether the optimizer clips; other ZeRO stages are left as they are."""
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2):
        return False
    zero_optimizer = engine.optimizer  # sets _global_grad_norm before it steps the base optimizer
    if not hasattr(zero_optimizer, "_global_grad_norm"):
        raise RuntimeError(f"{type(zero_optimizer).__name__} exposes no gradient norm to follow; use ZeRO "
                           "stage 0 or 3, or report the DeepSpeed version")
    clips = clips_in_optimizer(optimizer, grad_clip, stage)
    optimizer.follow_global_norm(lambda: zero_optimizer._global_grad_norm, grad_clip if clips else 0.0)
    return clips


class StopSignal:
    """Remembers a SIGUSR1 / SIGTERM; `flag()` is this rank's as a device tensor, which the
    trainer reduces across ranks with the step's loss (one collective and one sync per step)."""

    def __init__(self):
        self.got = 0
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.got = signum

    def flag(self, device: torch.device) -> torch.Tensor:
        return torch.full((), float(self.got > 0), dtype=torch.float32, device=device)  # a fill, no host copy


# ------------------------------------------------------------------------------ the step

def train_step(engine, optimizer: SkippableAdamW, batches, loss_fn: HybridModelLoss, ctx: TrainContext,
               gate_hook: GateMonitorHook, zero_stage: int, mark=None) -> dict:
    """One optimizer step over `len(batches)` micro-batches. Returns this rank's metrics.
    `mark(phase)`, if given, is called after the first micro-batch's forward, loss, backward
    and engine step (the start-up clock of a process's first step)."""
    mark = mark or (lambda phase: None)
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
        first = i == 0
        with record_function("fusiontree.forward"):
            out = engine(ids, position_ids=pos, seq_idx=seq, collect_gate_stats=want_stats)
        if first:
            mark("first_forward")
        if want_stats:
            gate_hook.pending = out.gate_stats
        with record_function("fusiontree.loss"):
            loss, parts = loss_fn(out.logits, ids, out.gates, seq_idx_BT=seq)
        if first:
            mark("first_loss")
        if ctx.state.step + 1 in cfg.train.inject_nan_steps:
            loss = loss * float("nan")
        with record_function("fusiontree.backward"):
            engine.backward(loss)
        if first:
            mark("first_backward")
        if i == len(batches) - 1 and zero_stage == 0:
            # ZeRO-0 reports no norm of its own; gradients are reduced after the last backward.
            # Multi-tensor norms accumulated in fp32: a few launches, no fp32 copy of each gradient.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))) \
                if grads else torch.zeros((), device=device)
        with record_function("fusiontree.engine_step"):
            engine.step()
        if first:
            mark("first_engine_step")
        loss_sum += loss.detach().float()
        ce_sum += parts["ce"].float()
        tokens += ids.numel()
    # On the device (no sync: with train.skip_on_device the optimizer's decision is a tensor);
    # read with the loss at the step's end.
    skipped = optimizer.skipped_flag(device)
    if engine.skipped_steps > ds_skipped_before:
        skipped = torch.ones((), device=device)
    if grad_norm is None:
        gn = engine.get_global_grad_norm()  # a device tensor under ZeRO-1/2: kept there (no sync)
        grad_norm = gn if isinstance(gn, torch.Tensor) else torch.tensor(float("nan") if gn is None else float(gn))
    n = len(batches)
    return {"loss": loss_sum / n, "ce": ce_sum / n, "tokens": tokens, "skipped": skipped,
            "grad_norm": grad_norm.float().to(device)}


# ------------------------------------------------------------------------------ the trainer

class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: str, resume: str = "none", local_rank: int | None = None,
                 init_from: str = "", allow_config_change: tuple[str, ...] = ()):
        self.cfg = cfg
        self.clock = StartupClock()  # from the process's start: the phases until the first step ends
        self.clock.mark("imports")
        if cfg.train.compile_cache_dir:
            use_compile_cache(cfg.train.compile_cache_dir)  # before anything compiles
        self._init_processes(local_rank)
        self.clock.mark("distributed")
        # The checkpoint to resume, checked (content and config) before the data and the model
        # take their time to set up.
        self.resume_from = self._resume_checkpoint(resume, allow_config_change)
        self._init_data()
        self._start_autotune_warmup()
        self.clock.mark("data")
        self._init_model(ds_config, init_from)
        self.clock.mark("model_and_engine")
        self._init_state()
        self._init_hooks()

    def _init_processes(self, local_rank: int | None) -> None:
        cfg = self.cfg
        self.di = init_distributed(local_rank, cfg.train.device)
        if cfg.parallel.tensor_parallel > 1:
            from fusiontree.parallel import DeepSpeedMPU, init_parallel_state

            init_parallel_state(cfg.parallel)  # megatron-core tensor- and data-parallel groups
            self.mpu = DeepSpeedMPU()
            self.dp_rank, self.dp_size = self.mpu.get_data_parallel_rank(), self.mpu.get_data_parallel_world_size()
        else:
            # Data parallelism alone: every rank is a replica and DeepSpeed's own group over all
            # of them is the data-parallel group; megatron-core (seconds of import) is not loaded.
            self.mpu = None
            self.dp_rank, self.dp_size = self.di.rank, self.di.world_size
        self.run_dir = Path(cfg.out_dir)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        setup_logging(self.run_dir, self.di.rank)
        if self.di.is_main:
            log.info("resolved config:\n%s", dump_config(cfg))
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        seed_everything(cfg.seed)
        self.autotune_threads = self._init_autotune(cfg.train.autotune_compile_threads)

    def _init_autotune(self, threads: int) -> int:
        """Triton's autotunings compile their candidates on `threads` threads (-1: automatic).
        Returns the threads in use (1: Triton's own loop)."""
        if self.di.device.type != "cuda":
            if threads > 1:
                log.info("train.autotune_compile_threads=%d has no effect on %s (no Triton autotuning)",
                         threads, self.di.device.type)
            return 1
        if threads == -1:
            threads = max(1, min(8, cpu_count() // local_world_size(default=self.di.world_size)))
            try:
                parallel_autotune_compile(threads)
            except RuntimeError as e:
                log.warning("Triton autotuning compiles its candidates one by one: %s", e)
                return 1
        elif threads > 1:
            parallel_autotune_compile(threads)
        if threads > 1:
            log.info("Triton autotuning compiles its candidates on %d threads", threads)
        return max(threads, 1)

    def _start_autotune_warmup(self) -> None:
        """The SSD kernels' autotuning in a process of its own (local rank 0's), beside the model's
        build and compile; every rank's first SSD call waits for it (fusiontree.train.autotune_warmup)."""
        cfg, di = self.cfg, self.di
        reason = autotune_warmup.off_reason(cfg, di.device.type)
        if reason is not None:
            if di.device.type == "cuda":
                log.info("mamba-ssm's kernels autotune in the first step: %s", reason)
            return
        loader = self.train_loader
        spec = autotune_warmup.make_spec(cfg, str(di.device), loader.micro_batch_size, loader.seq_len,
                                         cfg.train.precision != "fp32", self.autotune_threads)
        marker, log_file = autotune_warmup.report_paths(self.run_dir)
        autotune_warmup.outcome.clear()
        proc = None
        if di.local_rank == 0:
            try:
                proc = autotune_warmup.start(spec, marker, log_file)
            except OSError as e:
                log.warning("mamba-ssm's kernels autotune in the first step: the autotuning process did not "
                            "start (%s)", e)
                with contextlib.suppress(OSError):  # the node's other ranks read it and go on
                    autotune_warmup.write_report(marker, {"ok": False, "error": f"not started: {e}"})
                return
            log.info("mamba-ssm's kernels autotune in a process of their own at %d x %d tokens (log: %s)",
                     loader.micro_batch_size, loader.seq_len, log_file)
        autotune_warmup.expect(marker, proc, log_file if di.local_rank == 0 else None)

    def _init_data(self) -> None:
        """Tokenizer, the curriculum loader of this data-parallel rank, validation loaders. The
        ranks of one tensor-parallel group read the same batches."""
        cfg = self.cfg
        self.tokenizer = check_tokenizer(cfg)
        self.train_loader = build_train_loader(cfg.data, rank=self.dp_rank, world_size=self.dp_size, seed=cfg.seed)
        self.val_loaders = build_val_loaders(cfg.data, rank=self.dp_rank, world_size=self.dp_size)

    def _init_model(self, ds_config: str, init_from: str = "") -> None:
        """The plain model (with the weights of `init_from`, a checkpoint, if given), parallelized,
        with its training mechanics, inside a DeepSpeed engine over torch's AdamW."""
        cfg, di = self.cfg, self.di
        self.kernels = resolve_kernels(cfg.kernels, di.device)
        log.info("kernels: %s", self.kernels.describe())
        warning = window_warning(cfg)
        if warning:
            log.warning(warning)
        with torch.device(di.device):  # initialised where it trains: a 7B model's fp32 init on the host takes minutes
            model = HybridLanguageModel(cfg.model, self.kernels)
        if init_from:
            log.info("initial weights from %s", load_model_weights(model, init_from))
        model.check_inputs = False  # the data pipeline already checked the ids
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and di.device.type == "cuda")
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters, precision %s, %d process(es): tensor parallel %d%s x data parallel %d",
                 cfg.model.preset, n_params / 1e6, "bf16" if self.bf16 else "fp32", di.world_size,
                 cfg.parallel.tensor_parallel, " (+ sequence parallel)" if cfg.parallel.sequence_parallel else "",
                 self.dp_size)
        if cfg.parallel.tensor_parallel > 1:
            from fusiontree.parallel import parallelize

            model = parallelize(model, cfg.parallel)
        # The plain model's names: the wrappers below rename parameters in the module.
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        if cfg.train.compile:
            if error := compiled_tensor_parallel_error(cfg.parallel.tensor_parallel, di.device.type, os.environ):
                raise ValueError(error)
            apply_compile(model, backend=cfg.train.compile_backend)  # per block, at each new length
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model, cfg.train.checkpoint_num_layers)

        import deepspeed

        self.optimizer = build_optimizer(model, cfg.train)
        log.info("optimizer: torch AdamW, %s, non-finite steps skipped by a decision read on the %s",
                 "fused" if self.optimizer.defaults.get("fused") else "multi-tensor",
                 "device" if self.optimizer.skip_on_device else "host")
        loader = self.train_loader
        ds_cfg = deepspeed_config(ds_config, cfg, loader.micro_batch_size, loader.grad_accum_steps, self.bf16,
                                  self.optimizer)
        param_names = tuple(tuple(names_by_id[id(p)] for p in g["params"]) for g in self.optimizer.param_groups)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_cfg, mpu=self.mpu)
        self.zero_stage = self.engine.zero_optimization_stage()
        if follow_deepspeed_norm(self.engine, self.optimizer, cfg.train.grad_clip):
            log.info("gradient clipping to %g: inside the fused AdamW, by DeepSpeed's norm", cfg.train.grad_clip)
        self.params_by_name = {names_by_id[id(p)]: p for p in self.engine.module.parameters()}
        if cfg.train.compile and (bad := misaligned_parameters(self.engine.module)):
            raise RuntimeError(f"compiled blocks need 16-byte aligned parameters, but DeepSpeed placed {len(bad)} "
                               f"off a 16-byte boundary (first: {bad[0]}); set train.compile=false and report the "
                               "model config")
        self.engine_layout = EngineLayout(self.zero_stage, self.dp_size, cfg.parallel.tensor_parallel, self.bf16,
                                          param_names)
        if cfg.train.cuda_graphs:
            if self.zero_stage == 3:
                raise ValueError("train.cuda_graphs=true needs parameters that stay in place, but ZeRO-3 gathers "
                                 "them anew every forward; use ZeRO 0-2 (configs/ds/zero{0,1,2}.json)")
            apply_cuda_graphs(model)  # after DeepSpeed has given the parameters their storage
        log.info("training mechanics: %s", describe_mechanics(model))
        self.loss_fn = HybridModelLoss(cfg.loss, cfg.train.compile_backend if cfg.train.compile_loss else None)

    def _resume_checkpoint(self, resume: str, allow_config_change: tuple[str, ...]) -> Path | None:
        """`resume`: none (a directory that already holds checkpoints is refused), auto (the
        latest intact checkpoint, if any) or a checkpoint directory (must be intact). A resume
        keeps the config it was saved with, but for the keys `check_resume_config` accepts
        (and those named in `allow_config_change`)."""
        cfg, di = self.cfg, self.di
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", di.rank, di.world_size,
                                      keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoint)
        if resume == "none":
            refuse_existing_run(self.run_dir)
            return None
        path = self.ckpt.resume_path(resume)
        if path is not None:
            changes = check_resume_config(read_yaml(path / CONFIG_FILE), cfg, allow_config_change, str(path))
            if changes:
                log.warning("resuming %s with changed config: %s", path, "; ".join(changes))
        return path

    def _init_state(self) -> None:
        self.state = TrainState()
        self.monitor = GateMonitor(self.cfg.model.n_layers)
        if self.resume_from is not None:
            self.resume(self.resume_from)

    def _init_hooks(self) -> None:
        cfg, di = self.cfg, self.di
        self.sink = RankZeroMetrics(self.run_dir, cfg.train.steps, config_to_dict(cfg), cfg.train.wandb_project,
                                    start_step=self.state.step) if di.is_main else MetricsSink()
        self.gate_hook = GateMonitorHook(self.monitor, cfg.train.gate_stats_every_steps)
        # The checkpoint hook runs before the metrics hook, so that a step's row carries its save's stall.
        saving = [CheckpointHook(cfg.train.checkpoint_every_steps, self.save)] if cfg.train.save_checkpoints else []
        self.hooks = Hooks([self.gate_hook, EvalHook(cfg.train.eval_every_steps, self.evaluate), *saving,
                            MetricsHook(self.sink, cfg.train.log_every_steps)])
        self.profiler = StepProfiler(self.run_dir / "profile", cfg.train.profile_steps, di.device) \
            if di.is_main else None
        self.ctx = TrainContext(cfg, self.engine, self.state, self.run_dir, di.is_main, di.device)
        self.stop = StopSignal()
        self._flops: dict[int, int] = {}  # of the plain model: a tensor-parallel module counts its share
        self.peak_flops, peak_src = device_peak_flops(di.device, cfg.train.peak_flops_per_device)
        log.info("MFU denominator: %.3g FLOP/s per device (%s)", self.peak_flops, peak_src)

    # -------------------------------------------------------------------------- evaluate, save, resume

    def evaluate(self) -> dict[str, float]:
        """Validation loss per bucket and overall, over all ranks (collective)."""
        sums = validation_sums(self.engine.module, self.val_loaders, self.loss_fn, self.di.device,
                               self.cfg.train.eval_batches, forward=self.engine)
        return validation_metrics(sums)

    def plain_model_state(self, on_device: bool = False) -> dict | None:
        """The single-device model's weights on rank 0 (collective: they may be sharded).
        `on_device`: weights that need no gathering stay views of the training tensors, for
        a caller that copies them before training goes on (an asynchronous save)."""
        return consolidated_model_state(self.engine.module, self.cfg.model, self.cfg.parallel.tensor_parallel,
                                        self.zero_stage, self.di.is_main, on_device=on_device)

    def save(self) -> str:
        """Collective: a checkpoint of the step just taken. Returns its directory."""
        cfg, state = self.cfg, self.state
        trainer = {"state": state.to_dict(), "loader": self.train_loader.state_dict(), "rng": rng_state(),
                   "gate_monitor": self.monitor.state_dict()}
        tok_file, tok_meta = tokenizer_files(self.tokenizer)
        meta = {"tokens_seen": self.train_loader.tokens_seen, "tokenizer": self.tokenizer.name,
                "tokenizer_sha256": self.tokenizer.sha256, **tok_meta, "zero_stage": self.zero_stage,
                "preset": cfg.model.preset, "engine_layout": self.engine_layout.to_dict()}
        extra = tok_file if self.di.is_main else {}
        if self.di.is_main and any(s.updates for s in self.monitor.layers):
            extra["pruning_plan.json"] = self.monitor.pruning_plan_json()
        t0 = time.perf_counter()
        model_state = self.plain_model_state(on_device=self.ckpt.async_save)
        parts = {"model_state": time.perf_counter() - t0}
        path = self.ckpt.save(self.engine, state.step, trainer, dump_config(cfg), meta, model_state,
                              extra_files=extra)
        parts.update(self.ckpt.last_save_parts)
        self.ctx.metrics.update({f"checkpoint_stall/{k}_s": v for k, v in parts.items()})
        self.ctx.metrics.update({f"checkpoint_buffers/{k}": v for k, v in self.ckpt.last_save_buffers.items()})
        if self.di.is_main:
            log.info("checkpoint %s%s; the loop waited %s", path,
                     " (writing in the background)" if self.ckpt.async_save else "",
                     ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        return str(path)

    def prepare_checkpoints(self) -> None:
        """Collective, once, after an applied step and before the first asynchronous save: the
        host buffers of the saves are allocated in the background (CheckpointManager.prepare)
        instead of by the first save, while training goes on. model.pt's weights reach a save as
        device tensors only without tensor parallelism or ZeRO-3 (consolidated_model_state);
        otherwise they arrive as host copies, which need no buffers and are not gathered here."""
        t0 = time.perf_counter()
        on_device = weights_stay_on_device(self.cfg.parallel.tensor_parallel, self.zero_stage)
        self.ckpt.prepare(self.engine, self.plain_model_state(on_device=True) if on_device else None)
        self.ctx.metrics["checkpoint_prepare_s"] = time.perf_counter() - t0
        self.ctx.metrics.update({f"checkpoint_prepare/{k}": v for k, v in self.ckpt.last_prepare.items()})

    def resume(self, path: Path) -> None:
        """Collective: engine, counters, loader position, gate statistics and RNGs of `path`."""
        trainer, _ = self.ckpt.load(self.engine, path, self.engine_layout.to_dict(), self._load_other_layout)
        self.state = TrainState.from_dict(trainer["state"])
        self.train_loader.load_state_dict(trainer["loader"])
        self.monitor.load_state_dict(trainer["gate_monitor"])
        set_rng_state(trainer["rng"])
        log.info("resumed from %s at step %d (%d tokens seen)", path, self.state.step, self.train_loader.tokens_seen)
        self.clock.mark("resume")

    def _load_other_layout(self, path: Path, saved_layout: dict) -> None:
        """Collective: the engine state of a checkpoint written under another layout (data-
        parallel size, tensor-parallel size, ZeRO stage), resharded parameter by parameter."""
        from fusiontree.checkpoint import ENGINE_TAG, safe_load
        from fusiontree.parallel.engine_state import SavedEngineState, load_engine_state

        layout = EngineLayout.from_dict(saved_layout)
        saved = SavedEngineState(path / ENGINE_TAG, layout, self.cfg.model, safe_load)
        tp_rank = self.mpu.get_model_parallel_rank() if self.mpu is not None else 0
        load_engine_state(self.engine, saved, self.cfg.model, self.cfg.parallel.tensor_parallel, tp_rank,
                          self.engine_layout.param_names, self.params_by_name)
        log.info("resharded %s: written by ZeRO-%d x data parallel %d x tensor parallel %d, now ZeRO-%d x %d x %d",
                 path, layout.zero_stage, layout.data_parallel, layout.tensor_parallel, self.zero_stage,
                 self.dp_size, self.cfg.parallel.tensor_parallel)

    # -------------------------------------------------------------------------- the loop

    def flops_per_token(self, seq_len: int) -> int:
        if seq_len not in self._flops:
            self._flops[seq_len] = model_flops_per_token(self.cfg.model, seq_len)
        return self._flops[seq_len]

    def fit(self) -> None:
        cfg, loader = self.cfg, self.train_loader
        self.engine.train()
        t_last = time.perf_counter()
        while self.state.step < cfg.train.steps:
            if self.profiler is not None:
                self.profiler.start(self.state.step + 1)
            for g in self.optimizer.param_groups:
                g["lr"] = lr_at(self.state.applied_steps, cfg.train.lr_peak, cfg.train.lr_warmup_steps,
                                cfg.train.steps, cfg.train.lr_decay, cfg.train.lr_min_ratio,
                                cfg.train.lr_decay_fraction)
            seq_len = loader.seq_len
            batches = [loader.next_batch() for _ in range(loader.grad_accum_steps)]
            # A process's first step: where its time goes, on the start-up clock (host time: the
            # compiles, autotuning and captures of the first micro-batch run synchronously).
            mark = None if self.clock.done else self.clock.mark
            m = train_step(self.engine, self.optimizer, batches, self.loss_fn, self.ctx, self.gate_hook,
                           self.zero_stage, mark)
            t_last = self._end_step(m, seq_len, t_last)
            if self.ctx.stop_requested:
                log.warning("stop requested by signal: %s at step %d, exiting",
                            "checkpoint saved" if cfg.train.save_checkpoints else
                            "no checkpoint (train.save_checkpoints=false)", self.state.step)
                break

    def _end_step(self, m: dict, seq_len: int, t_last: float) -> float:
        """Agree on the step's loss and on stopping, count it, move the token clock, run the hooks.
        Returns the time the step ended (`t_last`: when the previous one did)."""
        cfg, di, state = self.cfg, self.di, self.state
        # Loss, the skip outcome (every rank's is the same: the optimizer agreed on it) and the
        # stop signal (any rank's stops all of them: its mean is then above 0), in one reduction.
        red = torch.stack([m["loss"], m["ce"], m["skipped"], self.stop.flag(di.device)]).float()
        if dist.is_initialized() and di.world_size > 1:
            dist.all_reduce(red)
            red /= di.world_size
        loss, ce, skipped, stop_share = red.tolist()  # host sync: once per step
        stop = stop_share > 0
        if self.profiler is not None:
            self.profiler.stop(state.step + 1)
        tokens = m["tokens"] * self.dp_size
        state.step += 1
        if skipped > 0 or not math.isfinite(loss):
            state.skipped_steps += 1
            state.consecutive_bad += 1
            log.warning("step %d skipped: non-finite loss or gradients (loss %s); %d in a row, %d in total",
                        state.step, loss, state.consecutive_bad, state.skipped_steps)
        else:
            state.applied_steps += 1
            state.consecutive_bad = 0
        self.train_loader.advance(int(tokens))
        now = time.perf_counter()
        tps = tokens / (now - t_last)
        self.ctx.metrics = {
            "loss": loss, "ce": ce, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(m["grad_norm"]),
            "tokens": int(tokens), "tokens_seen": self.train_loader.tokens_seen, "tokens_per_s": tps,
            "seq_len": seq_len, "skipped_steps": state.skipped_steps,
            "mfu": (tps / di.world_size) * self.flops_per_token(seq_len) / self.peak_flops if self.peak_flops else None,
            "mem_gib": memory_gib(di.device)}
        if not self.clock.done:  # the first step of this process
            self.clock.finish()
            self.ctx.metrics.update(self.clock.metrics())
            self.ctx.metrics.update({f"startup/{k}": v for k, v in autotune_warmup.outcome.items()})
            log.info(self.clock.summary())
            if cfg.train.compile:
                compiled = compile_seconds()
                self.ctx.metrics.update(compiled)
                log.info("of which torch.compile: forward graphs %.1f s, backward graphs %.1f s",
                         compiled["startup/compile_forward_s"], compiled["startup/compile_backward_s"])
        self.ctx.stop_requested = stop
        if state.consecutive_bad >= cfg.train.max_bad_steps:
            self.ckpt.wait()  # the last good checkpoint may still be writing
            raise SystemExit(f"stopping: {state.consecutive_bad} consecutive steps with non-finite loss or "
                             f"gradients (train.max_bad_steps={cfg.train.max_bad_steps}); the last good "
                             f"checkpoint is {state.last_checkpoint or 'none (no checkpoint saved yet)'}")
        if cfg.train.save_checkpoints and self.ckpt.prepare_pending and not state.consecutive_bad:
            self.prepare_checkpoints()  # before the hooks: the step's row carries its wait
        self.hooks.on_step_end(self.ctx)
        # Evaluation and checkpoints (the hooks) are not the next step's time: their cost is
        # logged on its own (checkpoint_stall_s), and tokens_per_s stays the training speed.
        return time.perf_counter()

    # -------------------------------------------------------------------------- the end

    def finish(self) -> None:
        """Final evaluation, checkpoint and pruning plan (hooks), and a generation sample; a run
        stopped by a signal only closes its metrics."""
        cfg, di = self.cfg, self.di
        if cfg.train.compile:
            from torch._dynamo.utils import counters

            # Graph breaks are expected around the SSD and attention kernels (opaque to the compiler).
            log.info("train.compile: %d graphs compiled, %d graph breaks", counters["stats"]["unique_graphs"],
                     sum(counters["graph_break"].values()))
        if self.ctx.stop_requested:
            self.sink.close()
            return
        self.hooks.on_train_end(self.ctx)
        sharded = self.zero_stage == 3 or cfg.parallel.tensor_parallel > 1
        weights = self.plain_model_state() if sharded else None
        if di.is_main:
            model = self.engine.module
            if weights is not None:  # the weights are sharded: sample from a gathered plain copy
                model = HybridLanguageModel(cfg.model, self.kernels).to(di.device)
                model.load_state_dict(weights)
            sample = generate_sample(model, self.tokenizer, cfg)
            log.info("sample: %r", sample)
            (self.run_dir / "sample.txt").write_text(sample)


def window_warning(cfg: RunConfig) -> str | None:
    """A warning when the local layers' window covers every training length: then they attend
    like global layers throughout training, and what the window means is never learned."""
    window = cfg.model.local_window
    longest = max(s.seq_len for s in cfg.data.curriculum)
    if window is None or effective_window(window, longest) is not None:
        return None
    return (f"model.window={window} covers every training length (the longest is {longest}): the local layers "
            "attend like global ones throughout training, and generation beyond the window meets a limit the "
            f"model never saw; train on sequences longer than {window} or lower model.window")


@torch.no_grad()
def generate_sample(model: HybridLanguageModel, tokenizer, cfg: RunConfig) -> str:
    model.eval()
    ids = torch.tensor([[tokenizer.bos_id()] + tokenizer.encode(cfg.generate.prompt)],
                       device=next(model.parameters()).device)
    out = generate(model, ids, cfg.generate.max_new_tokens, temperature=cfg.generate.temperature,
                   top_k=cfg.generate.top_k, top_p=cfg.generate.top_p, eos_token_id=tokenizer.eos_id())
    return tokenizer.decode(out[0, 1:].tolist())


def run_training(cfg: RunConfig, ds_config: str, resume: str = "none", local_rank: int | None = None,
                 init_from: str = "", allow_config_change: tuple[str, ...] = ()) -> int:
    """Train `cfg` to its last step (or to a stop signal), then leave the process group.
    `init_from`: a checkpoint whose weights the run starts from (fresh optimizer and schedule);
    a checkpoint being resumed takes precedence. `allow_config_change`: config keys a resume
    may change beyond the free ones (fusiontree.config.check_resume_config)."""
    trainer = Trainer(cfg, ds_config, resume, local_rank, init_from, allow_config_change)
    trainer.fit()
    trainer.finish()
    trainer.ckpt.wait()  # an asynchronous save still writing
    shutdown()
    return 0
