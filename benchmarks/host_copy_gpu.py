"""What a checkpoint snapshot costs the training loop: device-to-host copies of a state.

    python benchmarks/host_copy_gpu.py --gib 8 --tensors 4

For each kind of host buffer, in a fresh process (torch's host allocator and its settings are
per process), copies `--tensors` device tensors of `--gib` GiB in all into new host buffers
(the first save: allocation included), then again into the same buffers (a later save):

  pinned             torch.empty(pin_memory=True) with torch's defaults (cudaHostAlloc)
  pinned_register    the same with the allocator settings the asynchronous checkpoint uses:
                     pageable memory paged in by several threads, then registered with CUDA
  pageable           plain host tensors (the copy goes through CUDA's staging buffers)

Prints a table and writes JSON (seconds and GiB/s of each pass).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _results import git_commit, write_results

KINDS = ("pinned", "pinned_register", "pageable")


def measure(kind: str, gib: float, tensors: int) -> dict:
    import torch

    from fusiontree.checkpoint import _HostSnapshot

    n = int(gib * (1 << 30) / 4 / tensors)
    src = [torch.randn(n, device="cuda") for _ in range(tensors)]
    torch.cuda.synchronize()
    snapshot = _HostSnapshot()
    if kind == "pinned":
        snapshot._allocator_set = True  # torch's own pinned allocation, untouched
    out = {}
    for name in ("first", "reused"):
        t0 = time.perf_counter()
        if kind == "pageable":
            host = out.get("bufs") or [torch.empty(n) for _ in range(tensors)]
            for h, s in zip(host, src):
                h.copy_(s)
            out["bufs"] = host
        else:
            host = snapshot.copy(src)
            snapshot.synchronize()
        out[f"{name}_s"] = time.perf_counter() - t0
        if kind != "pageable":
            snapshot.release()
        assert torch.equal(host[-1][-16:], src[-1][-16:].cpu())
    out.pop("bufs", None)
    return {"kind": kind, "gib": gib, "tensors": tensors, **out,
            **{f"{k}_gib_per_s": gib / out[f"{k}_s"] for k in ("first", "reused")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/host_copy_gpu.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.gib, args.tensors)))
        return
    rows = []
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            raise SystemExit(f"--kinds: {kind!r} is not one of {KINDS}")
        res = subprocess.run([sys.executable, __file__, "--one", kind, "--gib", str(args.gib),
                              "--tensors", str(args.tensors)], capture_output=True, text=True)
        if res.returncode:
            rows.append({"kind": kind, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"card: {card}\n| host buffers | first copy s (GiB/s) | reused copy s (GiB/s) |\n|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | error: {r['error']} | |")
        else:
            print(f"| {r['kind']} | {r['first_s']:.2f} ({r['first_gib_per_s']:.1f}) | "
                  f"{r['reused_s']:.2f} ({r['reused_gib_per_s']:.1f}) |")
    write_results(args.out, {"card": card, "commit": git_commit(), "command": " ".join(sys.argv)}, rows=rows)


if __name__ == "__main__":
    main()
