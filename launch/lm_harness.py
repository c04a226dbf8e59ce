"""lm-evaluation-harness's command line with FusionTree's `fusiontree` model backend registered.

    python launch/lm_harness.py --model fusiontree --model_args checkpoint=runs/x --tasks fusiontree_local \
        --include_path configs/lm_eval --batch_size 8
    python launch/lm_harness.py --model hf --model_args pretrained=exports/x,trust_remote_code=True ...

Every argument is lm_eval's (`lm_eval --help`); this script only imports
fusiontree.hf.lm_eval_backend first, which registers the backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fusiontree.hf.lm_eval_backend  # noqa: F401  (registers --model fusiontree)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
