"""What a training process pays before its first line of work: the imports of the entry points.

    python benchmarks/startup_imports.py [--repeats 5] [--out benchmarks/results/startup_imports.json]

Each module is imported in a fresh interpreter `--repeats` times (the first run also warms the
file cache and is dropped); the table shows the median CPU seconds (user + system, the
number that adds up over the ranks of a node) and wall seconds of the import, and whether
megatron-core came with it. `megatron.core` itself is listed for reference: the trainer loads
it only for tensor parallelism. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from _results import git_commit, write_results

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["torch", "deepspeed", "megatron.core", "fusiontree.train.trainer", "launch.train", "launch.eval",
           "launch.generate"]

PROBE = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import importlib
importlib.import_module(sys.argv[1])
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "megatron": any(m.startswith("megatron") for m in sys.modules)}))
"""


def measure(module: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats + 1):
        res = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    runs = runs[1:]  # the first import also reads the files from disk
    return {"module": module, "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs), "imports_megatron": runs[0]["megatron"],
            "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/startup_imports.json"))
    a = ap.parse_args()
    rows = [measure(m, a.repeats) for m in a.modules.split(",")]
    print(f"{'module':<28} {'CPU s':>7} {'wall s':>7}  megatron")
    for r in rows:
        print(f"{r['module']:<28} {r['cpu_s']:>7.2f} {r['wall_s']:>7.2f}  {'yes' if r['imports_megatron'] else 'no'}")
    meta = {"commit": git_commit(), "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    print("wrote", write_results(a.out, meta, rows=rows))


if __name__ == "__main__":
    main()
