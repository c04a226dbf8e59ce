"""Multi-GPU training throughput: tensor, sequence and data parallelism with DeepSpeed ZeRO.

    python benchmarks/scaling_gpu.py [--preset 1b] [--cases 32768:tp1,32768:tp2,32768:tp2xdp2-z1,...]

A case is SEQ:LAYOUT, LAYOUT = tp{T}[xdp{D}][-z{S}] (data-parallel size D, default 1; ZeRO
stage S, default 1). Tensor parallelism always runs with sequence parallelism, as Megatron
does. Each case is one `torchrun --nproc_per_node T*D` of this script (`--worker`), which
builds the model the way the trainer (fusiontree/train/trainer.py) does (parallelize(), torch's AdamW under
deepspeed.initialize with the mpu adapter, bf16, configs/ds/zero{S}.json) and times
forward + loss + backward + optimizer step on packed random token rows (micro-batch 1 per
data-parallel rank, documents of random length with position_ids / seq_idx as the loader
makes them). Activation checkpointing per block is on from 8K tokens up.

Reported per case: tokens/s over all GPUs and per GPU, MFU (model FLOPs per token, counted as
in fusiontree/models/flops.py, x tokens/s per GPU / the card's dense bf16 peak), peak memory
(the largest of the ranks), and the weak-scaling efficiency: tokens/s per GPU over the
1-GPU case's at the same length. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _results import git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CASES = ("4096:tp1,4096:tp2,4096:tp2xdp2-z1,4096:tp2xdp2-z2,"
                 "32768:tp1,32768:tp2,32768:dp2-z1,32768:dp2-z2,32768:tp4,"
                 "32768:tp2xdp2-z1,32768:tp2xdp2-z2,32768:dp4-z1,32768:dp4-z2")
LAYOUT = re.compile(r"^(?:tp(\d+))?(?:x?dp(\d+))?(?:-z([0-3]))?$")


def parse_case(case: str) -> dict:
    seq, _, layout = case.partition(":")
    m = LAYOUT.match(layout)
    if not seq.isdigit() or not m or not layout:
        raise ValueError(f"case {case!r}: expected SEQ:tp{{T}}[xdp{{D}}][-z{{S}}], e.g. 32768:tp2xdp2-z1")
    tp, dp, zero = int(m.group(1) or 1), int(m.group(2) or 1), int(m.group(3) or 1)
    return {"case": case, "seq_len": int(seq), "tp": tp, "dp": dp, "zero": zero, "gpus": tp * dp}


def packed_batch(seq_len: int, vocab: int, gen: torch.Generator, device) -> dict:
    """One row of documents of random length (mean ~seq_len/4), as the packing loader yields."""
    from fusiontree.data.packing import positions_from_doc_starts

    starts, s = [0], 0
    while True:
        s += int(torch.randint(seq_len // 16, seq_len // 2, (1,), generator=gen))
        if s >= seq_len:
            break
        starts.append(s)
    pos, seq = positions_from_doc_starts([starts], seq_len)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "position_ids": torch.from_numpy(pos).to(device),
            "seq_idx": torch.from_numpy(seq).to(device)}


def worker(a: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    from fusiontree.config import KernelConfig, LossConfig, ParallelConfig, RunConfig
    from fusiontree.models.config import model_preset
    from fusiontree.models import HybridLanguageModel
    from fusiontree.models.flops import count_params, flops_per_token
    from fusiontree.ops import resolve_kernels
    from fusiontree.parallel import DeepSpeedMPU, init_parallel_state, parallelize
    from fusiontree.train.distributed import init_distributed
    from fusiontree.train.losses import HybridModelLoss
    from fusiontree.train.mechanics import apply_activation_checkpointing
    from fusiontree.train.metrics import device_peak_flops
    from fusiontree.train.optim import SkippableAdamW, param_groups
    from fusiontree.train.trainer import deepspeed_config

    c = parse_case(a.case)
    di = init_distributed()
    if di.world_size != c["gpus"]:
        raise SystemExit(f"case {a.case} needs {c['gpus']} processes, got {di.world_size}")
    pcfg = ParallelConfig(tensor_parallel=c["tp"], sequence_parallel=c["tp"] > 1)
    mcfg = model_preset(a.preset)
    for kv in a.set:
        key, _, value = kv.partition("=")
        mcfg = dataclasses.replace(mcfg, **{key: type(getattr(mcfg, key))(value)})
    pcfg.validate(mcfg, [c["seq_len"]])
    init_parallel_state(pcfg)
    mpu = DeepSpeedMPU()
    dp_rank = mpu.get_data_parallel_rank()

    torch.manual_seed(0)
    kernels = resolve_kernels(KernelConfig(), di.device)
    model = HybridLanguageModel(mcfg, kernels).to(di.device)
    model.check_inputs = False
    ckpt = c["seq_len"] >= a.ckpt_from
    if c["tp"] > 1:
        model = parallelize(model, pcfg)
    if ckpt:
        apply_activation_checkpointing(model)
    opt = SkippableAdamW(param_groups(model, 0.1), lr=1e-4)
    ds = deepspeed_config(str(ROOT / f"configs/ds/zero{c['zero']}.json"), RunConfig(), 1, 1,
                         bf16=di.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=mpu)
    loss_fn = HybridModelLoss(LossConfig())
    gen = torch.Generator().manual_seed(1000 + dp_rank)  # the ranks of one TP group read the same rows
    batches = [packed_batch(c["seq_len"], mcfg.vocab_size, gen, di.device) for _ in range(2)]

    def step(i: int) -> None:
        b = batches[i % 2]
        out = engine(b["input_ids"], position_ids=b["position_ids"], seq_idx=b["seq_idx"])
        loss, _ = loss_fn(out.logits, b["input_ids"], out.gates, seq_idx_BT=b["seq_idx"])
        engine.backward(loss)
        engine.step()

    cuda = di.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    status = "ok"
    times: list[float] = []
    try:
        for i in range(a.warmup):
            step(i)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(di.device)
        for i in range(a.steps):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            step(i)
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        status = "out of memory"
    mem = torch.cuda.max_memory_allocated(di.device) / 2**30 if cuda else 0.0
    flag = torch.tensor([0.0 if status == "ok" else 1.0, mem], device=di.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    step_t = torch.tensor([statistics.median(times) if times else 0.0], device=di.device)
    dist.all_reduce(step_t, op=dist.ReduceOp.MAX)
    if di.is_main:
        row = dict(c, preset=a.preset, params=count_params(mcfg), kernels=kernels.describe(),
                   checkpointing=ckpt, card=torch.cuda.get_device_name() if cuda else "cpu",
                   torch=torch.__version__)
        if flag[0] > 0:
            row["error"] = "out of memory"
        else:
            tokens = c["dp"] * c["seq_len"]
            tps = tokens / float(step_t)
            peak = device_peak_flops(di.device)[0] if cuda else float("nan")
            fpt = flops_per_token(mcfg, c["seq_len"])
            row.update(step_s=float(step_t), step_s_all=times, tokens_per_s=tps, tokens_per_s_per_gpu=tps / c["gpus"],
                       flops_per_token=fpt, mfu=tps / c["gpus"] * fpt / peak)
        row["peak_mem_gib"] = float(flag[1])
        Path(a.row_out).write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def run_case(case: str, a: argparse.Namespace, port: int) -> dict:
    c = parse_case(case)
    row_out = Path(a.out).with_suffix(f".{re.sub(r'[^0-9a-z]', '_', case)}.json")
    row_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(c["gpus"]), "--master_port",
           str(port), __file__, "--worker", "--case", case, "--preset", a.preset, "--warmup", str(a.warmup),
           "--steps", str(a.steps), "--ckpt-from", str(a.ckpt_from), "--row-out", str(row_out),
           *[f"--set={kv}" for kv in a.set]]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.case_timeout)
    if res.returncode or not row_out.exists():
        err = [ln for ln in (res.stderr + res.stdout).splitlines() if "Error" in ln and "rank" in ln]
        tail = err[-1] if err else (res.stderr or res.stdout)[-1500:]
        return dict(c, error=f"rc={res.returncode}: {tail}", wall_s=time.time() - t0)
    row = json.loads(row_out.read_text())
    row_out.unlink()
    row["wall_s"] = time.time() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="model field override, e.g. ssm_groups=2")
    ap.add_argument("--ckpt-from", type=int, default=8192, help="activation checkpointing from this length up")
    ap.add_argument("--case-timeout", type=int, default=300)
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scaling_gpu.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="run the cases on 2 CPU processes (gloo): a check "
                    "of the script, not a measurement")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    ap.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if not torch.cuda.is_available() and not a.cpu_smoke:
        raise SystemExit("scaling_gpu.py measures multi-GPU training; no CUDA device is visible")
    cases = [parse_case(x)["case"] for x in a.cases.split(",")]
    have = torch.cuda.device_count() if torch.cuda.is_available() else 2
    rows = []
    for i, case in enumerate(cases):
        need = parse_case(case)["gpus"]
        if need > have:
            rows.append(dict(parse_case(case), error=f"needs {need} GPUs, {have} visible"))
        else:
            rows.append(run_case(case, a, 29700 + i))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s_all"})[:600], flush=True)
    base = {r["seq_len"]: r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1 and "error" not in r}
    for r in rows:
        if "error" not in r and r["seq_len"] in base:
            r["weak_scaling"] = r["tokens_per_s_per_gpu"] / base[r["seq_len"]]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run, gloo)"
    print(f"\n{a.preset}, card: {card} x {have}, torch {torch.__version__}")
    print("| seq | layout | GPUs | ZeRO | tokens/s | tokens/s/GPU | MFU | peak GiB/GPU | vs 1 GPU (per GPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layout = r["case"].partition(":")[2]
        if "error" in r:
            print(f"| {r['seq_len']} | {layout} | {r['gpus']} | {r['zero']} | {r['error'][:80]!r} | | | | |")
            continue
        ws = f"{r['weak_scaling']:.0%}" if "weak_scaling" in r else ""
        print(f"| {r['seq_len']} | {layout} | {r['gpus']} | {r['zero']} | {r['tokens_per_s'] / 1e3:.1f}K | "
              f"{r['tokens_per_s_per_gpu'] / 1e3:.2f}K | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | {ws} |")
    meta = {"card": card, "gpus": have, "torch": torch.__version__, "commit": git_commit(a.commit),
            "command": " ".join(sys.argv)}
    write_results(a.out, meta, rows=rows)


if __name__ == "__main__":
    main()
