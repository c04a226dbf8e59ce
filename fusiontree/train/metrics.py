"""Run observability: console progress, metrics.jsonl, wandb (rank 0, offline by default),
throughput / MFU / memory accounting and the loss-curve PNG.

Only rank 0 writes; other ranks get a `MetricsSink` that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("fusiontree.train")

# Dense bf16 tensor-core peaks (FLOP/s) by device name.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def device_peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and where the number comes from."""
    if configured > 0:
        return configured, "train.peak_flops_per_device"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak, f"{name} dense bf16 peak"
        return 0.0, f"unknown peak for {name}; set train.peak_flops_per_device"
    # CPU: measured fp32 matmul throughput of this process's threads (no published peak).
    # The best of several timings approximates the peak; contention only makes timings slower.
    n = 1024
    # Its own generator: the global one belongs to training (a resumed run has just restored it).
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best, f"best fp32 {n}^3 matmul on {torch.get_num_threads()} CPU thread(s)"


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class MetricsSink:
    """No-op sink for ranks other than 0."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def progress(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RankZeroMetrics(MetricsSink):
    def __init__(self, run_dir: Path, total_steps: int, config: dict, project: str, start_step: int = 0):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            # A resumed run repeats the steps after its checkpoint: drop their old rows.
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        self.file = open(self.path, "a")
        self.total_steps = total_steps
        self.wandb = None
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=project, dir=str(run_dir), config=config, mode=mode,
                                        name=run_dir.name, resume="allow", id=_wandb_id(run_dir))
            except Exception as e:  # wandb is observability only; the run goes on and says so
                log.warning("wandb disabled for this run: %s", e)
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", file=sys.stderr,
                            dynamic_ncols=True, disable=not sys.stderr.isatty())
        except ImportError:
            self.bar = None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        self.file.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, step: int, metrics: dict) -> None:
        keys = [("loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:.0f}"),
                ("mfu", "{:.1%}"), ("mem_gib", "{:.2f}"), ("skipped_steps", "{:d}"), ("seq_len", "{:d}")]
        parts = [f"{k} {fmt.format(metrics[k])}" for k, fmt in keys if metrics.get(k) is not None]
        if self.bar is not None and not self.bar.disable:
            self.bar.n = step
            self.bar.set_postfix_str(" ".join(parts), refresh=True)
        else:
            log.info("step %d/%d %s", step, self.total_steps, " ".join(parts))

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        plot_loss_curve(self.path, self.run_dir / "loss_curve.png")


def strict_json(obj):
    """`obj` with every non-finite float (a skipped step's NaN loss, an infinite norm) as None:
    metrics.jsonl is strict JSON (null), which every JSON reader accepts; NaN and Infinity
    are not JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def plot_loss_curve(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:  # null: a skipped step (a gap in the curve)
            train.append((row["step"], float("nan") if row["loss"] is None else row["loss"]))
        if "val_loss" in row and row["val_loss"] is not None:
            val.append((row["step"], row["val_loss"]))
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


class StepProfiler:
    """torch.profiler around chosen optimizer steps; each writes `<out_dir>/step_<N>.txt`: the
    step's wall time against the time the GPU was busy (the union of its kernels' intervals;
    the difference is time the device waited for the host, split by `device_idle_table` into
    the spacing of queued kernels and waits for the host by phase), the trainer's phases (forward,
    loss, backward, engine step) by host time, and the top operators by GPU time on CUDA (CPU
    time otherwise) and by host time."""

    def __init__(self, out_dir: Path, steps: list[int], device: torch.device):
        self.out_dir, self.steps, self.device = out_dir, set(steps), device
        self.prof = None
        self.t0 = 0.0

    def start(self, step: int) -> None:
        if step not in self.steps:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate sync: the profiled step starts alone
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def stop(self, step: int) -> None:
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate sync: the profiled step's kernels end here
        wall_ms = (time.perf_counter() - self.t0) * 1e3
        self.prof.__exit__(None, None, None)
        events = self.prof.events()
        lines = [f"optimizer step {step}", f"wall {wall_ms:.1f} ms"]
        if self.device.type == "cuda":
            busy_ms, kernels = gpu_busy_ms(events)
            lines.append(f"GPU busy {busy_ms:.1f} ms ({busy_ms / wall_ms:.1%} of the wall time), {kernels} kernels")
            lines += kernel_categories_table(events)
            lines += device_idle_table(events)
        phases: dict[str, list[float]] = {}
        for e in events:
            if e.name.startswith("fusiontree.") and e.device_type == torch.autograd.DeviceType.CPU:
                phases.setdefault(e.name, []).append(e.cpu_time_total / 1e3)
        for name, times in sorted(phases.items()):
            lines.append(f"{name}: {len(times)} x, host {sum(times):.1f} ms")
        avg = self.prof.key_averages()
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        lines.append(avg.table(sort_by=key, row_limit=60, max_name_column_width=90))
        lines.append("by host time, including children:")
        lines.append(avg.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=90))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step}.txt"
        path.write_text("\n".join(lines) + "\n")
        log.info("profile of step %d: %s (%s)", step, path, "; ".join(lines[1:3]))
        self.prof = None


