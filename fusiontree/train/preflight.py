"""The checks of a training run that need no process group and no model: the DeepSpeed JSON,
the tokenizer against the model and the generation prompt, the checkpoint a resume would
read and its config.

`launch/train.py` runs `preflight` right after loading the config and before it imports the
trainer (which brings in DeepSpeed and megatron-core and their start-up warnings), so a
mistake in the command line is one line on the terminal, seconds after it was typed. The
trainer runs the same checks itself (they hold for every caller), and the collective ones
on top: the content hashes of the checkpoint it resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusiontree.checkpoint import CONFIG_FILE, CheckpointManager
from fusiontree.config import RunConfig, check_resume_config, read_yaml
from fusiontree.train.distributed import uses_cuda
from fusiontree.train.mechanics import compiled_tensor_parallel_error


def check_ds_config(path: str | Path) -> dict:
    """The DeepSpeed JSON, read; a missing or malformed file is a ValueError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--ds_config {path} does not exist; see configs/ds/zero{{0,1,2,3}}.json")
    try:
        ds = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"--ds_config {path}: not valid JSON ({e}); fix the file there") from None
    if not isinstance(ds, dict):
        raise ValueError(f"--ds_config {path}: expected a JSON object, e.g. configs/ds/zero2.json")
    return ds


def check_tokenizer(cfg: RunConfig):
    """The run's tokenizer (the shards' own, or data.tokenizer), checked against the model's
    vocabulary and the length of the generation prompt."""
    from fusiontree.data import load_tokenizer

    tokenizer = load_tokenizer(cfg.data)
    if tokenizer.vocab_size() != cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size()} ids but model.vocab_size="
                         f"{cfg.model.vocab_size}; set --model.vocab_size={tokenizer.vocab_size()}")
    cfg.generate.check_prompt_fits(len(tokenizer.encode(cfg.generate.prompt)), cfg.model.max_seq_len)
    return tokenizer


def refuse_existing_run(run_dir: Path) -> None:
    """A run started without --resume must not mix its checkpoints into an earlier run's."""
    if CheckpointManager(run_dir / "checkpoints", 0, 1).latest_valid() is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, "
                         "or choose a new out_dir")


def resume_candidate(cfg: RunConfig, resume: str) -> Path | None:
    """The checkpoint a resume would start from, by completeness alone (sizes; the trainer
    also checks the content hashes, and may then step back to an earlier one)."""
    run_dir = Path(cfg.out_dir)
    if resume == "none":
        refuse_existing_run(run_dir)
        return None
    if resume == "auto":
        return CheckpointManager(run_dir / "checkpoints", 0, 1).latest_valid()
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory; pass a checkpoints/step_* directory "
                         "of a run, or --resume auto")
    return path if CheckpointManager.is_valid(path) else None  # the trainer says what is missing


def preflight(cfg: RunConfig, ds_config: str, resume: str = "none", allow_config_change: tuple[str, ...] = (),
              init_from: str = "") -> None:
    """Every check that needs no process group; raises a ValueError that says how to fix it."""
    if cfg.train.compile and (error := compiled_tensor_parallel_error(
            cfg.parallel.tensor_parallel, "cuda" if uses_cuda(cfg.train.device) else "cpu", os.environ)):
        raise ValueError(error)
    check_ds_config(ds_config)
    check_tokenizer(cfg)
    candidate = resume_candidate(cfg, resume)
    if candidate is not None:
        check_resume_config(read_yaml(candidate / CONFIG_FILE), cfg, allow_config_change, str(candidate))
    if init_from and not Path(init_from).exists():
        raise ValueError(f"--init_from {init_from} does not exist; pass a checkpoint or run directory")
