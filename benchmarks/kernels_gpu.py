"""GPU kernels per backend: SSD and window attention forward+backward at 32K
tokens, and one decode step.

    python benchmarks/kernels_gpu.py [--sections ssd,attention,conv1d,decode] [--out FILE.json] [--commit HASH]

Shapes (bf16, batch 1):
- ssd: L=32768, 32 heads x 64, state 128, 1 group, chunk 256; dt and A fp32 as the model
  passes them; every SSD backend that loads (mamba_ssm is the anchor) and the reference.
  --ssd-shape BxT, --ssd-groups, --ssd-chunks (a list: one row per chunk length) and
  --ssd-backends change it: `--ssd-shape 8x4096 --ssd-groups 8 --ssd-chunks 64,128,256
  --ssd-backends mamba_ssm` is `small`'s training micro-batch at each chunk length.
- attention: L=32768, 16 heads x 64 (one kv head per head, the usual baseline shape):
  the flex backend at W = 512, 1024, 2048, and its global path (SDPA, full causal); then
  W=1024 with 4 kv heads (the presets' GQA) and W=1024 over 8 packed documents, and the cost
  of building a document block mask (once per forward, shared by the layers).
  --attention-varlen instead times the presets' GQA shapes (16 query and 4 kv heads; window
  1024 and causal; one document or 8 packed) through FlexAttention and through torch's varlen
  flash attention (`varlen_flash`) side by side.
- conv1d: the Mamba conv (4 taps, SiLU) over 4096 channels of a 6176-wide projection at
  8 x 4096 and 1 x 32768, packed documents; the causal_conv1d and triton backends (and the
  compiled reference) against the HBM floor; fwd_bwd_graph_ms replays forward + backward from
  a CUDA graph (the device's time alone).
- decode: one SSD step (state 32 x 64 x 128) per SSD backend; one attention step (16 query
  heads, 4 kv heads) over a ring cache of 1024 slots and over a 32K global cache, per backend.

Every timed backend is first checked against the reference (fp32, on fp32 copies of the same
inputs); the relative errors go into the JSON. Times are CUDA-event medians after warm-up.

The window-attention floor is the full-causal SDPA time scaled by the ratio of (query, key)
pairs each computes: window / causal = (L*W - W*(W-1)/2) / (L*(L+1)/2), about 2W/L. A window
kernel exactly as efficient per pair as SDPA's causal kernel would take that long.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fusiontree.config import KernelConfig
from fusiontree.models.hybrid import positions_from_seq_idx
from fusiontree.ops import resolve_kernels
from fusiontree.ops.attention import attention_ref
from fusiontree.ops.backends import flex as flex_backend
from fusiontree.ops.masks import document_starts
from fusiontree.ops.ssd import ssd_chunked_ref, ssd_step_ref
from _results import hbm_tb_per_s

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda"
L = 32768


def cuda_ms(fn, warmup: int, repeats: int) -> float:
    """Median over `repeats` calls of the GPU time between events recorded around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-20))


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _row(rows: list, **kw) -> None:
    rows.append(kw)
    print(json.dumps(kw), flush=True)


# ------------------------------------------------------------------ SSD


