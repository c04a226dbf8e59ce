"""How long `launch/export_hf.py` takes on a preset's checkpoint, on the CPU (no GPU involved).

    python benchmarks/export_hf.py --preset 1b --out benchmarks/results/export_hf_1b_cpu.json

Set-up (not timed): the preset's model with random weights, saved as a checkpoint directory the
way launch/train.py writes one (model.pt, config.yaml, meta.json), and a SentencePiece tokenizer
of the preset's vocabulary size trained on this machine's Python standard library (cached in
--work, reused by later runs). Timed: the export command in a fresh process, start to exit, and the export's own
stages (read the checkpoint, write the safetensors shards, config + code + tokenizer).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from _results import git_commit, write_results
from fusiontree.config import load_config
from fusiontree.hf.checkpoints import write_weights_checkpoint
from fusiontree.host import cpu_count
from fusiontree.models import HybridLanguageModel
from fusiontree.models.config import model_preset

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_for(vocab_size: int, work: Path) -> Path:
    """A SentencePiece model of `vocab_size` ids (trained once per work directory)."""
    path = work / f"tokenizer_{vocab_size}.model"
    if path.is_file():
        return path
    from fusiontree.data.corpus import stdlib_dir
    from fusiontree.data.tokenizer import train_tokenizer

    lines = []
    for f in sorted(stdlib_dir().rglob("*.py")):
        lines.extend(f.read_text(errors="replace").splitlines())
        if len(lines) > 600_000:
            break
    path.write_bytes(train_tokenizer(lines, vocab_size, num_threads=cpu_count(), seed=0))
    return path


def random_checkpoint(preset: str, work: Path, tokenizer: Path) -> Path:
    """The preset's model with random weights (normal, std 0.02; norms 1), saved as a checkpoint."""
    cfg = load_config(None, [f"--model.preset={preset}"])
    ckpt = work / f"ckpt_{preset}"
    if (ckpt / "meta.json").is_file() and json.loads((ckpt / "meta.json").read_text()).get("tokenizer") == str(tokenizer):
        return ckpt  # made by an earlier run in this work directory
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HybridLanguageModel(cfg.model).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s).normal_(0, 0.02, generator=g) for k, s in shapes.items()}
    meta = {"step": 0, "tokenizer": str(tokenizer), "preset": preset, "world_size": 1}
    return write_weights_checkpoint(ckpt, cfg, state, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--work", default="/tmp/fusiontree_bench_export", help="scratch directory (checkpoint, export)")
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/export_hf_1b_cpu.json"))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = model_preset(a.preset)
    t0 = time.perf_counter()
    tok = tokenizer_for(cfg.vocab_size, work)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = random_checkpoint(a.preset, work, tok)
    t_ckpt = time.perf_counter() - t0
    runs = []
    for r in range(a.repeats):
        out = work / f"hf_{a.preset}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "launch/export_hf.py"), "--checkpoint", str(ckpt), "--out",
                              str(out), "--max-shard-size", a.max_shard_size], capture_output=True, text=True,
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        wall = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        summary = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
        runs.append({"run": r + 1, "wall_s": wall, **{f"{k}_s": v for k, v in summary["seconds"].items()},
                     "files": len(summary["weight_files"]), "bytes": summary["weight_bytes"]})
    n_params = summary["parameters"]
    print(f"export of preset {a.preset}: {n_params / 1e9:.2f}B parameters, {summary['weight_bytes'] / 2**30:.2f} GiB "
          f"{summary['dtype']} in {runs[-1]['files']} files (set-up: tokenizer {t_tok:.0f} s, checkpoint {t_ckpt:.0f} s)")
    print(f"| run | wall (process) s | read s | weights s | config+code+tokenizer s | export total s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        print(f"| {run['run']} | {run['wall_s']:.1f} | {run['read_s']:.1f} | {run['weights_s']:.1f} | "
              f"{run['rest_s']:.1f} | {run['total_s']:.1f} |")
    write_results(a.out, {
        "benchmark": "export_hf", "preset": a.preset, "parameters": n_params, "weight_bytes": summary["weight_bytes"],
        "dtype": summary["dtype"], "max_shard_size": a.max_shard_size, "commit": git_commit(),
        "setup_s": {"tokenizer": t_tok, "checkpoint": t_ckpt},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": False,
                    "torch": torch.__version__, "load_avg_1m_at_end": os.getloadavg()[0]},
        "command": " ".join(["python", "benchmarks/export_hf.py", *(argv if argv is not None else sys.argv[1:])])},
        runs=runs)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
