"""Run an ablation: train each variant with the same seed, data and tokens, evaluate, tabulate.

    python launch/ablate.py configs/ablations/gate_cpu.yaml
    python launch/ablate.py configs/ablations/evidence_cpu.yaml          # the hybrid-vs-baselines evidence
    python launch/ablate.py configs/ablations/window.yaml --only w512,w1024

Writes <out_dir>/results.md (the table), results.json, results.png, and keeps each run under
<out_dir>/runs/ (finished runs are reused, interrupted ones resumed). The file format is in
fusiontree/ablation.py.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from fusiontree.ablation import run_ablation
from fusiontree.cli import run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ablation", help="ablation YAML (configs/ablations/*.yaml)")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # SIGTERM (kill, Slurm) unwinds like Ctrl-C, so the training runs in flight are stopped too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    res = run_ablation(a.ablation, [x for x in a.only.split(",") if x] or None)
    print(res["table"])
    print(f"wrote {res['out_dir'] / 'results.md'}, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
