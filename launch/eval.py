"""Evaluate a checkpoint: perplexity, needle-in-a-haystack, code completion, system metrics.

    python launch/eval.py --checkpoint runs/x --tasks ppl,needle,code,system
    python launch/eval.py --checkpoint runs/x/checkpoints/step_00000100 --tasks ppl,needle,system --prune auto

--checkpoint: a checkpoint directory, or a run directory (its latest valid checkpoint).
Tasks: ppl, needle (= passkey), nextline, humaneval, code (= nextline + humaneval), system.
--prune auto|PLAN.json: also write a pruned checkpoint (the checkpoint's GateMonitor plan,
or the given one) and evaluate it beside the original: the report shows both.
Writes results.json, report.md and needle_heatmap.png (per model) to --out (default:
<checkpoint>/eval).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusiontree.eval.eval_llm import EvalOptions, evaluate, expand_tasks, options_dict, write_report  # noqa: E402
from fusiontree.eval.eval_system import DECODE_MODES  # noqa: E402
from fusiontree.eval.loading import checkpoint_tokenizer, load_checkpoint  # noqa: E402
from fusiontree.eval.pruning import apply_pruning, load_plan, plan_with_thresholds  # noqa: E402

log = logging.getLogger("fusiontree.eval")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 256,512")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = EvalOptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    ap.add_argument("--tasks", default="ppl,needle,code,system", help="comma-separated (default %(default)s)")
    ap.add_argument("--out", default="", help="output directory (default <checkpoint>/eval)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--kernels", default="config", choices=["config", "reference"],
                    help="config: the checkpoint's kernels (auto per device); reference: the PyTorch reference ops")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tokenizer", default="", help="a .model or tokenizer.json (default: the checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per forward (ppl, needle, next-line)")
    ap.add_argument("--seed", type=int, default=d.seed, help="sampling seed (needle keys, next-line picks, HumanEval)")
    ap.add_argument("--prune", default="none", help="none | auto (the checkpoint's pruning_plan.json) | PLAN.json")
    ap.add_argument("--prune-off-threshold", type=float, default=None,
                    help="re-derive the plan from its per-layer gate evidence with this off threshold")
    ap.add_argument("--prune-frac-threshold", type=float, default=0.02)
    g = ap.add_argument_group("ppl")
    g.add_argument("--shards", default="", help="shards directory (default: the checkpoint's data.shards_dir)")
    g.add_argument("--ppl-batches", type=int, default=d.ppl_max_batches, help="val batches per bucket")
    g.add_argument("--ppl-files", nargs="*", default=[],
                   help="held-out text files (default: the shards' val .py files)")
    g.add_argument("--ppl-files-max-tokens", type=int, default=d.ppl_files_max_tokens)
    g.add_argument("--ppl-files-seq-len", type=int, default=d.ppl_files_seq_len,
                   help="row length for the held-out files (0: the longest val bucket)")
    g = ap.add_argument_group("needle")
    g.add_argument("--needle-contexts", type=_ints, default=d.needle_contexts)
    g.add_argument("--needle-depths", type=_floats, default=d.needle_depths)
    g.add_argument("--needle-trials", type=int, default=d.needle_trials)
    g.add_argument("--needle-digits", type=int, default=d.needle_digits)
    g.add_argument("--needle-window", type=int, default=d.needle_window,
                   help="also report accuracy over keys farther than this many tokens (0: the model's window)")
    g = ap.add_argument_group("code")
    g.add_argument("--nextline-files", nargs="*", default=[], help="held-out .py files, dirs, globs or stdlib:REL "
                   "(default: the shards' val .py files)")
    g.add_argument("--nextline-samples", type=int, default=d.nextline_samples)
    g.add_argument("--nextline-context-tokens", type=int, default=d.nextline_context_tokens)
    g.add_argument("--nextline-max-new-tokens", type=int, default=d.nextline_max_new_tokens)
    g.add_argument("--humaneval-limit", type=int, default=d.humaneval_limit, help="first N problems (0: all 164)")
    g.add_argument("--humaneval-samples", type=int, default=d.humaneval_samples, help="completions per problem")
    g.add_argument("--humaneval-temperature", type=float, default=d.humaneval_temperature)
    g.add_argument("--humaneval-k", type=_ints, default=d.humaneval_k, help="k values of pass@k")
    g.add_argument("--humaneval-max-new-tokens", type=int, default=d.humaneval_max_new_tokens)
    g.add_argument("--sandbox-timeout-s", type=float, default=d.sandbox_timeout_s)
    g.add_argument("--sandbox-memory-mb", type=int, default=d.sandbox_memory_mb)
    g.add_argument("--sandbox-workers", type=int, default=d.sandbox_workers, help="programs run at once")
    g = ap.add_argument_group("system")
    g.add_argument("--system-contexts", type=_ints, default=d.system_contexts)
    g.add_argument("--system-batch", type=int, default=d.system_batch)
    g.add_argument("--system-decode-steps", type=int, default=d.system_decode_steps)
    g.add_argument("--system-decode-mode", default=d.system_decode_mode,
                   choices=DECODE_MODES,
                   help="how decode steps run: the cached forward, the static step, or that step replayed "
                        "from a CUDA graph (compiled first, or not)")
    g.add_argument("--no-train-throughput", action="store_true", help="skip the training-throughput measurement")
    g.add_argument("--train-seq-len", type=int, default=d.train_seq_len)
    g.add_argument("--train-micro-batch", type=int, default=d.train_micro_batch)
    g.add_argument("--train-steps", type=int, default=d.train_steps, help="timed training steps")
    return ap.parse_args(argv)


def options_from_args(a: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        shards_dir=a.shards, ppl_max_batches=a.ppl_batches, ppl_files=a.ppl_files,
        ppl_files_max_tokens=a.ppl_files_max_tokens, ppl_files_seq_len=a.ppl_files_seq_len,
        needle_window=a.needle_window, sandbox_workers=a.sandbox_workers, train_steps=a.train_steps,
        needle_contexts=a.needle_contexts, needle_depths=a.needle_depths, needle_trials=a.needle_trials,
        needle_digits=a.needle_digits, nextline_files=a.nextline_files, nextline_samples=a.nextline_samples,
        nextline_context_tokens=a.nextline_context_tokens, nextline_max_new_tokens=a.nextline_max_new_tokens,
        humaneval_limit=a.humaneval_limit,
        humaneval_samples=a.humaneval_samples, humaneval_temperature=a.humaneval_temperature,
        humaneval_k=a.humaneval_k, humaneval_max_new_tokens=a.humaneval_max_new_tokens,
        sandbox_timeout_s=a.sandbox_timeout_s, sandbox_memory_mb=a.sandbox_memory_mb,
        system_contexts=a.system_contexts, system_batch=a.system_batch, system_decode_steps=a.system_decode_steps,
        system_decode_mode=a.system_decode_mode,
        system_train=not a.no_train_throughput, train_seq_len=a.train_seq_len, train_micro_batch=a.train_micro_batch,
        batch_size=a.batch_size, seed=a.seed)


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
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    tasks = expand_tasks(a.tasks)
    opts = options_from_args(a)
    opts.validate()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible; use --device cpu or auto")
    kernels = "reference" if a.kernels == "reference" else None
    ckpt = load_checkpoint(a.checkpoint, device, kernels)
    out = Path(a.out) if a.out else ckpt.path / "eval"
    sp = checkpoint_tokenizer(ckpt, a.tokenizer)
    shards = ckpt.cfg.data.shards_dir
    log.info("evaluating %s (%s, %.2fM parameters) on %s: %s", ckpt.path, ckpt.cfg.model.preset,
             sum(p.numel() for p in ckpt.model.parameters()) / 1e6, device, ",".join(tasks))

    models = {"original": (ckpt, out)}
    results: dict = {"checkpoint": str(ckpt.path), "tasks": tasks, "options": options_dict(opts), "models": {}}
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
        results["models"][name] = evaluate(c.model, sp, tasks, opts, model_out, shards_dir=shards,
                                           title=f"{ckpt.cfg.model.preset} ({name})")
    report = write_report(results, out, header=str(ckpt.path))
    print(report.read_text())
    print(f"wrote {out / 'results.json'} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
