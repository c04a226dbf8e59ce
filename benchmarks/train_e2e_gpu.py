"""Training throughput through the trainer users run: `launch/train.py` end to end.

    python benchmarks/train_e2e_gpu.py --cases small@4096x4+compile,transformer-small@4096x4+compile
    python benchmarks/train_e2e_gpu.py --cases 1b@32768x1+compile+ckpt10+gpus2,mamba-ref-1b@32768x1+ckpt10

Builds SentencePiece shards once from this machine's own Python sources (the standard library,
plus any --corpus directories; vocabulary 32000, buckets for every case's length), then runs
`launch/train.py` for each case (`python` for one GPU, the `deepspeed` launcher for several),
reads the run's `metrics.jsonl` and writes one row per case to the JSON: tokens/s (median of the
steps after `--warmup`), MFU (the trainer's own: every FLOP the model does over the card's dense
bf16 peak, per GPU), peak memory, `first_step_s` (from starting the command to the end of step
1, launcher included), the trainer's start-up phases, the checkpoint stall, the first and last
loss. Ratios in the table are measured in the same invocation.

A case is PRESET@SEQxMB with optional +flags; MB is the micro-batch in sequences of SEQ tokens:
  +compile     train.compile (per-block torch.compile)
  +graphs      train.cuda_graphs (per-block CUDA graphs of forward and backward)
  +ckpt/+ckptN activation checkpointing of every block / of the first N blocks
  +gpusN       N processes (GPUs); +tpN tensor parallel N with sequence parallelism (the rest is
               data parallel); +zN ZeRO stage N (default 1)
  +overlap     configs/ds/zeroN.json with zero_optimization.overlap_comm (gradient reduction
               overlapped with the backward) and contiguous_gradients turned on
  +accN        N micro-batches of gradient accumulation per optimizer step (default 4)
  +save[N]     save a checkpoint every N steps (default 5; the stall is reported); otherwise none
  +asave[N]    the same with train.async_checkpoint (written in the background; the first save
               also allocates the pinned buffers that later ones reuse, so space them for the
               steady state: a save waits for the previous one's write)
  +profile     torch.profiler on the second-to-last step (the peer: one step after its warm-up);
               its table goes next to the JSON
  ~KEY=VALUE   any trainer setting for this case (after the flags, repeatable), e.g.
               small@4096x4+compile+graphs~train.compile_loss=true~model.chunk_size=128
PRESET `mamba-ref-NAME` is mamba-ssm's own MambaLMHeadModel sized like NAME, measured by
benchmarks/train_gpu.py (a training step outside the trainer: that package has no trainer of
ours); it takes +ckpt/+ckptN, and +fused for its fused path (needs causal-conv1d).

All trainer cases share one compile cache (`train.compile_cache_dir` under --work);
`--fresh-cache` empties it first, so that the first case of each configuration starts cold
and a later case of the same configuration warm (the row's `cache` says which).

`--side-by-side` runs one-GPU cases at the same time, each on its own GPU of the machine (a
case of several GPUs waits for all of them): list a model and its twin next to each other and
they are measured together.

`--dry-run` runs the same pipeline on the CPU with tiny cases (the debug preset), to check the
plumbing on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _results import git_commit, write_results

from fusiontree.host import cpu_count

ROOT = Path(__file__).resolve().parents[1]

FLAG = re.compile(r"^(compile|graphs|ckpt\d*|gpus\d+|tp\d+|z[0-3]|overlap|acc\d+|a?save\d*|profile|fused)$")
CASE = re.compile(r"^([\w.-]+)@(\d+)x(\d+)$")


SETTING = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=[^~]+$")


def parse_case(case: str) -> dict:
    spec, *settings = case.split("~")
    bad = [x for x in settings if not SETTING.match(x)]
    if bad:
        raise SystemExit(f"case {case!r}: a ~setting is ~SECTION.KEY=VALUE, e.g. ~train.compile_loss=true (bad: {bad})")
    if settings and spec.startswith("mamba-ref-"):
        raise SystemExit(f"case {case!r}: ~settings go to launch/train.py; the mamba-ssm peer does not run through it")
    head, *flags = spec.split("+")
    m = CASE.match(head)
    bad = [f for f in flags if not FLAG.match(f)]
    if not m or bad:
        raise SystemExit(f"case {case!r}: expected PRESET@SEQxMB[+flag...] with flags compile, graphs, ckpt[N], "
                         f"gpusN, tpN, zN, overlap, accN, save[N], asave[N], profile, fused (bad: {bad or head})")

    def num(prefix: str, default: int) -> int:
        got = [int(f[len(prefix):]) for f in flags if f.startswith(prefix) and f[len(prefix):].isdigit()]
        return got[0] if got else default

    ckpt = [f for f in flags if f.startswith("ckpt")]
    saves = [f for f in flags if re.match(r"^a?save\d*$", f)]
    tp = num("tp", 1)
    gpus = max(num("gpus", 1), tp)
    if gpus % tp:
        raise SystemExit(f"case {case!r}: gpus{gpus} is not a multiple of tp{tp}")
    return dict(case=case, preset=m.group(1), seq_len=int(m.group(2)), micro_batch=int(m.group(3)),
                compile="compile" in flags, graphs="graphs" in flags,
                checkpoint_layers=None if not ckpt else int(ckpt[0][4:] or 0), gpus=gpus, tp=tp,
                zero=num("z", 1), overlap="overlap" in flags, accum=num("acc", 4), save=bool(saves), save_every=int(re.sub(r"^a?save", "", saves[0]) or 5) if saves else 0,
                async_save=any(f.startswith("asave") for f in saves), fused="fused" in flags,
                profile="profile" in flags, settings=dict(x.split("=", 1) for x in settings))


DRY_SEQ = 256


def dry_run_case(c: dict) -> dict:
    """The case on the CPU: the debug preset (a twin stays a twin, a peer a peer), sequences of
    at most DRY_SEQ tokens, every flag as given; the case keeps its name."""
    kind = next((p for p in ("mamba-ref-", "transformer-") if c["preset"].startswith(p)), "")
    seq = min(c["seq_len"], DRY_SEQ)
    ckpt = c["checkpoint_layers"]
    return {**c, "preset": kind + "debug", "seq_len": seq, "checkpoint_layers": None if ckpt is None else min(ckpt, 1)}


def layout(c: dict) -> str:
    dp = c["gpus"] // c["tp"]
    parts = ([f"TP{c['tp']}+SP"] if c["tp"] > 1 else []) + ([f"DP{dp}"] if dp > 1 else [])
    return " x ".join(parts or ["1 GPU"]) + f", ZeRO-{c['zero']}" + (", overlap_comm" if c.get("overlap") else "")


def build_shards(out: Path, seq_lens: list[int], vocab: int, corpus: list[str], workers: int) -> dict:
    """The project's default corpus (this Python's standard library, without site-packages), plus
    the directories in `corpus`."""
    manifest = out / "manifest.json"
    if manifest.exists():
        built = json.loads(manifest.read_text()).get("build_args", {})
        if set(seq_lens) <= set(built.get("seq_lengths", [])) and built.get("vocab_size") == vocab:
            return {"shards": str(out), "reused": True}
    inputs = list(corpus)
    print(f"building shards from {'the standard library' if not inputs else inputs} into {out}", flush=True)
    cmd = [sys.executable, str(ROOT / "data_pipeline/build_shards.py"), *(["--input", *inputs] if inputs else []),
           "--output", str(out),
           "--vocab-size", str(vocab), "--seq-lengths", ",".join(map(str, sorted(set(seq_lens)))),
           "--workers", str(workers), "--no-progress"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {"shards": str(out), "build_s": time.time() - t0, "inputs": inputs, "command": " ".join(cmd)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(c: dict, args, run_dir: Path, cache: Path) -> list[str]:
    dp = c["gpus"] // c["tp"]
    micro_tokens = c["seq_len"] * c["micro_batch"]
    ckpt = c["checkpoint_layers"]
    over = {
        "model.preset": c["preset"], "model.vocab_size": args.vocab,
        "model.max_seq_len": max(c["seq_len"], 2048),
        "data.shards_dir": str(args.shards), "data.micro_batch_tokens": micro_tokens,
        "data.global_batch_tokens": micro_tokens * dp * c["accum"],
        "data.curriculum": f"[{{seq_len: {c['seq_len']}, until_tokens: 0}}]", "data.verify_shards": "size",
        "train.steps": args.steps, "train.lr_warmup_steps": 1, "train.log_every_steps": 1,
        "train.eval_every_steps": 10**6, "train.compile": c["compile"], "train.cuda_graphs": c["graphs"],
        "train.activation_checkpointing": ckpt is not None, "train.checkpoint_num_layers": ckpt or 0,
        "train.save_checkpoints": c["save"], "train.checkpoint_every_steps": c["save_every"] or 10**6,
        "train.async_checkpoint": c["async_save"],
        "train.compile_cache_dir": str(cache), "generate.max_new_tokens": 8,
        "parallel.tensor_parallel": c["tp"], "parallel.sequence_parallel": c["tp"] > 1,
        "out_dir": str(run_dir),
    }
    if not args.dry_run:
        over.update({"train.device": "cuda", "train.precision": "bf16"})
    else:
        over.update({"model.max_seq_len": max(c["seq_len"], 256), "data.num_workers": 0})
        if c["tp"] > 1:  # the debug preset has one SSM group; tensor parallelism splits whole groups
            over["model.ssm_groups"] = c["tp"]
    if c["profile"]:
        over["train.profile_steps"] = f"[{args.steps - 1}]"
    over.update(c["settings"])
    ds_config = ROOT / f"configs/ds/zero{c['zero']}.json"
    if c.get("overlap"):
        ds = json.loads(ds_config.read_text())
        ds["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        ds_config = run_dir.parent / f"{run_dir.name}.ds_config.json"
        ds_config.write_text(json.dumps(ds, indent=1))
    script = [str(ROOT / "launch/train.py"), "--ds_config", str(ds_config),
              *(f"--{k}={v}" for k, v in over.items())]
    if c["gpus"] == 1:
        return [sys.executable, *script]
    # DeepSpeed's launcher as a module: its console script may not be on PATH (a --target install)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(c["gpus"]),
            "--master_port", str(_free_port()), *script]


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_group(cmd: list[str], env: dict, timeout: float, stdout) -> tuple[int, bool]:
    """Run `cmd` in a process group of its own; at `timeout` kill the whole group (a launcher's
    training processes too, which would otherwise keep their GPU memory and spoil the next
    case). Returns (exit code, whether it was cut)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), True
    finally:
        try:  # whatever the group left behind (a rank that outlived its launcher)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_trainer_case(c: dict, args, work: Path, env: dict) -> dict:
    name = _safe(c["case"])
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = trainer_command(c, args, run_dir, work / "cache")
    t0 = time.time()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log_path = work / "logs" / f"{name}.log"
    with open(log_path, "w") as log:
        returncode, timed_out = run_group(cmd, env, args.case_timeout, stdout=log)
    wall = time.time() - t0
    rows = [r for r in read_metrics(run_dir) if "tokens_per_s" in r]
    base = {k: c[k] for k in ("case", "preset", "seq_len", "gpus")}
    base.update(micro_batch_tokens=c["seq_len"] * c["micro_batch"], layout=layout(c), compile=c["compile"],
                cuda_graphs=c["graphs"], async_checkpoint=c["async_save"], checkpoint_layers=c["checkpoint_layers"], grad_accum=c["accum"],
                cache=c.get("cache", "shared"), wall_s=wall, log=str(log_path), source="launch/train.py")
    if timed_out:
        base["cut"] = f"killed at --case-timeout {args.case_timeout} s after {len(rows)} steps"
    if (returncode != 0 and not timed_out) or len(rows) <= args.warmup:
        tail = log_path.read_text()[-3000:]
        why = base.get("cut") or f"exit {returncode}, {len(rows)} steps logged"
        return {**base, "error": why, "log_tail": tail}
    timed = rows[args.warmup:]
    first = next(r for r in rows if r["step"] == 1)
    row = {**base,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s"] for r in timed) / c["gpus"],
           "mfu": statistics.median(r["mfu"] for r in timed) if timed[0].get("mfu") is not None else None,
           "peak_gib": max(r["mem_gib"] for r in rows),
           "first_step_s": first["time"] - t0,
           "startup": {k: v for k, v in first.items() if k.startswith("startup")},
           "timed_steps": len(timed), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
           "step_s": [round(r["tokens"] / r["tokens_per_s"], 4) for r in rows]}
    saves = [r for r in read_metrics(run_dir) if "checkpoint_stall_s" in r]
    if saves:
        row["checkpoint_stall_s"] = statistics.median(r["checkpoint_stall_s"] for r in saves)
        row["checkpoint_stalls_s"] = [r["checkpoint_stall_s"] for r in saves]
        # each save's wait by part (model state, the previous save, engine state, ...)
        row["checkpoint_stall_parts_s"] = [{k.split("/", 1)[1]: round(v, 3) for k, v in r.items()
                                            if k.startswith("checkpoint_stall/")} for r in saves]
    prof = run_dir / "profile" / f"step_{args.steps - 1}.txt"
    if prof.exists():
        dest = Path(args.out).with_name(f"profile_e2e_{name}.txt")
        shutil.copy(prof, dest)
        row["profile"] = str(dest)
    return row


