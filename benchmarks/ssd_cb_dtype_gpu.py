"""C·Bᵀ kept in fp32 or in bf16: the SSD kernels that write or read it, at `small`'s training shape.

    python benchmarks/ssd_cb_dtype_gpu.py [--out FILE.json] [--commit HASH]

`mamba_ssm_saved` keeps each chunk's C·Bᵀ for its backward. This times, with each dtype, the
mamba-ssm Triton kernels that write it (the C·Bᵀ matmul) and read it (the chunk scan forward,
the chunk-scan dx backward, the in-chunk decay gradient) on one micro-batch of `small` (8 x 4096
tokens, 32 heads of 64, 8 groups, state 128, chunk 256; bf16 x, B, C; fp32 dt, A, D), after
mamba-ssm's autotuning, in the order fp32, bf16, fp32, bf16 (ms, CUDA events, mean of 30 calls).
It also gives each kernel's output with bf16 C·Bᵀ relative to fp32 C·Bᵀ (norm of the
difference over the norm). Needs a CUDA GPU and mamba-ssm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _results import cuda_span_ms, git_commit, write_results

BSZ, T, H, P, G, N, Q = 8, 4096, 32, 64, 8, 128, 256


def timed(fn, n: int = 30) -> float:
    fn()  # autotuning and compilation, outside the span
    torch.cuda.synchronize()
    return cuda_span_ms(fn, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results/ssd_cb_dtype_gpu.json"))
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ssd_cb_dtype_gpu.py times CUDA kernels: run it on a machine with a GPU")
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import _chunk_scan_bwd_ddAcs_stable, _chunk_scan_fwd
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_cumsum_fwd, _chunk_state_fwd
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_fwd

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(BSZ, T, H, P, device=dev, dtype=bf)
    B = torch.randn(BSZ, T, G, N, device=dev, dtype=bf) / N ** 0.5
    C = torch.randn(BSZ, T, G, N, device=dev, dtype=bf) / N ** 0.5
    dt = torch.rand(BSZ, T, H, device=dev) * 0.1 + 0.001
    A = -torch.rand(H, device=dev) * 4 - 0.5
    D = torch.randn(H, device=dev)
    dy = torch.randn(BSZ, T, H, P, device=dev, dtype=bf)
    dA_cs, dt_c = _chunk_cumsum_fwd(dt, A, Q)
    chunk_states = _chunk_state_fwd(B, x, dt_c, dA_cs, states_in_fp32=True)
    states, _ = _state_passing_fwd(chunk_states.flatten(-2), dA_cs[:, :, :, -1], chunk_size=Q, out_dtype=bf)
    states = states.unflatten(-1, (P, N))
    dstates = torch.randn_like(states)

    times, outs = {}, {}
    for run, dtype in (("fp32", torch.float32), ("bf16", bf), ("fp32 again", torch.float32), ("bf16 again", bf)):
        CB = _bmm_chunk_fwd(C, B, Q, output_dtype=dtype)
        kernels = {
            "C·Bᵀ matmul": lambda: _bmm_chunk_fwd(C, B, Q, output_dtype=dtype),
            "chunk scan fwd": lambda: _chunk_scan_fwd(CB, x, dt_c, dA_cs, C, states, D=D),
            "chunk-scan dx bwd": lambda: _chunk_scan_chunk_state_bwd_dx(x, dt_c, dA_cs, B, CB, dy, dstates, D=D),
            "in-chunk decay grad": lambda: _chunk_scan_bwd_ddAcs_stable(x, dt_c, dA_cs, dy, CB),
        }
        times[run] = {name: timed(fn) for name, fn in kernels.items()}
        outs[run] = {"y": kernels["chunk scan fwd"]()[0].float(), "dx": kernels["chunk-scan dx bwd"]()[0].float(),
                     "d(decay)": kernels["in-chunk decay grad"]().float()}
    rel = {k: float((outs["bf16"][k] - outs["fp32"][k]).norm() / outs["fp32"][k].norm()) for k in outs["fp32"]}

    names = list(times["fp32"])
    print(f"{'kernel':<22}" + "".join(f"{r:>12}" for r in times) + f"{'bf16/fp32':>11}")
    for name in names:
        ratio = (times["bf16"][name] + times["bf16 again"][name]) / (times["fp32"][name] + times["fp32 again"][name])
        print(f"{name:<22}" + "".join(f"{times[r][name]:>12.4f}" for r in times) + f"{ratio:>11.3f}")
    print("relative difference of the outputs, bf16 against fp32 C·Bᵀ:", {k: f"{v:.2e}" for k, v in rel.items()})
    card = torch.cuda.get_device_name()
    meta = {"card": card, "commit": git_commit(args.commit), "command": " ".join(sys.argv),
            "shape": dict(batch=BSZ, seq=T, heads=H, head_dim=P, groups=G, state=N, chunk=Q), "unit": "ms"}
    write_results(args.out, meta, times=times, rel_diff_bf16_vs_fp32=rel)


if __name__ == "__main__":
    main()