def _device_work(events) -> list:
    """The kernels and copies among profiler events: device events, not the device-side spans
    of `record_function` ranges (which cover whatever ran between their first and last kernel)."""
    return [e for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def _busy_intervals(events) -> tuple[list[tuple[float, float]], int]:
    """The union of the device events' intervals (us, sorted, disjoint), and how many events."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in _device_work(events)
                   if e.time_range.end > e.time_range.start)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged], len(spans)


def gpu_busy_ms(events) -> tuple[float, int]:
    """The time at least one kernel (or copy) ran on the device, and how many ran: the union of
    the device events' intervals."""
    merged, n = _busy_intervals(events)
    return sum(b - a for a, b in merged) / 1e3, n


def device_idle_table(events, queued_gap_us: float = 10.0, launch_us: float = 20.0, top: int = 6) -> list[str]:
    """Where the device stood idle between its first and last kernel, and why. Gaps shorter than
    `queued_gap_us` are the device's own spacing between kernels the host had already queued
    (they grow with the kernel count, not with host work). A longer gap is the device waiting for
    the host: it goes to the trainer's phase (the innermost `fusiontree.*` span on the host) that
    was running `launch_us` before the gap ended, which launched the work that ended it ("between
    phases" outside them). The largest gaps are listed with the innermost host operation running
    then (a synchronization, say) and the kernels on either side."""
    merged, _ = _busy_intervals(events)
    gaps = [(a2 - b1, a2) for (_, b1), (a2, _) in zip(merged, merged[1:])]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
            and e.time_range.end > e.time_range.start]
    phases = [e for e in host if e.name.startswith("fusiontree.")]

    def innermost(spans, t):
        inside = [e for e in spans if e.time_range.start <= t <= e.time_range.end]
        return min(inside, key=lambda e: e.time_range.end - e.time_range.start).name if inside else None

    short = [g for g, _ in gaps if g < queued_gap_us]
    # (gap, its end, the phase that ended it) for the gaps the host caused
    long = [(g, end, innermost(phases, end - launch_us) or "between phases") for g, end in gaps if g >= queued_gap_us]
    by_phase: dict[str, list[float]] = {}
    for g, _, phase in long:
        by_phase.setdefault(phase, []).append(g)
    lead = merged[0][0] - min(e.time_range.start for e in host) if merged and host else 0.0
    lines = [f"device idle before its first kernel (the step's start on the host): {max(lead, 0.0) / 1e3:.1f} ms",
             f"device idle between its first and last kernel: {sum(g for g, _ in gaps) / 1e3:.1f} ms",
             f"  gaps under {queued_gap_us:g} us between queued kernels | {sum(short) / 1e3:.1f} ms | {len(short)}",
             f"  gaps of {queued_gap_us:g} us or more, waiting for the host, by the phase that ended them:"]
    for name, gs in sorted(by_phase.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"    {name} | {sum(gs) / 1e3:.1f} ms | {len(gs)}")
    ops = [e for e in host if not e.name.startswith("fusiontree.")]
    work = _device_work(events)
    for g, end, phase in sorted(long, reverse=True)[:top]:
        after = next((e.name for e in work if e.time_range.end == end - g), "-")
        first = next((e.name for e in work if e.time_range.start == end), "-")
        lines.append(f"  gap {g / 1e3:.2f} ms ending in {phase}, "
                     f"host mostly in {_longest_overlap(ops, end - g, end) or '-'}; "
                     f"after {after[:60]}, before {first[:60]}")
    return lines


def _longest_overlap(spans, a: float, b: float) -> str | None:
    """The name of the span that covers most of [a, b] (the shorter one on a tie)."""
    best, key = None, (0.0, 0.0)
    for e in spans:
        cover = min(b, e.time_range.end) - max(a, e.time_range.start)
        k = (cover, -(e.time_range.end - e.time_range.start))
        if cover > 0 and k > key:
            best, key = e.name, k
    return best


# Kernel families by name, first match wins: what a profile of the hybrid's step is read by.
KERNEL_CATEGORIES = [
    ("matmuls", r"nvjet|gemm|cutlass|cublas|xmma"),
    ("FlexAttention", r"flex_attention"),
    ("SDPA / flash attention", r"flash|fmha|attention"),
    ("SSD (mamba-ssm)", r"_chunk_|_bmm_chunk|_state_passing"),
    ("SSM state update (decode)", r"selective_scan_update|selective_state_update"),
    ("causal-conv1d", r"causal_conv1d|conv1d"),
    ("Inductor fused kernels", r"^triton_"),
    ("copies and fills", r"Memcpy|Memset|copy_kernel|CatArrayBatchedCopy|fill"),
    ("optimizer (multi-tensor)", r"multi_tensor_apply|adam"),
    ("eager reductions", r"reduce_kernel"),
    ("NCCL", r"nccl"),
    ("eager elementwise", r"elementwise_kernel"),
]


def kernel_categories_table(events, top_other: int = 12) -> list[str]:
    """Every kernel of a profiled step grouped into `KERNEL_CATEGORIES`, with the summed device
    time and count of each (kernels on concurrent streams count in full), then the largest
    kernels that no category claimed."""
    totals: dict[str, list[float]] = {name: [0.0, 0] for name, _ in KERNEL_CATEGORIES}
    totals["other"] = [0.0, 0]
    other: dict[str, list[float]] = {}
    patterns = [(name, re.compile(rx, re.IGNORECASE)) for name, rx in KERNEL_CATEGORIES]
    for e in _device_work(events):
        ms = (e.time_range.end - e.time_range.start) / 1e3
        cat = next((name for name, rx in patterns if rx.search(e.name)), "other")
        totals[cat][0] += ms
        totals[cat][1] += 1
        if cat == "other":
            o = other.setdefault(e.name, [0.0, 0])
            o[0] += ms
            o[1] += 1
    all_ms = sum(t[0] for t in totals.values()) or 1.0
    lines = ["all kernels by family: family | ms | % | kernels"]
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        if n:
            lines.append(f"  {name} | {ms:.1f} | {ms / all_ms:.1%} | {n}")
    for name, (ms, n) in sorted(other.items(), key=lambda kv: -kv[1][0])[:top_other]:
        lines.append(f"  other: {name[:100]} | {ms:.1f} | {n}")
    return lines
