"""Result rows and markdown tables shared by launch/eval.py and launch/ablate.py (no torch)."""

from __future__ import annotations


def summary_row(results: dict, passkey_per_context: bool = False) -> dict:
    """The headline numbers of one evaluation (`evaluate_model`'s results, task -> result).

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
