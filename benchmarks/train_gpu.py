"""One-GPU training-step throughput: FusionTree presets vs their same-size all-global
Transformer twins, measured side by side in one process.

    python benchmarks/train_gpu.py [--cases small@4096x2,transformer-small@4096x2,...] [--out FILE]

A case is PRESET@SEQxBATCH with optional suffixes: `+ckpt` for per-block activation
checkpointing of every block, `+ckptN` of the first N blocks only (the peer takes both),
`+compile` for per-block torch.compile (`fusiontree.train.mechanics.apply_compile`, compiled during
the warm-up steps), `+graphs` for per-block CUDA graphs of the forward and backward
(`fusiontree.train.cuda_graphs`, captured during the warm-up steps), `+docs` for rows packed
with documents as the data loader makes them (seq_idx and per-document positions; without it,
one document per row). PRESET `mamba-ref-NAME` is the peer: mamba-ssm's own
`MambaLMHeadModel`, a Mamba-2 hybrid with attention every 6th layer, sized to NAME's parameter
count (width, MLP, SSM and attention heads of NAME; the layer count is chosen to match), with SDPA
attention without rotary embeddings (no flash-attn). By default its `use_mem_eff_path=False`
path without causal-conv1d (nn.Conv1d, then the SSD kernel); `+fused` takes its fused path
(`use_mem_eff_path=True`: causal-conv1d's kernel and one fused conv + scan + norm function),
which needs causal-conv1d installed.
Each step: bf16 weights (A_log, D, dt_bias fp32), forward, HybridModelLoss, backward, fused
AdamW. MFU = model FLOPs per token (every FLOP the model does: projections, SSD as
computed, attention up to each layer's window; x3 for forward + backward) x tokens/s / peak
(989 TFLOP/s dense bf16 on H100/H200). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from fusiontree.config import KernelConfig, LossConfig
from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from fusiontree.models.flops import count_params, flops_per_token
from fusiontree.models.hybrid import positions_from_seq_idx
from fusiontree.models.layers import cast_model
from fusiontree.ops import resolve_kernels
from fusiontree.train.losses import HybridModelLoss
from fusiontree.train.mechanics import apply_activation_checkpointing, apply_compile
from fusiontree.train.metrics import device_peak_flops, gpu_busy_ms, kernel_categories_table
from _results import cuda_span_ms, git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CASES = ("small@4096x2,transformer-small@4096x2,1b@4096x1,transformer-1b@4096x1,"
                 "small@32768x1+ckpt,transformer-small@32768x1+ckpt")


SUFFIX = re.compile(r"^(ckpt\d*|compile|graphs|docs|fused)$")


def parse_case(case: str) -> tuple[str, int, int, set[str]]:
    head, *flags = case.split("+")
    bad = [f for f in flags if not SUFFIX.match(f)]
    if bad:
        raise SystemExit(f"case {case!r}: unknown suffix {bad}; use +ckpt, +ckptN, +compile, +graphs, +docs or +fused")
    preset, _, shape = head.partition("@")
    seq, _, batch = shape.partition("x")
    return preset, int(seq), int(batch), set(flags)


def checkpoint_layers(flags: set[str]) -> int | None:
    """None: no checkpointing; 0: every block (+ckpt); N: the first N blocks (+ckptN)."""
    ck = [f for f in flags if f.startswith("ckpt")]
    return None if not ck else int(ck[0][4:] or 0)


class _PeerOut:
    def __init__(self, logits):
        self.logits, self.gates = logits, []


class MambaReferencePeer(torch.nn.Module):
    """mamba-ssm's MambaLMHeadModel sized like one of our presets; returns what the loss reads."""

    def __init__(self, cfg, dev: torch.device, fused: bool = False):
        super().__init__()
        import mamba_ssm.modules.mamba2 as mamba2_module
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        target = count_params(cfg)

        def build(n_layer: int, device) -> torch.nn.Module:
            mc = MambaConfig(
                d_model=cfg.d_model, d_intermediate=cfg.mlp_hidden_size, n_layer=n_layer,
                vocab_size=cfg.vocab_size, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                ssm_cfg={"layer": "Mamba2", "d_state": cfg.ssm_state, "headdim": cfg.ssm_head_dim,
                         "ngroups": cfg.ssm_groups, "expand": cfg.ssm_expand, "chunk_size": cfg.chunk_size,
                         "use_mem_eff_path": fused},
                attn_layer_idx=[i for i in range(n_layer) if i % 6 == 5],
                # No rotary: mamba-ssm's needs flash-attn, which this peer is run without.
                attn_cfg={"num_heads": cfg.n_heads, "num_heads_kv": cfg.n_kv_heads, "head_dim": cfg.attn_head_dim,
                          "causal": True},
                tie_embeddings=False)
            return MambaLMHeadModel(mc, device=device, dtype=torch.bfloat16)

        if fused and mamba2_module.causal_conv1d_fn is None:
            raise SystemExit("+fused needs causal-conv1d, which does not import here")
        if not fused:
            mamba2_module.causal_conv1d_fn = None  # the unfused path: nn.Conv1d, as without causal-conv1d
        n_layer = 1
        while sum(p.numel() for p in build(n_layer + 1, "meta").parameters()) <= target:
            n_layer += 1
        self.n_layer = n_layer
        self.model = build(n_layer, dev)

    def forward(self, ids):
        return _PeerOut(self.model(ids).logits)


