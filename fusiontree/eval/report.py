"""Reports: the headline row of an evaluation, markdown tables, and results.json + report.md
(launch/eval.py; the ablation runner's table uses the same rows)."""

from __future__ import annotations

import json
from pathlib import Path

from fusiontree.eval.system import system_markdown


def summary_row(results: dict, passkey_per_context: bool = False) -> dict:
    """The headline numbers of one evaluation (`fusiontree.eval.tasks.evaluate`'s results, task -> result).

    passkey_per_context: one passkey column per context length (plus its beyond-one-window
    column where measured) instead of the mean needle accuracy."""
    row = {}
    if "ppl" in results:
        row["val ppl"] = results["ppl"]["ppl"]
        if "files" in results["ppl"]:
            row["held-out files ppl"] = results["ppl"]["files"]["ppl"]
    if "needle" in results:
        n = results["needle"]
        if passkey_per_context:
            for L, accs in zip(n["contexts"], n["accuracy"]):
                row[f"passkey@{L}"] = sum(accs) / len(accs)
                b = n.get("beyond_window", {}).get(str(L))
                if b is not None:
                    row[f"passkey@{L} >W"] = b["accuracy"] if b["accuracy"] is not None else "-"
        else:
            row["needle acc"] = n["mean_accuracy"]
    if "nextline" in results:
        row["next-line EM"] = results["nextline"]["exact_match"]
    if "humaneval" in results:
        for k, v in results["humaneval"].items():
            if k.startswith("pass@"):
                row[f"HumanEval {k}"] = v
    if "system" in results:
        s = results["system"]
        row["params (M)"] = s["params"] / 1e6
        if s.get("decode"):
            row["decode tok/s"] = s["decode"][-1]["tokens_per_s"]
        if s.get("prefill"):
            row["prefill tok/s"] = s["prefill"][-1]["tokens_per_s"]
        if s.get("train"):
            row["train tok/s (1 proc)"] = s["train"]["tokens_per_s"]
    return row


def fmt_cell(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """One column per key seen in any row (first-seen order); missing cells stay empty."""
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


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