def run_peer_case(c: dict, args, work: Path, env: dict) -> dict:
    """mamba-ssm's reference LM through benchmarks/train_gpu.py (its own step, outside the trainer)."""
    flags = "" if c["checkpoint_layers"] is None else f"+ckpt{c['checkpoint_layers'] or ''}"
    flags += "+fused" if c["fused"] else ""
    spec = f"{c['preset']}@{c['seq_len']}x{c['micro_batch']}{flags}"
    out = work / ("peer_" + _safe(spec) + ".json")
    cmd = [sys.executable, str(ROOT / "benchmarks/train_gpu.py"), "--cases", spec, "--warmup", "3",
           "--steps", "5", "--out", str(out)]
    prof_dir = work / "peer_profiles"
    if c["profile"]:
        cmd += ["--profile", str(prof_dir)]
    t0 = time.time()
    log_path = work / "logs" / f"peer_{_safe(spec)}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        returncode, timed_out = run_group(cmd, env, args.case_timeout, stdout=log)
    base = dict(case=c["case"], preset=c["preset"], seq_len=c["seq_len"], gpus=1,
                micro_batch_tokens=c["seq_len"] * c["micro_batch"], layout="1 GPU (its own step)",
                source="benchmarks/train_gpu.py", wall_s=time.time() - t0)
    if returncode != 0 or not out.exists():
        why = f"no result within --case-timeout {args.case_timeout} s" if timed_out else f"exit {returncode}"
        return {**base, "error": why, "log_tail": log_path.read_text()[-3000:]}
    r = json.loads(out.read_text())["rows"][0]
    if "error" in r:
        return {**base, "error": r["error"]}
    row = {**base, "tokens_per_s": r["tokens_per_s"], "tokens_per_s_per_gpu": r["tokens_per_s"], "mfu": None,
           "peak_gib": r["peak_mem_gib"], "kernels": r["kernels"], "n_layer": r.get("n_layer")}
    if r.get("profile") and Path(r["profile"]).exists():  # next to the JSON, as the trainer cases' tables
        dest = Path(args.out).with_name(f"profile_e2e_{_safe(spec)}.txt")
        shutil.copyfile(r["profile"], dest)
        row["profile"] = str(dest)
    return row


