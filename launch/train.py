"""Train FusionTree: DeepSpeed ZeRO, length curriculum, gate monitoring, checkpoints, resume.

    deepspeed launch/train.py --ds_config configs/ds/zero2.json --config configs/pretrain_v1.yaml
    torchrun --nproc_per_node 2 launch/train.py --ds_config configs/ds/zero2.json --config ...
    python launch/train.py --config ...            (one process)

Options: --resume {none,auto,PATH}; any config field as a dotted override (--train.steps=100);
--allow_config_change KEYS for a resume under a changed config. A mistake in the command line or
the config is one line on stderr and exit status 2 (fusiontree/cli.py).
This file only reads the command line; the trainer is fusiontree/train/trainer.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusiontree.cli import run_main

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "configs/ds/zero2.json"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="run config YAML (default: the embedded defaults)")
    ap.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=str(DEFAULT_DS_CONFIG),
                    help="DeepSpeed JSON (ZeRO stage and buckets; batch sizes come from the run config)")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("--resume", default="none", help="none | auto (latest valid checkpoint) | a checkpoint dir")
    ap.add_argument("--init_from", "--init-from", dest="init_from", default="",
                    help="start from the weights (model.pt) of this checkpoint or run directory, with a fresh "
                         "optimizer, schedule and data order (e.g. an import of a Hugging Face export); a "
                         "--resume checkpoint, when there is one, takes precedence")
    ap.add_argument("--allow_config_change", "--allow-config-change", dest="allow_config_change", default="",
                    help="comma-separated config keys a resumed run may change beyond the free ones, e.g. "
                         "train.steps,train.lr_* (globs) or train (a section); model keys never change")
    ap.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted from launchers
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from fusiontree.config import load_config

    args, overrides = parse_args(argv)
    allow = tuple(k for k in args.allow_config_change.split(",") if k)
    cfg = load_config(args.config, overrides)
    from fusiontree.train.preflight import preflight

    # A mistake fails here, before the trainer's imports (DeepSpeed, megatron-core) start talking.
    preflight(cfg, args.ds_config, args.resume, allow, args.init_from)
    from fusiontree.train.trainer import run_training

    return run_training(cfg, args.ds_config, args.resume, args.local_rank, init_from=args.init_from,
                        allow_config_change=allow)


if __name__ == "__main__":
    sys.exit(run_main(main))
