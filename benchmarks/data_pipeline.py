"""Data pipeline throughput on CPU: shard building (MB of text/s, tokens/s) and the loader (tokens/s).

    python benchmarks/data_pipeline.py [--input PATHS...] [--workers 2] [--out benchmarks/results/data_pipeline.json]

1. Build: the default corpus (or --input) into a temporary directory, twice: training a new
   tokenizer, then reusing it (the tokenize + pack + write path alone). Throughput counts
   the UTF-8 text of the documents kept, over the wall time of the whole build.
2. Loader: the train loader of that build, one rank, for each bucket length and number of
   DataLoader workers: tokens/s delivered to a consumer that does nothing else, over
   `--epochs` whole epochs of the bucket (shard reads, epoch restarts and worker start-ups
   included), and per worker.
3. Reference: tokens/s of a training step (forward, loss, backward, AdamW) of the `tiny`
   preset on this CPU at the first bucket length, and the loader's margin over it.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusiontree.config import CurriculumStage, DataConfig, LossConfig
from fusiontree.models.config import model_preset
from fusiontree.data import build_train_loader
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import cpu_count

ROOT = Path(__file__).resolve().parents[1]


def bench_build(inputs: list[str], out: Path, workers: int, tokenizer: str = "") -> dict:
    summary = build_shards(BuildArgs(inputs=inputs, output=str(out), workers=workers, tokenizer=tokenizer,
                                     progress=False))
    t = summary["timing"]
    mb = summary["input"]["text_bytes"] / 1e6
    tokens = sum(summary["splits"][s]["document_tokens"] for s in ("train", "val"))
    return {"tokenizer": "reused" if tokenizer else "trained", "text_mb": mb, "documents": summary["input"]["documents"],
            "tokens": tokens, "seconds": t["total_s"], "tokenizer_s": t["tokenizer_s"],
            "mb_per_s": mb / t["total_s"], "tokens_per_s": tokens / t["total_s"],
            "tokenize_pack_write_mb_per_s": mb / t["tokenize_pack_write_s"]}


def bench_loader(shards: Path, seq_len: int, micro_batch_tokens: int, num_workers: int, epochs: int) -> dict:
    cfg = DataConfig(shards_dir=str(shards), global_batch_tokens=micro_batch_tokens,
                     micro_batch_tokens=micro_batch_tokens, curriculum=[CurriculumStage(seq_len, 0)],
                     num_workers=num_workers, verify_shards="size")
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
    batches = epochs * loader.stats()["buckets"][seq_len]["batches_per_epoch"]
    t0 = time.perf_counter()
    loader.next_batch()
    loader.advance(micro_batch_tokens)
    first_s = time.perf_counter() - t0
    for _ in range(batches - 1):
        loader.next_batch()
        loader.advance(micro_batch_tokens)
    dt = time.perf_counter() - t0
    assert loader.epoch(seq_len) == epochs - 1
    loader.close()
    tps = batches * micro_batch_tokens / dt
    return {"seq_len": seq_len, "micro_batch_size": micro_batch_tokens // seq_len, "num_workers": num_workers,
            "batches": batches, "first_batch_s": first_s, "tokens_per_s": tps,
            "tokens_per_s_per_worker": tps / max(1, num_workers)}


def bench_tiny_training(shards: Path, seq_len: int, micro_batch_tokens: int, steps: int) -> dict:
    from fusiontree.models import HybridLanguageModel
    from fusiontree.train.losses import HybridModelLoss

    cfg = DataConfig(shards_dir=str(shards), global_batch_tokens=micro_batch_tokens,
                     micro_batch_tokens=micro_batch_tokens, curriculum=[CurriculumStage(seq_len, 0)], num_workers=0,
                     verify_shards="none")
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
    torch.manual_seed(0)
    model = HybridLanguageModel(model_preset("tiny")).train()
    loss_fn = HybridModelLoss(LossConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):  # the first step warms up
        batch = loader.next_batch()
        loader.advance(micro_batch_tokens)
        t0 = time.perf_counter()
        out = model(batch["input_ids"], position_ids=batch["position_ids"], seq_idx=batch["seq_idx"])
        loss, _ = loss_fn(out.logits, batch["input_ids"], out.gates, seq_idx_BT=batch["seq_idx"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return {"seq_len": seq_len, "micro_batch_tokens": micro_batch_tokens, "steps": steps,
            "tokens_per_s": micro_batch_tokens * steps / sum(times), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[], help="build input (default: the default corpus)")
    ap.add_argument("--workers", type=int, default=cpu_count(), help="build processes")
    ap.add_argument("--seq-lens", default="512,4096", help="buckets to time the loader on")
    ap.add_argument("--loader-workers", default="0,1,2", help="DataLoader worker counts to time")
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs of each bucket per loader configuration")
    ap.add_argument("--model-steps", type=int, default=3, help="timed tiny-model training steps (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/data_pipeline.json"))
    args = ap.parse_args()
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    worker_counts = [int(x) for x in args.loader_workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        builds = [bench_build(args.input, shards, args.workers)]
        tokenizer = Path(tmp) / "tokenizer.model"
        tokenizer.write_bytes((shards / "tokenizer.model").read_bytes())
        builds.append(bench_build(args.input, shards, args.workers, tokenizer=str(tokenizer)))
        for b in builds:
            print(f"build ({b['tokenizer']} tokenizer): {b['text_mb']:.1f} MB, {b['tokens']} tokens in "
                  f"{b['seconds']:.1f} s: {b['mb_per_s']:.2f} MB/s, {b['tokens_per_s'] / 1e6:.2f} M tokens/s", flush=True)
        loads = []
        for L in seq_lens:
            for w in worker_counts:
                r = bench_loader(shards, L, args.micro_batch_tokens, w, args.epochs)
                loads.append(r)
                print(f"loader seq {L:5d} workers {w}: {r['tokens_per_s'] / 1e6:7.2f} M tokens/s "
                      f"({r['tokens_per_s_per_worker'] / 1e6:.2f} M per worker), first batch {r['first_batch_s']:.2f} s",
                      flush=True)
        model = bench_tiny_training(shards, seq_lens[0], args.micro_batch_tokens, args.model_steps) \
            if args.model_steps else None
    if model:
        print(f"tiny preset training on this CPU: {model['tokens_per_s']:.0f} tokens/s at seq {model['seq_len']}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": cpu_count(), "build_workers": args.workers,
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "command": " ".join(sys.argv)}
    print("\n| build | text MB | tokens | seconds | MB/s | M tokens/s | tokenize+pack+write MB/s |")
    print("|---|---|---|---|---|---|---|")
    for b in builds:
        print(f"| {b['tokenizer']} tokenizer | {b['text_mb']:.1f} | {b['tokens']} | {b['seconds']:.1f} | "
              f"{b['mb_per_s']:.2f} | {b['tokens_per_s'] / 1e6:.2f} | {b['tokenize_pack_write_mb_per_s']:.2f} |")
    print("\n| loader seq len | micro-batch | workers | batches | M tokens/s | M tokens/s per worker | first batch s |"
          + (" x tiny training |" if model else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if model else ""))
    for r in loads:
        print(f"| {r['seq_len']} | {r['micro_batch_size']} | {r['num_workers']} | {r['batches']} | "
              f"{r['tokens_per_s'] / 1e6:.2f} | "
              f"{r['tokens_per_s_per_worker'] / 1e6:.2f} | {r['first_batch_s']:.2f} |"
              + (f" {r['tokens_per_s'] / model['tokens_per_s']:.0f}x |" if model else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "build": builds, "loader": loads, "tiny_training": model}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