_done: list[dict] = []  # rows so far, written after every case (a cut run keeps its results)


def run_case(c: dict, args, work: Path, gpus: list[int] | None) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    run = run_peer_case if c["preset"].startswith("mamba-ref-") else run_trainer_case
    try:
        r = run(c, args, work, env)
    except Exception as e:  # one broken case must not end the others
        r = {"case": c["case"], "preset": c["preset"], "seq_len": c["seq_len"], "gpus": c["gpus"],
             "error": f"{type(e).__name__}: {e}"}
    if gpus is not None:
        r["on_gpus"] = gpus
    print(json.dumps({k: v for k, v in r.items() if k not in ("log_tail", "step_s")}), flush=True)
    if "error" in r:
        print(r.get("log_tail", ""), flush=True)
    _done.append(r)
    write_results(Path(args.out).with_suffix(".partial.json"), {"command": " ".join(sys.argv)}, rows=_done)
    return r


def run_side_by_side(cases: list[dict], args, work: Path, n_gpus: int) -> list[dict]:
    """One-GPU cases on free GPUs at the same time, in list order; a case of several GPUs
    starts once all are free and holds them all."""
    free = list(range(n_gpus))
    cond = threading.Condition()
    results: list = [None] * len(cases)
    threads = []

    def work_on(i: int, c: dict, gpus: list[int]) -> None:
        results[i] = run_case(c, args, work, gpus)
        with cond:
            free.extend(gpus)
            free.sort()
            cond.notify_all()

    for i, c in enumerate(cases):
        need = c["gpus"]
        if need > n_gpus:
            results[i] = {"case": c["case"], "preset": c["preset"], "seq_len": c["seq_len"], "gpus": need,
                          "error": f"needs {need} GPUs, this machine has {n_gpus}"}
            continue
        with cond:
            cond.wait_for(lambda: len(free) >= need)
            gpus, free[:] = free[:need], free[need:]
        t = threading.Thread(target=work_on, args=(i, c, gpus))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results


