"""Write the data of the local lm-eval task pack (configs/lm_eval/) from held-out files.

    python launch/lm_eval_tasks.py --shards data/shards --out data/lm_eval
    python launch/lm_eval_tasks.py --files 'src/**/*.py' stdlib:json --out data/lm_eval

Default input: the .py files that the shard build put in its val split (never trained on).
Then: python launch/lm_harness.py --model fusiontree --model_args checkpoint=runs/x
      --include_path configs/lm_eval --tasks fusiontree_local
(the tasks read data/lm_eval, or --metadata '{"data_dir": "DIR"}', or $FUSIONTREE_LM_EVAL_DATA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusiontree.cli import run_main
from fusiontree.eval.perplexity import expand_files, heldout_files
from fusiontree.hf.task_data import build_task_data

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="data/shards", help="shard build whose val .py files are the input")
    ap.add_argument("--files", nargs="*", default=[], help="held-out files, dirs, globs or stdlib:REL instead")
    ap.add_argument("--out", default=str(ROOT / "data" / "lm_eval"))
    ap.add_argument("--samples", type=int, default=200, help="next-line and multiple-choice questions")
    ap.add_argument("--texts", type=int, default=20, help="files for the perplexity task")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    files = expand_files(a.files) if a.files else heldout_files(a.shards)
    if not files:
        raise ValueError(f"no held-out .py files in the val split of {a.shards}; pass --files")
    counts = build_task_data(files, a.out, samples=a.samples, texts=a.texts, seed=a.seed)
    print(json.dumps(counts))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
