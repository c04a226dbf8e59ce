"""Reading and writing FusionTree checkpoints for the export and the import.

Everything fusiontree/hf/ needs from the checkpoint format lives here: which directory holds
the weights, how they are read (the consolidated `model.pt`, or the tensor-parallel ranks'
engine files consolidated with `fusiontree.parallel.reshard`), the resolved run config and the
tokenizer the run trained with; and a weights-only checkpoint written back (model.pt,
config.yaml, meta.json), which `launch/train.py --init_from` and evaluation read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fusiontree.config import RunConfig, dump_config, load_config

ENGINE_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


@dataclass
class CheckpointWeights:
    path: Path  # the checkpoint directory
    cfg: RunConfig
    meta: dict
    state: dict[str, torch.Tensor]  # plain (TP=1) state dict
    source: str  # "model.pt" or "engine (TP=k consolidated)"


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, run or checkpoints directory (its latest valid
    checkpoint), with model.pt or only its engine files."""
    from fusiontree.checkpoint import resolve_checkpoint

    return resolve_checkpoint(path, engine_only_ok=True)


def _engine_state(ckpt: Path, cfg: RunConfig) -> tuple[dict, str]:
    """The plain state dict from DeepSpeed's per-rank module files (tensor-parallel ranks in
    order), for a checkpoint without model.pt."""
    from fusiontree.parallel.reshard import consolidate_state_dicts
    from fusiontree.checkpoint import ENGINE_TAG, safe_load

    engine = ckpt / ENGINE_TAG
    files = {int(m.group(1)): f for f in engine.iterdir() if (m := ENGINE_MODEL_FILE.match(f.name))}
    tp = cfg.parallel.tensor_parallel
    if not files:
        zero3 = sorted(engine.glob("zero_pp_rank_*_model_states.pt"))
        hint = (" (ZeRO-3 partitions the weights over data-parallel ranks; train.py writes the gathered model.pt "
                "with every checkpoint, restore it)") if zero3 else ""
        raise ValueError(f"{ckpt} has no model.pt and no engine/mp_rank_*_model_states.pt files{hint}")
    if sorted(files) != list(range(tp)):
        raise ValueError(f"{engine} holds module files of tensor-parallel ranks {sorted(files)}, but the run's "
                         f"parallel.tensor_parallel={tp}; the checkpoint is incomplete")
    shards = [safe_load(files[r])["module"] for r in range(tp)]
    return consolidate_state_dicts(shards, cfg.model), f"engine (TP={tp} consolidated)"


def read_checkpoint(path: str | Path) -> CheckpointWeights:
    ckpt = checkpoint_dir(path)
    cfg = load_config(ckpt / "config.yaml")
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
    if (ckpt / "model.pt").is_file():
        # model.pt is a plain state dict: memory-mapped, so large models are not read twice.
        state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True, mmap=True)
        source = "model.pt"
    else:
        state, source = _engine_state(ckpt, cfg)
    return CheckpointWeights(ckpt, cfg, meta, state, source)


def checkpoint_tokenizer_path(weights: CheckpointWeights, override: str | Path = "") -> Path:
    """The SentencePiece model the checkpoint keeps, else the one its run trained with
    (meta.json), else its config's or its shards'. The export converts SentencePiece models; a
    run trained with a Hugging Face tokenizer.json is refused with the reason."""
    from fusiontree.checkpoint import stored_tokenizer_path

    data = weights.cfg.data
    candidates = [Path(override)] if override else [
        Path(p) for p in (stored_tokenizer_path(weights.path, weights.meta), weights.meta.get("tokenizer"),
                          data.tokenizer,
                          str(Path(data.shards_dir) / "tokenizer.model"), str(Path(data.shards_dir) / "tokenizer.json"))
        if p]
    for p in candidates:
        if p.is_file():
            if p.suffix == ".json":
                raise ValueError(f"{weights.path} was trained with the Hugging Face tokenizer {p}; the export "
                                 "converts SentencePiece models only: pass --tokenizer PATH.model of the same "
                                 "vocabulary, or copy that tokenizer.json into the export directory yourself")
            return p
    raise ValueError(f"the tokenizer of {weights.path} is not found (looked at {[str(p) for p in candidates]}); "
                     "pass --tokenizer PATH.model")


def check_tokenizer(path: Path, vocab_size: int) -> bytes:
    from fusiontree.data.tokenizer import load_sentencepiece

    sp = load_sentencepiece(path)  # checks FusionTree's special ids and byte fallback
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.vocab_size()} ids but the model's vocab_size is {vocab_size}; "
                         "pass the tokenizer the model was trained with (--tokenizer)")
    return path.read_bytes()


def check_state_matches(state: dict[str, torch.Tensor], cfg, where: str) -> list[str]:
    """The names of a FusionTree model of `cfg` (built on the meta device), in its order, after
    checking that `state` holds exactly those tensors with their shapes."""
    from fusiontree.models import HybridLanguageModel

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in HybridLanguageModel(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("_extra_state")}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [f"{k}: {got[k]} vs {want[k]}" for k in want if k in got and got[k] != want[k]]
        raise ValueError(f"the weights of {where} do not match its model config: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}, other shapes {shapes[:3]}; was the config edited after saving?")
    return list(want)


def write_weights_checkpoint(out: Path, cfg: RunConfig, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """model.pt + config.yaml + meta.json (every file's size and sha256, as a training checkpoint's):
    what evaluation, generation and `launch/train.py --init_from` read. No optimizer state."""
    from fusiontree.checkpoint import write_model_checkpoint

    return write_model_checkpoint(out, state, dump_config(cfg), meta)
