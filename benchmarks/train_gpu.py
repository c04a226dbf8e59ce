"""One-GPU training-step throughput: FusionTree presets vs their same-size all-global
Transformer twins, measured side by side in one process.

    python benchmarks/train_gpu.py [--cases small@4096x2,transformer-small@4096x2,...] [--out FILE]

A case is PRESET@SEQxBATCH, with a trailing `+ckpt` for per-block activation checkpointing.
Each step: bf16 weights (A_log, D, dt_bias fp32), forward, HybridModelLoss, backward, fused
AdamW. MFU = model FLOPs per token (every FLOP the model does: projections, SSD as
computed, attention up to each layer's window; x3 for forward + backward) x tokens/s / peak
(989 TFLOP/s dense bf16 on H100/H200). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusiontree.config import KernelConfig, LossConfig, model_preset  # noqa: E402
from fusiontree.models import HybridLanguageModel  # noqa: E402
from fusiontree.models.flops import count_params, flops_per_token  # noqa: E402
from fusiontree.models.layers import cast_model  # noqa: E402
from fusiontree.ops import resolve_kernels  # noqa: E402
from fusiontree.train.losses import HybridModelLoss  # noqa: E402
from fusiontree.train.metrics import device_peak_flops  # noqa: E402

DEFAULT_CASES = ("small@4096x2,transformer-small@4096x2,1b@4096x1,transformer-1b@4096x1,"
                 "small@32768x1+ckpt,transformer-small@32768x1+ckpt")


def parse_case(case: str) -> tuple[str, int, int, bool]:
    ckpt = case.endswith("+ckpt")
    preset, _, shape = case.removesuffix("+ckpt").partition("@")
    seq, _, batch = shape.partition("x")
    return preset, int(seq), int(batch), ckpt


def run_case(case: str, kernels_cfg: KernelConfig, warmup: int, steps: int, dev: torch.device,
             profile_out: str = "") -> dict:
    preset, seq, batch, ckpt = parse_case(case)
    cfg = model_preset(preset)
    torch.manual_seed(0)
    kernels = resolve_kernels(kernels_cfg, dev)
    model = cast_model(HybridLanguageModel(cfg, kernels).to(dev), torch.bfloat16).train()
    model.check_inputs = False
    model.activation_checkpointing = ckpt
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    loss_fn = HybridModelLoss(LossConfig())
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    torch.cuda.reset_peak_memory_stats(dev)

    def step() -> torch.Tensor:
        out = model(ids)
        loss, _ = loss_fn(out.logits, ids, out.gates)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        if profile_out:
            # One step under the profiler, before (and apart from) the timed steps.
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
            Path(profile_out).write_text(f"{case}\n{table}\n")
            print(table, flush=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
        ok = bool(torch.isfinite(loss))
    except torch.OutOfMemoryError:
        return {"case": case, "preset": preset, "error": "out of memory"}
    finally:
        peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30
        del model, opt
        torch.cuda.empty_cache()
    tps = batch * seq / (ms / 1e3)
    fpt = flops_per_token(cfg, seq)
    peak, _ = device_peak_flops(dev)
    return {"case": case, "preset": preset, "seq_len": seq, "batch": batch, "checkpointing": ckpt,
            "params": count_params(cfg), "kernels": kernels.describe(), "step_ms": ms, "tokens_per_s": tps,
            "flops_per_token": fpt, "mfu": tps * fpt / peak, "peak_mem_gib": peak_gib, "loss_finite": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--ssd", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--profile", default="", help="directory: profile one step per case, write the table there")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_gpu.py measures GPU training steps; no CUDA device is visible")
    rows = []
    for case in args.cases.split(","):
        t0 = time.time()
        prof = ""
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            prof = str(Path(args.profile) / f"profile_{case.replace('@', '_').replace('+', '_')}.txt")
        r = run_case(case, KernelConfig(ssd=args.ssd, attention=args.attention), args.warmup, args.steps,
                     torch.device("cuda"), prof)
        r["wall_s"] = time.time() - t0
        rows.append(r)
        print(json.dumps(r), flush=True)
    by_case = {r["case"]: r for r in rows}
    print(f"\ncard: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| case | params | step ms | tokens/s | MFU | peak GiB | vs Transformer twin |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | | | {r['error']} | | | |")
            continue
        twin = by_case.get(r["case"].replace(r["preset"], "transformer-" + r["preset"], 1))
        ratio = f"{r['tokens_per_s'] / twin['tokens_per_s']:.2f}x" if twin and "error" not in twin else ""
        print(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}K | "
              f"{r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | {ratio} |")
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=ROOT).stdout.strip()
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
            "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
