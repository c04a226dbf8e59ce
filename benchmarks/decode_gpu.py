"""Decode on one GPU: a FusionTree preset vs its same-size all-global Transformer twin.

    python benchmarks/decode_gpu.py [--preset 1b] [--contexts 4096,32768] [--batches 1,8]
        [--attention auto | reference,flex] [--out FILE.json]

For each attention backend, model, context length and batch size (bf16 weights; the SSD
backend `auto` picks):
prefill a random prompt of that length into freshly allocated caches (timed), then time
greedy decode steps with the caches (CUDA-event mean over `--steps` steps after warm-up), then
as many steps replayed from one captured CUDA graph (`GraphedDecoder`; its global layers read
every allocated slot), then as many from a graph of the step with its blocks compiled
(`GraphedDecoder(compile=True)`), and time one full forward over the context, which is what a
token costs without a cache (`--recompute-repeats 0` skips it). Cache bytes: the KV cache plus
the Mamba states, as allocated for context + 3 x steps + 8 tokens. Prints a table with the
FusionTree / Transformer ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fusiontree.config import KernelConfig
from fusiontree.models.config import model_preset
from fusiontree.inference.cuda_graph import GraphedDecoder
from fusiontree.models import HybridLanguageModel
from fusiontree.models.flops import count_params
from fusiontree.models.layers import cast_model
from fusiontree.ops import resolve_kernels
from _results import cuda_span_ms, git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def measure(model: HybridLanguageModel, context: int, batch: int, steps: int, recompute_repeats: int,
            profile_dir: str = "") -> dict:
    dev = model.embed.weight.device
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, context), generator=g).to(dev)
    row = {"context": context, "batch": batch}
    try:
        # Warm-up of the cached path at the timed shapes (a full-length prefill into caches,
        # then decode steps) and of the full-length forward: first calls compile and autotune
        # kernels (per length: block masks; with final states: the SSD), which the timed calls
        # below must not include.
        kv, ms = model.allocate_inference_cache(batch, context + 8)
        o = model(prompt, past_key_values=kv, past_mamba_states=ms)
        for _ in range(3):
            o = model(o.logits[:, -1:].argmax(-1), past_key_values=kv, past_mamba_states=ms)
        kv = ms = o = None
        model(prompt)
        kv, ms = model.allocate_inference_cache(batch, context + 3 * steps + 8)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(prompt, past_key_values=kv, past_mamba_states=ms)
        torch.cuda.synchronize()
        row["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        nxt = out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal nxt
            nxt = model(nxt, past_key_values=kv, past_mamba_states=ms).logits[:, -1:].argmax(-1)

        for _ in range(4):
            step()
        if profile_dir:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(4):
                    step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60)
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            (Path(profile_dir) / f"decode_{model.cfg.preset}_{context}x{batch}.txt").write_text(table)
        row["cached_ms_per_token"] = cuda_span_ms(step, steps)
        # The same caches, continued by replaying one captured CUDA graph per token.
        decoder = GraphedDecoder(model, kv, ms, torch.full((batch,), kv.seen_tokens, device=dev))

        def graphed_step():
            nonlocal nxt
            nxt = decoder.step(nxt[:, 0]).argmax(-1, keepdim=True)

        graphed_step()
        row["graphed_ms_per_token"] = cuda_span_ms(graphed_step, steps - 1)
        # And again with the step's blocks compiled first (fused elementwise kernels).
        decoder = GraphedDecoder(model, kv, ms, torch.full((batch,), kv.seen_tokens, device=dev), compile=True)
        graphed_step()
        row["compiled_graphed_ms_per_token"] = cuda_span_ms(graphed_step, steps - 1)
        row["cache_bytes"] = kv.nbytes() + ms.nbytes()
        # What one graphed step must read at least: every weight but the embedding table (one
        # row per sequence) and every allocated cache slot; over the best time, the bandwidth
        # the step reaches (compare with the card's HBM bandwidth: 4.8 TB/s on an H200).
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                           if not n.startswith("embed."))
        row["min_bytes_per_step"] = weight_bytes + row["cache_bytes"]
        best_ms = min(row["graphed_ms_per_token"], row["compiled_graphed_ms_per_token"])
        row["achieved_tb_per_s"] = row["min_bytes_per_step"] / (best_ms * 1e-3) / 1e12
        row["kv_cache_bytes"], row["mamba_state_bytes"] = kv.nbytes(), ms.nbytes()
        kv = ms = out = None  # free the caches before the recompute forward
        row["recompute_ms_per_token"] = (cuda_span_ms(lambda: model(prompt), recompute_repeats)
                                         if recompute_repeats else None)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--attention", default="auto",
                    help="comma-separated attention backends, each measured in turn (auto, flex, reference)")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes (sequences decoded at once)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--recompute-repeats", type=int, default=3)
    ap.add_argument("--profile", default="", help="directory: profile 4 decode steps per case, write tables there")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_gpu.py measures GPU decoding; no CUDA device is visible")
    dev = torch.device("cuda")
    kernel_sets = [resolve_kernels(KernelConfig(attention=a), dev) for a in args.attention.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for kernels, name in ((k, n) for k in kernel_sets for n in (args.preset, f"transformer-{args.preset}")):
        cfg = model_preset(name)
        if max(contexts) + 3 * args.steps + 8 > cfg.max_seq_len:
            raise SystemExit(f"context {max(contexts)} + 3 x {args.steps} steps exceeds {name}'s max_seq_len "
                             f"{cfg.max_seq_len}")
        torch.manual_seed(0)
        model = cast_model(HybridLanguageModel(cfg, kernels).to(dev), torch.bfloat16).eval()
        model.check_inputs = False
        for c in contexts:
            for b in batches:
                r = {"model": name, "params": count_params(cfg), "attention": kernels.attention_name,
                     "kernels": kernels.describe(),
                     **measure(model, c, b, args.steps, args.recompute_repeats, args.profile)}
                rows.append(r)
                print(json.dumps(r), flush=True)
        del model
        torch.cuda.empty_cache()

    def twin_of(r):
        return next((t for t in rows if t["model"] == f"transformer-{args.preset}" and "error" not in t
                     and all(t[k] == r[k] for k in ("attention", "context", "batch"))), None)

    print(f"\ncard: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"kernels: {', '.join(k.describe() for k in kernel_sets)}")
    print("| model | attention | context | batch | prefill ms | decode ms/step | CUDA-graph ms/step | "
          "compiled + graph ms/step | recompute ms/step | cache MiB | TB/s read (best graph) | speed vs Transformer "
          "(eager, graph, compiled + graph) | cache vs Transformer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['attention']} | {r['context']} | {r['batch']} | {r['error']} | | | | | | | | |")
            continue
        twin = twin_of(r) if r["model"] == args.preset else None
        keys = ("cached_ms_per_token", "graphed_ms_per_token", "compiled_graphed_ms_per_token")
        speed = ", ".join(f"{twin[k] / r[k]:.2f}x" for k in keys) if twin else ""
        cache = f"{twin['cache_bytes'] / r['cache_bytes']:.1f}x smaller" if twin else ""
        rec = "-" if r["recompute_ms_per_token"] is None else f"{r['recompute_ms_per_token']:.1f}"
        print(f"| {r['model']} | {r['attention']} | {r['context']} | {r['batch']} | {r['prefill_ms']:.0f} | "
              f"{r['cached_ms_per_token']:.2f} | {r['graphed_ms_per_token']:.2f} | "
              f"{r['compiled_graphed_ms_per_token']:.2f} | {rec} | "
              f"{r['cache_bytes'] / 2**20:.1f} | {r['achieved_tb_per_s']:.2f} | {speed} | {cache} |")
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(args.commit),
            "command": " ".join(sys.argv)}
    write_results(args.out, meta, rows=rows)


if __name__ == "__main__":
    main()
