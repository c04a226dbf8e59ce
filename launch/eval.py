"""Evaluate a checkpoint: perplexity, needle-in-a-haystack, code completion, system metrics.

    python launch/eval.py --checkpoint runs/x --tasks ppl,needle,code,system
    python launch/eval.py --checkpoint runs/x/checkpoints/step_00000100 --tasks ppl,needle,system --prune auto
    python launch/eval.py --checkpoint runs/x --tasks needle --needle.contexts=[256,512] --batch_size=8

--checkpoint: a checkpoint directory, or a run directory (its latest valid checkpoint).
Tasks: ppl, needle (= passkey), nextline, humaneval, code (= nextline + humaneval), system.
Task options (`EvalOptions` in fusiontree/eval/tasks.py, one section per task) come from
--options FILE.yaml and dotted overrides (--ppl.max_batches=4, --system.decode_mode=cuda_graph,
--system.train=false), checked strictly like a run config.
--prune auto|PLAN.json: also write a pruned checkpoint (the checkpoint's GateMonitor plan,
or the given one) and evaluate it beside the original: the report shows both.
Writes results.json, report.md and needle_heatmap.png (per model) to --out (default:
<checkpoint>/eval).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint
from fusiontree.cli import run_main
from fusiontree.config import load_dataclass
from fusiontree.eval.pruning import apply_pruning, load_plan, plan_with_thresholds
from fusiontree.eval.report import write_report
from fusiontree.eval.tasks import EvalOptions, evaluate, expand_tasks

log = logging.getLogger("fusiontree.eval")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    ap.add_argument("--tasks", default="ppl,needle,code,system", help="comma-separated (default %(default)s)")
    ap.add_argument("--options", default=None, help="YAML of task options (EvalOptions); dotted overrides go on top")
    ap.add_argument("--out", default="", help="output directory (default <checkpoint>/eval)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--kernels", default="config", choices=["config", "reference"],
                    help="config: the checkpoint's kernels (auto per device); reference: the PyTorch reference ops")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tokenizer", default="", help="a .model or tokenizer.json (default: the checkpoint's)")
    ap.add_argument("--prune", default="none", help="none | auto (the checkpoint's pruning_plan.json) | PLAN.json")
    ap.add_argument("--prune-off-threshold", type=float, default=None,
                    help="re-derive the plan from its per-layer gate evidence with this off threshold")
    ap.add_argument("--prune-frac-threshold", type=float, default=0.02)
    return ap.parse_known_args(argv)


def resolve_plan(ckpt_path: Path, spec: str, off_threshold: float | None, frac_threshold: float) -> tuple[dict, str]:
    path = ckpt_path / "pruning_plan.json" if spec == "auto" else Path(spec)
    if not path.is_file():
        hint = " (the checkpoint has none: train with gate statistics, or pass --prune PLAN.json)"
        raise ValueError(f"pruning plan {path} does not exist" + (hint if spec == "auto" else ""))
    plan = load_plan(path)
    if off_threshold is not None:
        plan = plan_with_thresholds(plan, off_threshold, frac_threshold)
    return plan, str(path)


def main(argv: list[str] | None = None) -> int:
    a, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    tasks = expand_tasks(a.tasks)
    opts = load_dataclass(EvalOptions, a.options, overrides)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible; use --device cpu or auto")
    kernels = "reference" if a.kernels == "reference" else None
    ckpt = load_checkpoint(a.checkpoint, device, kernels)
    out = Path(a.out) if a.out else ckpt.path / "eval"
    sp = checkpoint_tokenizer(ckpt, a.tokenizer)
    log.info("evaluating %s (%s, %.2fM parameters) on %s: %s", ckpt.path, ckpt.cfg.model.preset,
             sum(p.numel() for p in ckpt.model.parameters()) / 1e6, device, ",".join(tasks))

    models = {"original": (ckpt, out)}
    results: dict = {"checkpoint": str(ckpt.path), "tasks": tasks, "options": dataclasses.asdict(opts), "models": {}}
    if a.prune != "none":
        plan, plan_path = resolve_plan(ckpt.path, a.prune, a.prune_off_threshold, a.prune_frac_threshold)
        pruned_dir = apply_pruning(ckpt.path, plan, out / "pruned_checkpoint")
        pruned = load_checkpoint(pruned_dir, device, kernels)
        meta = pruned.meta
        results["pruning"] = {"plan_path": plan_path, "removed": meta["removed"], "checkpoint": str(pruned_dir),
                              "params_before": meta["params_before"], "params_after": meta["params_after"],
                              "bytes_before": meta["model_bytes_before"], "bytes_after": meta["model_bytes_after"]}
        models["pruned"] = (pruned, out / "pruned")
        log.info("pruned %s -> %s: removed %s", ckpt.path, pruned_dir, meta["removed"] or "nothing")
    for name, (c, model_out) in models.items():
        results["models"][name] = evaluate(c.model, sp, tasks, opts, model_out, shards_dir=ckpt.cfg.data.shards_dir,
                                           title=f"{ckpt.cfg.model.preset} ({name})", loss=ckpt.cfg.loss)
    report = write_report(results, out, header=str(ckpt.path))
    print(report.read_text())
    print(f"wrote {out / 'results.json'} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
