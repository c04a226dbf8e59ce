"""Evaluation tasks of a model and their options: one typed tree (`EvalOptions`, one section per
task), loaded like the run config (strict YAML, `--section.key=value` overrides).

    python launch/eval.py --checkpoint runs/x --tasks ppl,needle,code --needle.contexts=[256,512]

| task | module | what it reports |
| --- | --- | --- |
| `ppl` | perplexity.py | loss and perplexity on the val shards per bucket, and on held-out files |
| `needle` (= `passkey`) | passkey.py | passkey retrieval over context lengths x depths, with a heatmap |
| `nextline`, `humaneval` (= `code`) | code.py | next-line exact match; HumanEval pass@k in a sandbox |
| `system` | system.py | peak memory, prefill / decode tokens/s, training throughput |

`evaluate` runs a list of tasks and returns {task: result}; report.py turns results into
markdown.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fusiontree.config import LossConfig
from fusiontree.eval.code import HumanEvalOptions, NextlineOptions, humaneval, next_line_exact_match
from fusiontree.eval.passkey import NeedleOptions, needle_in_haystack
from fusiontree.eval.perplexity import PerplexityOptions, expand_files, heldout_files, run_perplexity
from fusiontree.eval.system import SystemOptions, run_system

log = logging.getLogger("fusiontree.eval")

TASKS = ("ppl", "needle", "nextline", "humaneval", "system")
TASK_ALIASES = {"passkey": ["needle"], "code": ["nextline", "humaneval"]}


@dataclass
class EvalOptions:
    ppl: PerplexityOptions = field(default_factory=PerplexityOptions)
    needle: NeedleOptions = field(default_factory=NeedleOptions)
    nextline: NextlineOptions = field(default_factory=NextlineOptions)
    humaneval: HumanEvalOptions = field(default_factory=HumanEvalOptions)
    system: SystemOptions = field(default_factory=SystemOptions)
    batch_size: int = 16  # rows per forward (ppl, needle, next-line)
    seed: int = 0  # sampling seed (needle keys, next-line picks, HumanEval)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        for section in (self.ppl, self.needle, self.nextline, self.humaneval, self.system):
            section.validate()


def expand_tasks(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names if x.strip()):
        for t in TASK_ALIASES.get(n, [n]):
            if t not in TASKS:
                raise ValueError(f"unknown eval task {n!r}; choose from {list(TASKS) + list(TASK_ALIASES)}")
            if t not in out:
                out.append(t)
    if not out:
        raise ValueError("no eval task given; e.g. --tasks ppl,needle,code")
    return out


def evaluate(model, sp, tasks: list[str], opts: EvalOptions, out_dir: str | Path, shards_dir: str = "",
             title: str = "", loss: LossConfig | None = None) -> dict:
    """Run `tasks` on `model`; artifacts (heatmap) go to `out_dir`. Returns {task: result}.
    `shards_dir`: the shards to evaluate on when `opts.ppl.shards_dir` names none; `loss`: the
    run's loss config (its ignore index and cross-document rule define the perplexity)."""
    opts.validate()
    out_dir = Path(out_dir)
    shards = opts.ppl.shards_dir or shards_dir
    held: list[Path] | None = None

    def heldout() -> list[Path]:
        nonlocal held
        if held is None:
            if not shards:
                raise ValueError("no held-out files: give --ppl.files / --nextline.files, or shards to find them in")
            held = heldout_files(shards)
            if not held:
                raise ValueError(f"the val split of {shards} holds no .py files; give --ppl.files / --nextline.files")
        return held

    results: dict = {}
    for task in tasks:
        t0 = time.perf_counter()
        if task == "ppl":
            res = run_perplexity(model, sp, opts.ppl, shards, opts.batch_size, heldout, loss)
        elif task == "needle":
            n = opts.needle
            res = needle_in_haystack(model, sp, n.contexts, n.depths, n.trials, n.digits, out_dir / "needle_heatmap.png",
                                     opts.batch_size, opts.seed, title, n.window)
        elif task == "nextline":
            n = opts.nextline
            files = expand_files(n.files) if n.files else heldout()
            res = next_line_exact_match(model, sp, files, n.samples, n.context_tokens, n.max_new_tokens,
                                        opts.batch_size, opts.seed)
        elif task == "humaneval":
            res = humaneval(model, sp, opts.humaneval, opts.seed)
        elif task == "system":
            res = run_system(model, opts.system)
        else:
            raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
        res["seconds"] = time.perf_counter() - t0
        results[task] = res
        log.info("eval %s done in %.1f s", task, res["seconds"])
    return results
