"""Merge shard builds of separate input parts into one build (see fusiontree/data/merge.py).

    python data_pipeline/merge_shards.py --input data/parts/part-* --output data/shards

Build the parts with data_pipeline/build_shards.py and one shared tokenizer (the first
part trains it, the others pass --tokenizer <first part>/tokenizer.model; or all pass the
same .model / tokenizer.json), the same --seq-lengths, --seed and --val-fraction, and for
mixtures the same source names and weights (each part a --mixture YAML over its share of
every source); slurm/build_shards.sh does all of it as Slurm jobs.
Point training at the merged directory (data.shards_dir).
"""

from __future__ import annotations

import argparse
import sys

from fusiontree.cli import run_main
from fusiontree.data.merge import merge_builds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="build directories (each with a manifest.json), in order")
    ap.add_argument("--output", required=True, help="directory of the merged build (new, or a previous build)")
    ap.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: the first input's)")
    a = ap.parse_args(argv)
    manifest = merge_builds(a.input, a.output, a.shard_size)
    print(f"merged {len(a.input)} builds into {a.output}/manifest.json")
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['samples']} samples, {s['tokens']} tokens")
        for L, b in s["buckets"].items():
            print(f"  seq {int(L):>6}: {b['samples']:>8} samples {len(b['shards']):>5} shards")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
