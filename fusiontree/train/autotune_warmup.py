"""mamba-ssm's kernel autotuning, run beside the compile instead of after it.

In a cold start the first forward first compiles the blocks with Inductor (tens of seconds of
host work while the GPU idles) and only then reaches mamba-ssm's SSD kernels, whose Triton
autotuner compiles and times every candidate config of each kernel, forward and backward
(tens of seconds more). With a compile cache (`train.compile_cache_dir`, which turns on
Triton's autotuning cache) the trainer starts a separate process, one per node, as soon as it
knows its first micro-batch's shape: the process runs one Mamba mixer of the run's model
forward and backward at that shape, as DeepSpeed's bf16 engine holds it, and Triton files each
choice in the cache. Before its first SSD call a trainer waits for that process
(`fusiontree.ops.backends.common.before_first_kernel_call`) and then reads from the cache every
choice Triton caches, instead of timing those candidates itself: Triton leaves out kernels whose
configs carry a pre-hook (mamba-ssm's backward kernels zero their gradient buffers in one), and
those are timed again, on candidates already compiled. The kernels' autotuning keys hold
neither batch nor length, so later lengths of a curriculum reuse the choices, as before. The
process times its candidates on local rank 0's GPU while that rank builds and compiles its
model, work that keeps the GPU nearly idle.

Should the process fail, or outlast its deadline, the trainer says so and autotunes in its
first step as it did without it; other ranks of the node learn it from local rank 0's report.

Run as `python -m fusiontree.train.autotune_warmup --spec JSON --marker PATH`; the marker (the
report, one per node and run under the run's logs) is written last, success or not.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("fusiontree.train")

# SSD backends that run mamba-ssm's autotuned Triton kernels (the same kernels in both)
MAMBA_SSD_BACKENDS = ("mamba_ssm", "mamba_ssm_saved")
DOCUMENTS_PER_ROW = 4  # packed rows, as the trainer's: the kernels take their seq_idx path
WAIT_S = 600.0
# This process's view, once its first SSD call has waited: autotune_ahead_s (the process's
# own time, if it finished), autotune_wait_s (how long the first call waited for it).
outcome: dict[str, float] = {}


def off_reason(cfg, device_type: str) -> str | None:
    """Why a run autotunes in its first step itself rather than beside the compile, or None."""
    t = cfg.train
    if not t.autotune_warmup:
        return "train.autotune_warmup=false"
    if device_type != "cuda":
        return "no CUDA device (no Triton autotuning)"
    if not t.compile:
        return "train.compile=false: the first forward reaches the kernels within seconds, nothing to overlap"
    if not t.compile_cache_dir:
        return "no train.compile_cache_dir, whose autotuning cache would carry the choices to the trainer"
    if cfg.model.mixer == "attention":
        return "the model has no Mamba branch"
    if cfg.kernels.ssd not in ("auto", *MAMBA_SSD_BACKENDS) or importlib.util.find_spec("mamba_ssm") is None:
        return "the SSD backend is not mamba-ssm's"
    if cfg.parallel.tensor_parallel > 1:
        return "tensor parallelism splits the mixer's heads, which some autotuning keys hold"
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return "Triton does not import"
    if not hasattr(Autotuner, "check_disk_cache"):
        return "this Triton keeps no autotuning results on disk (Triton 3.2 or later does)"
    return None


def make_spec(cfg, device: str, batch: int, seq_len: int, bf16: bool, threads: int) -> dict:
    from fusiontree.config import config_to_dict

    return {"model": config_to_dict(cfg.model), "kernels": config_to_dict(cfg.kernels), "device": device,
            "batch": batch, "seq_len": seq_len, "dtype": "bfloat16" if bf16 else "float32", "threads": threads}


def report_paths(run_dir: Path) -> tuple[Path, Path]:
    """This node's report and log of the process, under the run's logs (one per node and run)."""
    host = socket.gethostname().split(".")[0] or "localhost"
    logs = Path(run_dir) / "logs"
    return logs / f"autotune_warmup.{host}.json", logs / f"autotune_warmup.{host}.log"


def start(spec: dict, marker: Path, log_file: Path) -> subprocess.Popen:
    """Start the process (it inherits this one's environment: the cache variables included). It
    is stopped when this process exits, should nothing have waited for it by then."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    with open(log_file, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fusiontree.train.autotune_warmup", "--spec",
                                 json.dumps(spec), "--marker", str(marker)], stdout=out, stderr=subprocess.STDOUT)
    atexit.register(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def write_report(marker: Path, report: dict) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, marker)