def run_case(case: str, kernels_cfg: KernelConfig, warmup: int, steps: int, dev: torch.device,
             profile_out: str = "") -> dict:
    preset, seq, batch, flags = parse_case(case)
    ckpt_layers = checkpoint_layers(flags)
    ckpt = ckpt_layers is not None
    peer = preset.startswith("mamba-ref-")
    cfg = model_preset(preset.removeprefix("mamba-ref-"))
    torch.manual_seed(0)
    extra = {}
    if peer:
        if flags & {"compile", "graphs", "docs"}:
            raise SystemExit(f"case {case!r}: the mamba-ssm peer runs as its package ships (eager, one document "
                             "per row); drop +compile, +graphs and +docs")
        model = MambaReferencePeer(cfg, dev, fused="fused" in flags).train()
        if ckpt:  # mamba-ssm has no checkpointing switch: wrap its blocks (the first N for +ckptN)
            layers = model.model.backbone.layers
            _checkpoint_blocks(layers[:ckpt_layers] if ckpt_layers else layers)
        kernels_desc = ("mamba-ssm MambaLMHeadModel, fused path (causal-conv1d, use_mem_eff_path=True)"
                        if "fused" in flags else "mamba-ssm MambaLMHeadModel, unfused path (nn.Conv1d)")
        n_params = sum(p.numel() for p in model.parameters())
        extra["n_layer"] = model.n_layer
    else:
        kernels = resolve_kernels(kernels_cfg, dev)
        kernels_desc = kernels.describe()
        model = cast_model(HybridLanguageModel(cfg, kernels).to(dev), torch.bfloat16).train()
        model.check_inputs = False
        if "compile" in flags:
            apply_compile(model)
            kernels_desc += " +compiled blocks"
        if ckpt:
            apply_activation_checkpointing(model, ckpt_layers or 0)
        n_params = count_params(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    if "graphs" in flags:
        from fusiontree.train.mechanics import apply_cuda_graphs

        apply_cuda_graphs(model)
        kernels_desc += " +cuda graphs"
    loss_fn = HybridModelLoss(LossConfig())
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
    fwd_kwargs = {}
    if "docs" in flags:
        seq_idx = packed_documents(batch, seq, mean_len=1000, seed=0).to(dev)
        fwd_kwargs = dict(seq_idx=seq_idx, position_ids=positions_from_seq_idx(seq_idx))
    torch.cuda.reset_peak_memory_stats(dev)

    def step() -> torch.Tensor:
        out = model(ids, **fwd_kwargs)
        loss, _ = loss_fn(out.logits, ids, out.gates, seq_idx_BT=fwd_kwargs.get("seq_idx"))
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
            events = prof.events()
            busy_ms, n_kernels = gpu_busy_ms(events)
            table = "\n".join([f"GPU busy {busy_ms:.1f} ms, {n_kernels} kernels", *kernel_categories_table(events),
                               prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40,
                                                         max_name_column_width=70)])
            Path(profile_out).write_text(f"{case}\n{table}\n")
            extra["profile"] = profile_out
            print(table, flush=True)
        last = {}
        ms = cuda_span_ms(lambda: last.update(loss=step()), steps)
        ok = bool(torch.isfinite(last["loss"]))
    except torch.OutOfMemoryError:
        return {"case": case, "preset": preset, "error": "out of memory"}
    finally:
        peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30
        del model, opt
        torch.cuda.empty_cache()
    tps = batch * seq / (ms / 1e3)
    # The peer's FLOPs are not counted here (other layer count and mixer shapes): its row is
    # read for tokens/s at (nearly) equal parameter count, not for MFU.
    fpt = None if peer else flops_per_token(cfg, seq)
    peak, _ = device_peak_flops(dev)
    return {"case": case, "preset": preset, "seq_len": seq, "batch": batch, "checkpointing": ckpt,
            "checkpoint_num_layers": ckpt_layers,
            "compiled": "compile" in flags, "cuda_graphs": "graphs" in flags, "packed_docs": "docs" in flags,
            "params": n_params, "kernels": kernels_desc, "step_ms": ms,
            "tokens_per_s": tps, "flops_per_token": fpt, "mfu": None if peer else tps * fpt / peak,
            "peak_mem_gib": peak_gib, "loss_finite": ok, **extra}


def packed_documents(batch: int, seq: int, mean_len: int, seed: int) -> torch.Tensor:
    """seq_idx [batch, seq] of rows packed with documents of exponentially distributed
    lengths (mean `mean_len` tokens), the way the loader packs real corpora."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(max(1, int(torch.empty(1).exponential_(1.0 / mean_len, generator=g))))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq])
    return torch.stack(rows)


def _checkpoint_blocks(blocks: torch.nn.ModuleList) -> None:
    import torch.utils.checkpoint

    for blk in blocks:
        fwd = blk.forward
        blk.forward = lambda *a, _f=fwd, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)


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
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['step_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}K | "
              f"{mfu} | {r['peak_mem_gib']:.1f} | {ratio} |")
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(args.commit),
            "command": " ".join(sys.argv)}
    write_results(args.out, meta, rows=rows)


if __name__ == "__main__":
    main()