def graphed_ms(fn, repeats: int) -> float:
    """`cuda_ms` of `fn` captured once in a CUDA graph and replayed: the device's time alone,
    without the host's launch cost (warm-up and autotuning run on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_ms(graph.replay, 2, repeats)


def ssd_inputs(T, H=32, P=64, G=1, N=128, seed=0, rows=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return dict(
        x=torch.randn(rows, T, H, P, device=DEV, generator=g).bfloat16(),
        dt=torch.rand(rows, T, H, device=DEV, generator=g) * 0.1 + 0.001,
        A=-(torch.rand(H, device=DEV, generator=g) * 15 + 1),
        B=torch.randn(rows, T, G, N, device=DEV, generator=g).bfloat16(),
        C=torch.randn(rows, T, G, N, device=DEV, generator=g).bfloat16(),
        D=torch.ones(H, device=DEV),
        gy=torch.randn(rows, T, H, P, device=DEV, generator=g).bfloat16(),
    )


SSD_ARGS = ["x", "dt", "A", "B", "C", "D"]


def ssd_fwd_bwd(fn, inp, fp32=False, chunk=256):
    leaves = [(inp[n].float() if fp32 else inp[n]).detach().requires_grad_() for n in SSD_ARGS]
    y, _ = fn(*leaves, chunk_size=chunk)
    grads = torch.autograd.grad(y, leaves, grad_outputs=inp["gy"].to(y.dtype))
    return y, grads


def bench_ssd(rows: list, args) -> None:
    rows_, T = args.ssd_rows, args.ssd_len
    inp = ssd_inputs(T, G=args.ssd_groups, rows=rows_)
    y_ref, g_ref = ssd_fwd_bwd(ssd_chunked_ref, inp, fp32=True)
    y_ref, g_ref = y_ref.detach(), [g.detach() for g in g_ref]
    for name, chunk in [(b, int(c)) for b in args.ssd_backends.split(",") for c in args.ssd_chunks.split(",")]:
        try:
            k = resolve_kernels(KernelConfig(ssd=name), DEV)
        except RuntimeError as e:
            _row(rows, section="ssd", backend=name, error=str(e))
            continue
        torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            y, g = ssd_fwd_bwd(k.ssd_chunked, inp, chunk=chunk)  # first call: compiles / autotunes
            first_s = time.perf_counter() - t0
            errs = dict(y=rel_err(y, y_ref), **{f"grad_{n}": rel_err(a, b) for n, a, b in zip(SSD_ARGS, g, g_ref)})
            del y, g
            reps = 3 if name == "reference" else args.repeats
            fwd = cuda_ms(lambda: k.ssd_chunked(*(inp[n] for n in SSD_ARGS), chunk_size=chunk), 2, reps)
            fwd_bwd = cuda_ms(lambda: ssd_fwd_bwd(k.ssd_chunked, inp, chunk=chunk), 2, reps)
            graphed = {}
            if args.ssd_cuda_graph and name != "reference":
                graphed["fwd_bwd_graph_ms"] = graphed_ms(lambda: ssd_fwd_bwd(k.ssd_chunked, inp, chunk=chunk), reps)
            _row(rows, section="ssd", backend=name, case=f"{args.ssd_shape}, G={args.ssd_groups}, chunk {chunk}",
                 L=T, batch=rows_, groups=args.ssd_groups, chunk=chunk, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                 first_call_s=first_s, rel_err=errs, peak_gib=torch.cuda.max_memory_allocated() / 2**30, **graphed)
        except Exception as e:  # noqa: BLE001 - a failed backend is a result to report, not a crash
            _row(rows, section="ssd", backend=name, error=f"{type(e).__name__}: {e}"[:2000])
        _free()


# ------------------------------------------------------------------ attention


def attn_inputs(T, H, K, D=64, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
    k = torch.randn(1, T, K, D, device=DEV, generator=g).bfloat16()
    v = torch.randn(1, T, K, D, device=DEV, generator=g).bfloat16()
    go = torch.randn(1, T, H, D, device=DEV, generator=g).bfloat16()
    return q, k, v, go


def attn_fwd_bwd(fn, q, k, v, go, *a, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, *a, **kw)
    return o, torch.autograd.grad(o, leaves, grad_outputs=go.to(o.dtype))


def pairs(L_, W):
    if W is None or W >= L_:
        return L_ * (L_ + 1) / 2
    return L_ * W - W * (W - 1) / 2


def _attention_case(rows: list, args, flex, label, K, W, docs, causal_ms, **extra):
    """One attention case through `flex`: checked against the fp32 reference, then timed;
    returns its fwd+bwd ms (None on error)."""
    pos = torch.arange(L, device=DEV)[None]
    q, k, v, go = attn_inputs(L, 16, K)
    seq = None if docs is None else (torch.arange(L, device=DEV) // (L // docs))[None].int()
    p = pos if seq is None else positions_from_seq_idx(seq)
    kw = dict(window=W, q_seq_BT=seq, k_seq_BS=seq)
    fwd_bwd = None
    try:
        t0 = time.perf_counter()
        o, g = attn_fwd_bwd(flex, q, k, v, go, p, p, **kw)
        first_s = time.perf_counter() - t0
        # The reference keeps every block's scores for its backward; at 32K a global
        # layer's would not fit, so the causal case is checked on the forward only.
        if W is None:
            with torch.no_grad():
                errs = dict(o=rel_err(o, attention_ref(q.float(), k.float(), v.float(), p, p, **kw)))
        else:
            o_r, g_r = attn_fwd_bwd(attention_ref, q.float(), k.float(), v.float(), go.float(), p, p, **kw)
            errs = dict(o=rel_err(o, o_r), **{f"grad_{n}": rel_err(a, b) for n, a, b in zip("qkv", g, g_r)})
            del o_r, g_r
        del o, g
        _free()
        fwd = cuda_ms(lambda: flex(q, k, v, p, p, **kw), 3, args.repeats)
        fwd_bwd = cuda_ms(lambda: attn_fwd_bwd(flex, q, k, v, go, p, p, **kw), 3, args.repeats)
        row = dict(section="attention", case=label, L=L, q_heads=16, kv_heads=K, window=W, docs=docs,
                   fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, first_call_s=first_s, rel_err=errs, **extra)
        if W is not None and causal_ms is not None:
            ratio = pairs(L, W) / pairs(L, None)
            row.update(pair_ratio=ratio, floor_fwd_bwd_ms=causal_ms * ratio, x_floor=fwd_bwd / (causal_ms * ratio))
        _row(rows, **row)
    except Exception as e:  # noqa: BLE001
        _row(rows, section="attention", case=label, window=W, error=f"{type(e).__name__}: {e}"[:2000], **extra)
    _free()
    return fwd_bwd


def varlen_flash(q, k, v, q_pos, k_pos, window=None, q_seq_BT=None, k_seq_BS=None):
    """torch's variable-length flash attention (FlashAttention-2 inside torch) over the same
    rows: every document of every row one sequence (cu_seqlens built here, on the host), the
    window as its left reach. A candidate measured beside FlexAttention, not a backend."""
    from torch.nn.attention.varlen import varlen_attn

    B, T = q.shape[:2]
    seq = torch.zeros(B, T, dtype=torch.int32, device=q.device) if q_seq_BT is None else q_seq_BT
    begin = document_starts(seq, first=True).flatten().nonzero().flatten()
    cu = torch.cat([begin, begin.new_tensor([B * T])]).int()
    longest = int((cu[1:] - cu[:-1]).max())
    o = varlen_attn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, longest, longest,
                    window_size=(-1, 0) if window is None else (window - 1, 0))
    return o.view(q.shape)


def bench_attention(rows: list, args) -> None:
    flex = resolve_kernels(KernelConfig(attention="flex"), DEV).attention
    causal_ms = _attention_case(rows, args, flex, "causal (SDPA)", 16, None, None, None)
    if args.attention_varlen:  # the presets' shapes through FlexAttention and torch's varlen flash
        for label, K, W, docs in [("window, GQA 16q/4kv", 4, 1024, None),
                                  ("window, GQA 16q/4kv, 8 packed docs", 4, 1024, 8),
                                  ("causal, GQA 16q/4kv, 8 packed docs", 4, None, 8),
                                  ("causal, GQA 16q/4kv", 4, None, None)]:
            _attention_case(rows, args, flex, label, K, W, docs, causal_ms)
            _attention_case(rows, args, varlen_flash, f"{label} [varlen flash]", K, W, docs, causal_ms)
        return
    for label, K, W, docs in [("window", 16, 512, None), ("window", 16, 1024, None), ("window", 16, 2048, None),
                              ("window, GQA 16q/4kv", 4, 1024, None), ("window, 8 packed docs", 16, 1024, 8)]:
        _attention_case(rows, args, flex, label, K, W, docs, causal_ms)
    # FlexAttention's kernel options (tile sizes, warps, stages), tried on the window cases.
    for opts in json.loads(args.flex_options):
        flex_backend.FLEX_KERNEL_OPTIONS.clear()
        flex_backend.FLEX_KERNEL_OPTIONS.update(opts)
        for label, K in [("window", 16), ("window, GQA 16q/4kv", 4)]:
            _attention_case(rows, args, flex, f"{label}, options {json.dumps(opts)}", K, 1024, None, causal_ms,
                            kernel_options=opts)
    flex_backend.FLEX_KERNEL_OPTIONS.clear()
    # A document block mask depends on the data: built once per forward (all layers share it).
    seq = (torch.arange(L, device=DEV) // (L // 8))[None].int()
    w_t = flex_backend.window_tensor(1024, torch.device(DEV))
    build = flex_backend._block_mask_fn(torch.device(DEV))
    ms = cuda_ms(lambda: build(flex_backend._mask_mod(w_t, seq, seq, None), 1, None, L, L, device=DEV), 2, 10)
    _row(rows, section="attention", case="build document block mask (per forward)", L=L, window=1024, ms=ms)


# ------------------------------------------------------------------ conv1d

def bench_conv1d(rows: list, args) -> None:
    """The Mamba conv (4 taps, SiLU, bias) on the channels [2048, 6144) of a 6176-wide
    projection, as `small` (8 x 4096) and `1b` (1 x 32768) see it, over packed documents; the
    backends of `--conv-backends` against the fp32 reference, with the floor: input and output read or
    written once (forward: x, y; backward: x, dy, dx) at the card's bandwidth."""
    from fusiontree.ops.conv1d import causal_conv1d_ref

    tb_per_s = hbm_tb_per_s(torch.cuda.get_device_name())
    for B, T in [(8, 4096), (1, 32768)]:
        g = torch.Generator(device=DEV).manual_seed(B)
        proj = torch.randn(B, T, 6176, device=DEV, generator=g).bfloat16().requires_grad_()
        w = (torch.randn(4096, 4, device=DEV, generator=g) * 0.5).bfloat16().requires_grad_()
        b = (torch.randn(4096, device=DEV, generator=g) * 0.5).bfloat16().requires_grad_()
        seq = (torch.arange(T, device=DEV) * 7 // T).expand(B, T).contiguous()  # 7 documents per row
        gy = torch.randn(B, T, 4096, device=DEV, generator=g).bfloat16()
        leaves = [proj, w, b]

        def fwd_bwd(fn):
            y, _ = fn(proj[..., 2048:6144], w, b, seq_idx_BT=seq)
            return torch.autograd.grad(y, leaves, gy)

        leaves32 = [t.detach().float().requires_grad_() for t in leaves]
        y32, _ = causal_conv1d_ref(leaves32[0][..., 2048:6144], leaves32[1], leaves32[2], seq_idx_BT=seq)
        want = [y32, *torch.autograd.grad(y32, leaves32, gy.float())]
        case = f"{B} x {T}, 4096 of 6176 channels, 7 docs"
        for backend in args.conv_backends.split(","):
            for tiles in (args.conv_triton_tiles.split(",") if backend == "triton" else [None]):
                _bench_conv_backend(rows, args, backend, tiles, case, B, T, proj, w, b, seq, fwd_bwd, want, tb_per_s)
        del want, y32, leaves32, proj
        _free()


def _bench_conv_backend(rows, args, backend, tiles, case, B, T, proj, w, b, seq, fwd_bwd, want, tb_per_s) -> None:
    """One conv1d backend timed; `tiles` (triton only): "FWD/DPRE/DX" set for this row."""
    try:
        conv = resolve_kernels(KernelConfig(conv1d=backend), DEV).conv1d
        if backend == "reference":  # as a compiled block runs it
            conv = torch.compile(conv)
        if tiles is not None:
            from fusiontree.ops.backends import conv1d_triton

            conv1d_triton.FWD_TILES, conv1d_triton.DPRE_TILES, conv1d_triton.DX_TILES = conv1d_triton.parse_tiles(tiles)
            backend = f"triton[{tiles}]"
        y, _ = conv(proj[..., 2048:6144], w, b, seq_idx_BT=seq)
        errs = dict(zip(("y", "d_proj", "d_w", "d_b"), (rel_err(a, r) for a, r in zip([y, *fwd_bwd(conv)], want))))
        with torch.no_grad():
            fwd = cuda_ms(lambda: conv(proj[..., 2048:6144], w, b, seq_idx_BT=seq), 3, args.repeats)
        both = cuda_ms(lambda: fwd_bwd(conv), 3, args.repeats)
        graphed = graphed_ms(lambda: fwd_bwd(conv), args.repeats) if backend != "reference" else None
        nbytes = B * T * 4096 * 2
        floor = {}  # an unknown card: no floor
        if tb_per_s is not None:
            floor_ms = (2 * nbytes + 3 * nbytes) / (tb_per_s * 1e12) * 1e3
            floor = dict(floor_fwd_bwd_ms=floor_ms, x_floor=both / floor_ms)
        _row(rows, section="conv1d", case=case, backend=backend, fwd_ms=fwd, fwd_bwd_ms=both,
             fwd_bwd_graph_ms=graphed, rel_err=errs, **floor)
    except Exception as e:  # noqa: BLE001
        _row(rows, section="conv1d", case=case, backend=backend, error=f"{type(e).__name__}: {e}"[:2000])


# ------------------------------------------------------------------ decode


def bench_decode(rows: list, args) -> None:
    inp = ssd_inputs(1, seed=3)
    g = torch.Generator(device=DEV).manual_seed(4)
    state0 = torch.randn(1, 32, 64, 128, device=DEV, generator=g)
    step_args = [inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0], inp["D"]]
    with torch.no_grad():
        s_ref = state0.clone()
        y_ref = ssd_step_ref(s_ref, *(a.float() for a in step_args))
        for name in ["mamba_ssm", "reference"]:
            try:
                k = resolve_kernels(KernelConfig(ssd=name), DEV)
            except RuntimeError as e:
                _row(rows, section="decode", op="ssd step", backend=name, error=str(e))
                continue
            s = state0.clone()
            y = k.ssd_step(s, *step_args)
            errs = dict(y=rel_err(y, y_ref), state=rel_err(s, s_ref))
            ms = cuda_ms(lambda: k.ssd_step(s, *step_args), 20, 200)
            _row(rows, section="decode", op="ssd step", backend=name, state="1 x 32 x 64 x 128 fp32",
                 ms=ms, rel_err=errs)

        for label, slots, W in [("ring cache, W=1024", 1024, 1024), ("global cache, 32K context", L, None)]:
            g = torch.Generator(device=DEV).manual_seed(5)
            q = torch.randn(1, 1, 16, 64, device=DEV, generator=g).bfloat16()
            kc = torch.randn(1, slots + 1, 4, 64, device=DEV, generator=g).bfloat16()
            vc = torch.randn(1, slots + 1, 4, 64, device=DEV, generator=g).bfloat16()
            # Token n of the context sits in slot n % slots; the new token (position L) is last.
            ctx = torch.arange(L - slots, L, device=DEV)
            cpos = torch.empty(slots, dtype=torch.long, device=DEV)
            cpos[ctx % slots] = ctx
            kpos = torch.cat([cpos, torch.tensor([L], device=DEV)])[None]
            qpos = torch.tensor([[L]], device=DEV)
            o_ref = attention_ref(q.float(), kc.float(), vc.float(), qpos, kpos, window=W)
            for name in ["flex", "reference"]:
                fn = resolve_kernels(KernelConfig(attention=name), DEV).attention
                o = fn(q, kc, vc, qpos, kpos, window=W)
                ms = cuda_ms(lambda: fn(q, kc, vc, qpos, kpos, window=W), 20, 200)
                _row(rows, section="decode", op=f"attention step, {label}", backend=name, ms=ms,
                     rel_err=dict(o=rel_err(o, o_ref)))