def wait(marker: Path, proc: subprocess.Popen | None, timeout_s: float = WAIT_S, poll_s: float = 0.1,
         exit_grace_s: float = 30.0) -> dict:
    """Block until the process has reported in `marker`, and then until it has ended (if it is
    ours; stopped after `exit_grace_s`, so that its memory is free). Returns its report, or
    {"ok": False, "error": ...} when it ended without one or did not report within `timeout_s`
    (it is then stopped, and the failure is written as its report, so that the node's other
    ranks, which wait on the report alone, go on too)."""
    t0 = time.time()
    while not marker.is_file():
        failure = None
        if proc is not None and proc.poll() is not None and not marker.is_file():
            failure = f"the process ended with code {proc.returncode} and no report"
        elif time.time() - t0 > timeout_s:
            failure = f"no report within {timeout_s:.0f} s"
        if failure is not None:
            report = {"ok": False, "error": failure}
            if proc is not None:
                _stop(proc)
                try:
                    write_report(marker, report)
                except OSError as e:  # the other ranks then wait out their own deadline
                    log.warning("could not write the autotuning process's report %s: %s", marker, e)
            return report
        time.sleep(poll_s)
    if proc is not None:
        try:
            proc.wait(timeout=exit_grace_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return {"ok": False, "error": f"unreadable report {marker}: {e}"}


def expect(marker: Path, proc: subprocess.Popen | None, log_file: Path | None, timeout_s: float = WAIT_S) -> None:
    """Make this process's first SSD kernel call wait for the autotuning process."""
    from fusiontree.ops.backends.common import before_first_kernel_call

    def _wait() -> None:
        t0 = time.time()
        report = wait(marker, proc, timeout_s)
        waited = time.time() - t0
        outcome["autotune_wait_s"] = waited
        if report.get("ok"):
            outcome["autotune_ahead_s"] = report.get("seconds", float("nan"))
            log.info("kernel autotuning ran beside the compile in %.1f s; the first SSD call waited %.1f s for it",
                     report.get("seconds", float("nan")), waited)
        else:
            log.warning("the autotuning process did not finish (%s; its log: %s); the kernels autotune in this "
                        "process instead", report.get("error"), log_file or "on local rank 0")

    before_first_kernel_call(_wait)


def run(spec: dict) -> None:
    """One Mamba mixer of the run's model, forward and backward on packed rows of the first
    micro-batch's shape, parameters in the engine's dtype."""
    import torch

    from fusiontree.config import KernelConfig, dataclass_from_dict
    from fusiontree.models.config import ModelConfig
    from fusiontree.ops import resolve_kernels
    from fusiontree.ops.backends.autotune import parallel_autotune_compile

    device = torch.device(spec["device"])
    kernels = resolve_kernels(dataclass_from_dict(KernelConfig, spec["kernels"]), device)
    if kernels.ssd_name not in MAMBA_SSD_BACKENDS:
        raise RuntimeError(f"the SSD backend resolved to {kernels.ssd_name}, not mamba-ssm's: nothing to autotune")
    torch.cuda.set_device(device)
    if spec["threads"] > 1:
        parallel_autotune_compile(spec["threads"])
    mixer_forward_backward(dataclass_from_dict(ModelConfig, spec["model"]), kernels, spec["batch"], spec["seq_len"],
                           getattr(torch, spec["dtype"]), device)
    torch.cuda.synchronize(device)


def mixer_forward_backward(cfg, kernels, batch: int, seq_len: int, dtype, device):
    """A fresh Mamba mixer of `cfg` with every parameter in `dtype` (as DeepSpeed's bf16 engine
    holds them), forward and backward on `batch` packed rows of `seq_len` tokens. Returns the
    mixer (its parameters hold their gradients)."""
    import torch

    from fusiontree.models.cache import SeqInfo
    from fusiontree.models.hybrid import positions_from_seq_idx
    from fusiontree.models.mamba2 import Mamba2Mixer

    with torch.device(device):
        mixer = Mamba2Mixer(cfg, 0, kernels)
        mixer.init_weights()
    for p in mixer.parameters():
        p.data = p.data.to(dtype)
    doc = torch.arange(seq_len, device=device) * DOCUMENTS_PER_ROW // seq_len
    seq_idx = doc.to(torch.int32).expand(batch, seq_len).contiguous()
    pos = positions_from_seq_idx(seq_idx)
    u = torch.randn(batch, seq_len, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
    y = mixer(u, SeqInfo(position_ids=pos, key_pos=pos, seq_idx=seq_idx))
    y.float().square().mean().backward()
    return mixer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON: model, kernels, device, batch, seq_len, dtype, threads")
    ap.add_argument("--marker", required=True, help="where to write the report (JSON), last")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        run(json.loads(args.spec))
        report = {"ok": True}
    except Exception as e:  # reported to the trainer, which then autotunes itself
        traceback.print_exc()
        report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    report["seconds"] = time.time() - t0
    write_report(Path(args.marker), report)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
