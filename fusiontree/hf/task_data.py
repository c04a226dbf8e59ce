"""The local lm-eval task pack's data (configs/lm_eval/*.yaml), made from held-out files.

    nextline.jsonl      {"context": text up to a line, "target": that line}          generate_until
    code_choice.jsonl   {"context": ..., "choices": [4 lines], "label": index}        multiple_choice
    heldout_text.jsonl  {"text": the start of a file}                               loglikelihood_rolling

Held-out files are, by default, the `.py` files a shard build put in its val split (never
trained on; `fusiontree.eval.perplexity.heldout_files`). Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MAX_LINE_CHARS = 120  # longer lines (data tables, long strings) make poor completion targets


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _context(lines: list[str], i: int, max_chars: int) -> str:
    """The text before line i (ending with a newline), its last whole lines within max_chars."""
    out, size = [], 0
    for line in reversed(lines[:i]):
        if out and size + len(line) + 1 > max_chars:
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(reversed(out)) + "\n"


def build_task_data(files: list[Path], out_dir: str | Path, samples: int = 200, texts: int = 20,
                    context_chars: int = 1500, text_chars: int = 4000, seed: int = 0) -> dict:
    """Write the three jsonl files to `out_dir`; returns their row counts."""
    docs = [(f, f.read_text(errors="replace").split("\n")) for f in files]
    pool = [(lines, i) for _, lines in docs for i in range(1, len(lines))
            if lines[i].strip() and len(lines[i]) <= MAX_LINE_CHARS]
    if len(pool) < 4:
        raise ValueError(f"the held-out files {[str(f) for f in files[:3]]} hold {len(pool)} usable lines; "
                         "give more or longer files (--files)")
    rng = random.Random(seed)
    picks = rng.sample(pool, min(samples, len(pool)))
    distinct = sorted({lines[i].rstrip() for lines, i in pool})
    nextline, choice = [], []
    for lines, i in picks:
        context, target = _context(lines, i, context_chars), lines[i].rstrip()
        nextline.append({"context": context, "target": target})
        others = rng.sample([t for t in distinct if t != target], min(3, len(distinct) - 1))
        choices = others + [target]
        rng.shuffle(choices)
        choice.append({"context": context, "choices": choices, "label": choices.index(target)})
    text_rows = []
    for f, lines in docs[:texts]:
        kept, size = [], 0
        for line in lines:  # the file's first whole lines within text_chars
            if kept and size + len(line) + 1 > text_chars:
                break
            kept.append(line)
            size += len(line) + 1
        body = "\n".join(kept).rstrip("\n")
        if body.strip():
            text_rows.append({"text": body, "file": f.name})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "nextline.jsonl", nextline)
    _write(out / "code_choice.jsonl", choice)
    _write(out / "heldout_text.jsonl", text_rows)
    counts = {"nextline": len(nextline), "code_choice": len(choice), "heldout_text": len(text_rows),
              "files": len(files)}
    (out / "sources.json").write_text(json.dumps({**counts, "seed": seed, "sources": [str(f) for f in files]},
                                                 indent=2))
    return counts
