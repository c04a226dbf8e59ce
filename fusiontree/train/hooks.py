"""The side concerns of the training loop, each behind one named hook.

The trainer (fusiontree/train/trainer.py) calls `hooks.on_step_end(ctx)` after every optimizer step and
`hooks.on_train_end(ctx)` once at the end; each hook decides from `ctx.state.step` whether it
has work to do. `TrainContext` carries what they read (the engine, the run directory, the
counters); hooks never change the training math.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fusiontree.train.gate_monitor import GateMonitor
from fusiontree.train.state import TrainState

log = logging.getLogger("fusiontree.train")


@dataclass
class TrainContext:
    cfg: Any  # RunConfig
    engine: Any
    state: TrainState
    run_dir: Path
    is_main: bool
    device: torch.device
    metrics: dict = field(default_factory=dict)  # this step's metrics (rank 0 logs them)
    stop_requested: bool = False


class Hook:
    def on_step_end(self, ctx: TrainContext) -> None:
        pass

    def on_train_end(self, ctx: TrainContext) -> None:
        pass


class Hooks:
    def __init__(self, hooks: list[Hook]):
        self.hooks = hooks

    def on_step_end(self, ctx: TrainContext) -> None:
        for h in self.hooks:
            h.on_step_end(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        for h in self.hooks:
            h.on_train_end(ctx)


class GateMonitorHook(Hook):
    """Folds the gate statistics of the step's first micro-batch into the monitor and writes
    the pruning plan next to every checkpoint and at the end."""

    def __init__(self, monitor: GateMonitor, every_steps: int):
        self.monitor, self.every = monitor, every_steps
        self.pending: list | None = None  # set by the loop on gate-statistics steps

    def wants_stats(self, step: int) -> bool:
        return step % self.every == 0

    def on_step_end(self, ctx: TrainContext) -> None:
        if self.pending is None:
            return
        if ctx.is_main:
            for i, s in enumerate(self.pending):
                self.monitor.update(i, s, step=ctx.state.step, tokens=ctx.metrics.get("tokens", 0))
            ctx.metrics.update(self.monitor.scalars())
        self.pending = None

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.is_main and any(s.updates for s in self.monitor.layers):
            plan = self.monitor.export_pruning_plan(ctx.run_dir / "pruning_plan.json")
            log.info("pruning plan: %d branch(es) off -> %s", len(plan["prune"]), ctx.run_dir / "pruning_plan.json")


class EvalHook(Hook):
    """Validation loss / perplexity every N steps (and at the end), per length bucket."""

    def __init__(self, every_steps: int, evaluate: Callable[[], dict[str, float]]):
        self.every, self.evaluate = every_steps, evaluate

    def _run(self, ctx: TrainContext) -> None:
        res = self.evaluate()  # collective: every rank evaluates its share
        ctx.metrics.update(res)
        if ctx.is_main and "val_loss" in res:
            log.info("eval step %d: val_loss %.4f ppl %.2f", ctx.state.step, res["val_loss"],
                     math.exp(min(res["val_loss"], 50)))

    def on_step_end(self, ctx: TrainContext) -> None:
        if ctx.state.step % self.every == 0:
            self._run(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.state.step % self.every != 0:
            self._run(ctx)


class CheckpointHook(Hook):
    """Saves every N steps, at the end, and when a stop was requested (signal). The time the
    training loop waits for a save goes into the step's metrics as `checkpoint_stall_s`."""

    def __init__(self, every_steps: int, save: Callable[[], str]):
        self.every, self.save = every_steps, save

    def _save(self, ctx: TrainContext) -> None:
        t0 = time.perf_counter()
        ctx.state.last_checkpoint = self.save()
        ctx.metrics["checkpoint_stall_s"] = time.perf_counter() - t0

    def on_step_end(self, ctx: TrainContext) -> None:
        if ctx.state.consecutive_bad:
            return  # never checkpoint a state that just produced a bad step
        if ctx.state.step % self.every == 0 or ctx.stop_requested:
            self._save(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.state.step % self.every != 0 and not ctx.state.consecutive_bad:
            self._save(ctx)


class MetricsHook(Hook):
    """Writes every step's metrics (metrics.jsonl, wandb) and the console progress line."""

    def __init__(self, sink, log_every_steps: int):
        self.sink, self.every = sink, log_every_steps

    def on_step_end(self, ctx: TrainContext) -> None:
        self.sink.log(ctx.state.step, ctx.metrics)
        if ctx.state.step % self.every == 0 or ctx.state.step == 1:
            self.sink.progress(ctx.state.step, ctx.metrics)

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.metrics:
            self.sink.log(ctx.state.step, {k: v for k, v in ctx.metrics.items() if k.startswith("val")})
        self.sink.close()
