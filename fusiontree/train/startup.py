"""Start-up of a training process: where compiled kernels are cached, and where the time to
the first step goes.

A cold start compiles every block with Inductor, compiles FlexAttention and its mask builder,
and lets mamba-ssm's Triton autotuner time each of its kernels' configurations; a warm start
finds all of that in the caches. `use_compile_cache` points those caches at one directory
(shared by every rank of a cluster, and by later runs), `StartupClock` names the phases.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("fusiontree.train")


def use_compile_cache(cache_dir: str) -> dict[str, str]:
    """Make Inductor (FX graph and autotuning caches) and Triton (compiled kernels and, from
    Triton 3.2 on, autotuning results) read and write under `cache_dir`. Must run before the
    first compilation; returns the variables set. Concurrent writers are safe: both caches
    write each entry atomically."""
    root = Path(cache_dir).expanduser().resolve()
    env = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton"),
           # Triton keeps an autotuner's choice only when asked to; mamba-ssm's kernels autotune
           # on first use, which is most of a cold start's GPU time.
           "TRITON_CACHE_AUTOTUNING": "1"}
    for path in (env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"]):
        Path(path).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


def process_start_time() -> float:
    """When this process started (epoch seconds), from the kernel's record of it."""
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:  # psutil comes with deepspeed; without it, time from the first call
        return time.time()


class StartupClock:
    """Seconds spent in each start-up phase, from process start to the end of the first step.
    The first step's phases are named `first_*` (its first micro-batch's forward, loss, backward
    and engine step, then `first_step_rest`); `first_step_s` in the metrics is their sum."""

    def __init__(self):
        self.t0 = process_start_time()
        self.last = self.t0
        self.phases: dict[str, float] = {}
        self.done = False  # the first step has ended

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.t0

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        return f"start-up {self.total():.1f} s to the end of the first step ({parts})"

    def finish(self) -> None:
        """The first step has ended."""
        self.mark("first_step_rest")
        self.done = True

    def metrics(self) -> dict[str, float]:
        first = [v for k, v in self.phases.items() if k.startswith("first_")]
        return {"startup_s": self.total(), **{f"startup/{k}_s": v for k, v in self.phases.items()},
                **({"startup/first_step_s": sum(first)} if first else {})}


def compile_seconds() -> dict[str, float]:
    """Seconds torch.compile spent so far in this process: tracing and compiling forward graphs
    (Inductor's code generation and autotuning included), and compiling backward graphs, which
    happens lazily at a graph's first backward."""
    from torch._dynamo.utils import compilation_time_metrics as times

    return {"startup/compile_forward_s": sum(times.get("_compile.compile_inner", [])),
            "startup/compile_backward_s": sum(times.get("backward._backward_impl", []))}
