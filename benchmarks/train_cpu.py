"""CPU training throughput of the `tiny` preset: one process vs 2 processes with ZeRO-2.

    python benchmarks/train_cpu.py [--steps 12] [--shards data/shards] [--out benchmarks/results/train_cpu.json]

Both runs go through launch/train.py (the real trainer, fp32, gloo), on the default shards
(built first if absent), at sequence length 512 with 4096 tokens per optimizer step. The
figure is the median tokens/s over the steps after the first two (start-up, first-touch).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_mode(name: str, shards: Path, steps: int, workdir: Path) -> dict:
    out = workdir / name
    overrides = ["--model.preset=tiny", f"--data.shards_dir={shards}", "--data.global_batch_tokens=4096",
                 "--data.micro_batch_tokens=2048", "--data.num_workers=1",
                 "--data.curriculum=[{seq_len: 512, until_tokens: 0}]", f"--train.steps={steps}",
                 "--train.lr_warmup_steps=1", "--train.eval_every_steps=100000",
                 "--train.checkpoint_every_steps=100000", "--train.log_every_steps=1", f"--out_dir={out}"]
    script = [str(ROOT / "launch/train.py"), "--ds_config", str(ROOT / "configs/ds/zero2.json"), *overrides]
    if name == "1 process":
        cmd = [sys.executable, *script]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29612", *script]
    env = dict(os.environ, WANDB_MODE="disabled",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(BIN.parent / "torch_extensions")))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"{name} run failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    return {"mode": name, "tokens_per_s": statistics.median(tps), "steps_timed": len(tps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--shards", default=str(ROOT / "data/shards"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_cpu.json"))
    args = ap.parse_args()
    shards = Path(args.shards)
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "data_pipeline/build_shards.py"), "--output", str(shards),
                        "--no-progress"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_mode(m, shards, args.steps, Path(tmp)) for m in ("1 process", "2 processes, ZeRO-2")]
    base = rows[0]["tokens_per_s"]
    print("| mode | tokens/s | vs 1 process |")
    print("|---|---|---|")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        print(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x |")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "commit": git_commit(),
            "command": " ".join(sys.argv)}
    write_results(args.out, meta, rows=rows)


if __name__ == "__main__":
    main()
