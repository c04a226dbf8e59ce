"""Decode speed on CPU: the `tiny` preset with the KV + Mamba caches vs recomputing the prefix.

    python benchmarks/decode_cpu.py [--contexts 256,1024,4096] [--out benchmarks/results/decode_cpu.json]

For each context length: prefill a random prompt of that length, then time greedy decode
steps with the cache (per-token latency), and time full forwards over the prefix (what
decoding without a cache costs per token). Two models: the tiny hybrid (5 local layers, 1
global) and the same model with every layer local (window-only), whose cached per-token
cost must stay flat once the context is past the window. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from _results import git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(model: HybridLanguageModel, context: int, decode_steps: int, recompute_steps: int) -> dict:
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=g)
    kv, ms = model.allocate_inference_cache(1, context + decode_steps + 1)
    t0 = time.perf_counter()
    out = model(prompt, past_key_values=kv, past_mamba_states=ms)
    prefill_s = time.perf_counter() - t0
    nxt = out.logits[:, -1:].argmax(-1)

    def step():
        nonlocal nxt
        nxt = model(nxt, past_key_values=kv, past_mamba_states=ms).logits[:, -1:].argmax(-1)

    step()  # warm-up
    cached_ms = _median_ms(step, decode_steps)
    recompute_ms = _median_ms(lambda: model(prompt).logits[:, -1].argmax(-1), recompute_steps)
    return {"context": context, "cached_ms_per_token": cached_ms, "recompute_ms_per_token": recompute_ms,
            "cached_tokens_per_s": 1e3 / cached_ms, "recompute_tokens_per_s": 1e3 / recompute_ms,
            "speedup": recompute_ms / cached_ms, "prefill_tokens_per_s": context / prefill_s,
            "kv_cache_bytes": kv.nbytes(), "mamba_state_bytes": ms.nbytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--recompute-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    tiny = model_preset("tiny")
    models = {"tiny (hybrid, 5 local + 1 global)": tiny,
              "tiny window-only": dataclasses.replace(tiny, attn_pattern="L")}
    rows = []
    for name, cfg in models.items():
        torch.manual_seed(0)
        model = HybridLanguageModel(cfg).eval()
        for c in contexts:
            r = measure(model, c, args.decode_steps, args.recompute_steps)
            r["model"] = name
            rows.append(r)
            print(f"{name:36s} ctx {c:5d}: cached {r['cached_ms_per_token']:7.2f} ms/token "
                  f"({r['cached_tokens_per_s']:6.1f} tok/s)  recompute {r['recompute_ms_per_token']:8.1f} ms/token "
                  f"({r['recompute_tokens_per_s']:6.2f} tok/s)  speedup {r['speedup']:6.1f}x  "
                  f"cache {(r['kv_cache_bytes'] + r['mamba_state_bytes']) / 2**20:6.2f} MiB", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "commit": git_commit(), "command": " ".join(sys.argv),
            "window": tiny.window}
    print("\n| model | context | cached ms/token | recompute ms/token | speedup | cache MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['context']} | {r['cached_ms_per_token']:.2f} | "
              f"{r['recompute_ms_per_token']:.1f} | {r['speedup']:.1f}x | "
              f"{(r['kv_cache_bytes'] + r['mamba_state_bytes']) / 2**20:.2f} |")
    print(f"wrote {write_results(args.out, meta, rows=rows)}")


if __name__ == "__main__":
    main()
