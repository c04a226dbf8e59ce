"""Decode cache size of a preset under other attention layer patterns, against its Transformer twin.

    python benchmarks/cache_bytes.py [--preset 1b] [--context 32696]
        [--patterns LLLLLG,LLLLLLLLLG] [--out FILE.json]

Exact bytes, no timing and no device: the model is built on PyTorch's meta device and
`allocate_inference_cache` reports what a bf16 decode at `--context` tokens (batch 1) would
allocate: the KV cache (global layers: every token; local layers: a ring of `window` slots)
plus the Mamba states (conv window and fp32 SSM state). The pattern repeats over the layers
(L local, G global), so it sets how many layers keep the whole context. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from _results import git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]


def cache_bytes(cfg, context: int) -> tuple[int, int]:
    """(KV cache bytes, Mamba state bytes) of a batch-1 bf16 decode cache for `context` tokens."""
    with torch.device("meta"):
        model = HybridLanguageModel(cfg)
    kv, ms = model.allocate_inference_cache(1, context, dtype=torch.bfloat16, device="meta")
    return kv.nbytes(), ms.nbytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--context", type=int, default=32640 + 3 * 16 + 8,
                    help="tokens the cache holds (default: what decode_gpu.py allocates at 32640 + 16 steps)")
    ap.add_argument("--patterns", default="", help="comma-separated attn_pattern values (default: the preset's)")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_bytes.json"))
    args = ap.parse_args()
    base = model_preset(args.preset)
    twin_kv, twin_ms = cache_bytes(model_preset(f"transformer-{args.preset}"), args.context)
    rows = []
    for pattern in (args.patterns.split(",") if args.patterns else [base.attn_pattern]):
        cfg = dataclasses.replace(base, attn_pattern=pattern)
        kv, ms = cache_bytes(cfg, args.context)
        globals_ = sum(cfg.layer_window(i) is None for i in range(cfg.n_layers))
        rows.append({"preset": args.preset, "attn_pattern": pattern, "global_layers": globals_,
                     "layers": cfg.n_layers, "context": args.context, "kv_bytes": kv, "mamba_state_bytes": ms,
                     "cache_bytes": kv + ms, "transformer_cache_bytes": twin_kv + twin_ms,
                     "smaller_than_transformer": (twin_kv + twin_ms) / (kv + ms)})
    print(f"transformer-{args.preset}: {(twin_kv + twin_ms) / 1e6:.1f} MB at {args.context} tokens")
    print("| attn_pattern | global layers | KV MB | Mamba state MB | cache MB | smaller than the Transformer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attn_pattern']} | {r['global_layers']} of {r['layers']} | {r['kv_bytes'] / 1e6:.1f} | "
              f"{r['mamba_state_bytes'] / 1e6:.1f} | {r['cache_bytes'] / 1e6:.1f} | "
              f"{r['smaller_than_transformer']:.2f}x |")
    meta = {"commit": git_commit(args.commit), "command": " ".join(sys.argv), "device": "meta (no timing)"}
    write_results(args.out, meta, rows=rows)
    print(json.dumps({"out": args.out}))


if __name__ == "__main__":
    main()
