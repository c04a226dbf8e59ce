"""Export a FusionTree checkpoint as a Hugging Face model directory, or import one back.

    python launch/export_hf.py --checkpoint runs/x --out exports/x          # checkpoint or run directory
    python launch/export_hf.py --from-hf exports/x --out runs/y/init        # back to a FusionTree checkpoint

The export loads with transformers alone (torch + transformers, trust_remote_code=True):

    AutoModelForCausalLM.from_pretrained("exports/x", trust_remote_code=True)
    AutoTokenizer.from_pretrained("exports/x", trust_remote_code=True)

Tensor-parallel checkpoints are consolidated first (the engine files of every rank when the
checkpoint has no model.pt). An imported checkpoint has no optimizer state: continue training
from it with `launch/train.py --init_from runs/y/init` (fresh optimizer and schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusiontree.cli import run_main
from fusiontree.hf.export import export_hf, import_hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="FusionTree checkpoint or run directory to export")
    src.add_argument("--from-hf", dest="from_hf", help="exported directory to import back into a FusionTree checkpoint")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tokenizer", default="", help="SentencePiece .model (default: the one the run trained with)")
    ap.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a = ap.parse_args(argv)
    if a.from_hf:
        out = import_hf(a.from_hf, a.out)
        print(f"wrote FusionTree checkpoint {out} (train from it with launch/train.py --init_from {out})")
        return 0
    summary = export_hf(a.checkpoint, a.out, tokenizer=a.tokenizer, max_shard_size=a.max_shard_size,
                        overwrite=a.overwrite)
    print(json.dumps(summary, indent=2))
    print(f"wrote {a.out}: AutoModelForCausalLM.from_pretrained({a.out!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