def print_table(rows: list) -> None:
    print("\n| section | case | backend | fwd ms | fwd+bwd ms | x floor | rel err (max over outputs, grads) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['section']} | {r.get('case', r.get('op', ''))} | {r.get('backend', 'flex')} | error: "
                  f"{r['error'][:120]} | | | |")
            continue
        err = max(r["rel_err"].values()) if "rel_err" in r else float("nan")
        fwd = r.get("fwd_ms", r.get("ms"))
        case = r.get("case", r.get("op", f"L={L}")) + (f", W={r['window']}" if r.get("window") else "")
        if "fwd_bwd_graph_ms" in r:
            case += f" (fwd+bwd from a CUDA graph: {r['fwd_bwd_graph_ms']:.3f} ms)"
        print(f"| {r['section']} | {case} | {r.get('backend', 'flex')} | "
              f"{fwd:.3f} | {r.get('fwd_bwd_ms', float('nan')):.3f} | {r.get('x_floor', float('nan')):.2f} | "
              f"{err:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="ssd,attention,conv1d,decode")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--attention-varlen", action="store_true",
                    help="attention section: the presets' GQA shapes (window 1024 and causal, with and without 8 packed "
                         "documents) through FlexAttention and torch's varlen flash attention, side by side")
    ap.add_argument("--ssd-shape", default=f"1x{L}", help="ssd section: ROWSxT (default 1x32768)")
    ap.add_argument("--ssd-groups", type=int, default=1, help="ssd section: B/C groups of the 32 heads")
    ap.add_argument("--ssd-chunks", default="256", help="ssd section: comma-separated chunk lengths")
    ap.add_argument("--ssd-backends", default="mamba_ssm,reference", help="ssd section: backends to time")
    ap.add_argument("--ssd-cuda-graph", action="store_true",
                    help="ssd section: also time forward + backward replayed from a CUDA graph (fwd_bwd_graph_ms: "
                         "the device's time alone; eager calls of mamba-ssm's kernels can be bound by the host)")
    ap.add_argument("--conv-backends", default="causal_conv1d,triton,reference",
                    help="conv1d section: backends to time (reference: the PyTorch conv compiled, as in a compiled block)")
    ap.add_argument("--conv-triton-tiles", default="32x128x4/64x64x4/32x128x4",
                    help="conv1d section: the triton backend's tiles to try, comma-separated FWD/DPRE/DX entries, "
                         "each BLOCK_TxBLOCK_CxWARPS")
    ap.add_argument("--flex-options", default="[]",
                    help='JSON list of FlexAttention kernel_options dicts to try on the W=1024 cases, '
                         'e.g. \'[{"BLOCK_M": 64, "BLOCK_N": 64}, {"num_stages": 2}]\'')
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kernels_gpu.json"))
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    try:
        args.ssd_rows, args.ssd_len = (int(v) for v in args.ssd_shape.split("x"))
    except ValueError:
        raise SystemExit(f"--ssd-shape {args.ssd_shape!r}: expected ROWSxT, e.g. 8x4096") from None
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels_gpu.py needs a CUDA device")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                commit=args.commit, command=" ".join(sys.argv))
    for mod in ("triton", "mamba_ssm"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError as e:
            meta[mod] = f"not importable: {e}"
    print(json.dumps(meta), flush=True)
    rows: list = []
    sections = {"ssd": bench_ssd, "attention": bench_attention, "conv1d": bench_conv1d, "decode": bench_decode}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        sections[name](rows, args)
        print(f"# section {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