def twin_of(case: str) -> str:
    return "transformer-" + case


def print_table(rows: list[dict]) -> None:
    by_case = {r["case"]: r for r in rows}
    print("| case | layout | tokens/s | per GPU | MFU | peak GiB | first step s | ckpt stall s | vs twin | vs peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r.get('layout', '')} | {r['error']} | | | | | | | |")
            continue
        twin = by_case.get(twin_of(r["case"]))
        peers = sorted((p for p in rows if p["preset"] == "mamba-ref-" + r["preset"] and p["seq_len"] == r["seq_len"]
                        and "error" not in p), key=lambda p: -p["tokens_per_s_per_gpu"])  # the peer at its best
        vs_twin = f"{r['tokens_per_s_per_gpu'] / twin['tokens_per_s_per_gpu']:.2f}x" if twin and "error" not in twin else ""
        vs_peer = f"{r['tokens_per_s_per_gpu'] / peers[0]['tokens_per_s_per_gpu']:.2f}x" if peers else ""
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        first = f"{r['first_step_s']:.0f}" if "first_step_s" in r else "-"
        stall = f"{r['checkpoint_stall_s']:.1f}" if "checkpoint_stall_s" in r else "-"
        print(f"| {r['case']} | {r['layout']} | {r['tokens_per_s'] / 1e3:.1f}K | {r['tokens_per_s_per_gpu'] / 1e3:.1f}K "
              f"| {mfu} | {r['peak_gib']:.1f} | {first} | {stall} | {vs_twin} | {vs_peer} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small@4096x4+compile,transformer-small@4096x4+compile")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per case")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    ap.add_argument("--work", default="/tmp/ft_e2e", help="shards, runs, caches and logs")
    ap.add_argument("--shards", default="", help="existing shards (default: build under --work)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--corpus", nargs="*", default=[], help="directories of text or code beside the standard library")
    ap.add_argument("--workers", type=int, default=cpu_count(), help="shard-building processes (default: the CPUs this process may use)")
    ap.add_argument("--case-timeout", type=int, default=900)
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_e2e_gpu.json"))
    ap.add_argument("--side-by-side", action="store_true", help="one-GPU cases at once, one per GPU")
    ap.add_argument("--fresh-cache", action="store_true", help="empty the shared compile cache first")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check with the debug preset")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = [parse_case(c) for c in args.cases.split(",")]
    if args.dry_run:
        cases = [dry_run_case(c) for c in cases]
    if args.fresh_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
        seen = set()
        for c in cases:  # what the cache holds when the case starts (side by side: close enough)
            key = tuple(c[k] for k in ("preset", "seq_len", "micro_batch", "compile", "graphs", "checkpoint_layers", "tp"))
            c["cache"] = "warm" if key in seen else "cold"
            seen.add(key)
    if args.dry_run:
        args.vocab = min(args.vocab, 512)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("train_e2e_gpu.py measures GPU training; no CUDA device is visible (--dry-run checks "
                             "the pipeline on CPU)")
    seq_lens = sorted({c["seq_len"] for c in cases if not c["preset"].startswith("mamba-ref-")})
    data = {}
    if not args.shards:
        data = build_shards(work / "shards", seq_lens, args.vocab, args.corpus, args.workers)
        args.shards = data["shards"]
    if args.side_by_side:
        n_gpus = 2 if args.dry_run else __import__("torch").cuda.device_count()
        rows = run_side_by_side(cases, args, work, n_gpus)
    else:
        rows = [run_case(c, args, work, None) for c in cases]
    card = "cpu (dry run)"
    if not args.dry_run:
        import torch

        card = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    print(f"\ncard: {card}")
    print_table(rows)
    meta = {"card": card, "commit": git_commit(args.commit), "command": " ".join(sys.argv), "steps": args.steps,
            "warmup": args.warmup, "side_by_side": args.side_by_side, "data": data}
    write_results(args.out, meta, rows=[{**r, "commit": meta["commit"], "card": card} for r in rows])


if __name__ == "__main__":
    main()
