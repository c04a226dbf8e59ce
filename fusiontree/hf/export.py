"""FusionTree checkpoint -> Hugging Face model directory, and back.

    export_hf("runs/x", "exports/x")            # the run's latest valid checkpoint
    import_hf("exports/x", "runs/y/init")       # a weights-only FusionTree checkpoint

The export directory:

    config.json                      FusionTreeConfig, with auto_map for AutoConfig / AutoModelForCausalLM
    configuration_fusiontree.py      \\ the model code (torch + transformers only), loaded with
    modeling_fusiontree.py           / trust_remote_code=True
    model.safetensors                the weights (model-0000k-of-0000n.safetensors + index when large)
    generation_config.json           bos / eos / pad ids
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
    fusiontree_config.yaml           the resolved run config of the source checkpoint
    fusiontree_export.json           provenance: source checkpoint, step, tokens, weight source

Weights keep their dtype and values exactly (fusiontree/hf/convert.py maps the names).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor

from fusiontree.checkpoint import tokenizer_files
from fusiontree.config import dump_config
from fusiontree.data.tokenizer import load_sentencepiece
from fusiontree.hf.checkpoints import (check_state_matches, check_tokenizer, checkpoint_tokenizer_path, read_checkpoint,
                                       write_weights_checkpoint)
from fusiontree.hf.convert import from_hf_state_dict, hf_config_dict, model_config_from_hf, to_hf_state_dict

HERE = Path(__file__).resolve().parent
MODEL_FILES = ("configuration_fusiontree.py", "modeling_fusiontree.py")
AUTO_MAP = {"AutoConfig": "configuration_fusiontree.FusionTreeConfig",
            "AutoModelForCausalLM": "modeling_fusiontree.FusionTreeForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '4GiB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    if not num or unit not in units:
        raise ValueError(f"shard size {text!r} must look like 2GB, 500MB, 4GiB or a number of bytes")
    return int(float(num) * units[unit])


def _dtype_name(state: dict[str, Tensor]) -> str:
    """The dtype most of the weights have (A_log, D, dt_bias stay fp32 in a bf16 model)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.")


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save_file(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file (an 8-byte little-endian header length, a JSON header of dtypes,
    shapes and byte ranges, then the tensors' bytes back to back) straight from the tensors'
    memory: no copy of the weights is made, so a memory-mapped checkpoint is streamed to disk."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"weight {name} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensor bytes start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def save_safetensors(state: dict[str, Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """One model.safetensors, or shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own) with transformers' index file. Returns the file names."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [INDEX_FILE]


def load_safetensors(hf_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (hf_dir / "model.safetensors").is_file():
        return load_file(str(hf_dir / "model.safetensors"))
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        state: dict[str, Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            state.update(load_file(str(hf_dir / fname)))
        return state
    raise ValueError(f"{hf_dir} holds no model.safetensors nor {INDEX_FILE}; is it an export directory?")


def export_hf(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path = "",
              max_shard_size: str | int = "2GB", overwrite: bool = False) -> dict:
    """Write the Hugging Face directory of a FusionTree checkpoint (or run directory). Returns a
    summary: files, parameter count, bytes, seconds per stage."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
    weights = read_checkpoint(checkpoint)
    model_cfg = weights.cfg.model
    expected = check_state_matches(weights.state, model_cfg, f"{weights.path} ({weights.source})")
    sp_path = checkpoint_tokenizer_path(weights, tokenizer)
    sp_model = check_tokenizer(sp_path, model_cfg.vocab_size)
    t_read = time.perf_counter()

    from fusiontree.hf.configuration_fusiontree import FusionTreeConfig
    from fusiontree.hf.tokenizer import save_hf_tokenizer
    from transformers import GenerationConfig

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict({k: weights.state[k] for k in expected})
    files = save_safetensors(state, out, parse_size(max_shard_size))
    t_weights = time.perf_counter()

    config = FusionTreeConfig(**hf_config_dict(model_cfg), architectures=["FusionTreeForCausalLM"],
                              auto_map=AUTO_MAP, dtype=_dtype_name(state))
    config.save_pretrained(out)
    for name in MODEL_FILES:
        shutil.copyfile(HERE / name, out / name)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    save_hf_tokenizer(sp_model, out, model_cfg.max_seq_len)
    (out / "fusiontree_config.yaml").write_text(dump_config(weights.cfg))
    n_params = sum(t.numel() for t in state.values())
    summary = {"source": str(weights.path), "weights_from": weights.source, "step": weights.meta.get("step"),
               "tokens_seen": weights.meta.get("tokens_seen"), "tokenizer": str(sp_path),
               "parameters": n_params, "weight_bytes": sum(t.numel() * t.element_size() for t in state.values()),
               "dtype": _dtype_name(state), "weight_files": files}
    (out / "fusiontree_export.json").write_text(json.dumps(summary, indent=2))
    t_end = time.perf_counter()
    summary["seconds"] = {"read": t_read - t0, "weights": t_weights - t_read, "rest": t_end - t_weights,
                          "total": t_end - t0}
    return summary


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """An exported directory back into a FusionTree checkpoint (model.pt, config.yaml with the
    export's run config and its model, meta.json, tokenizer.model). It holds no optimizer state:
    train from it with `launch/train.py --init_from OUT` (fresh optimizer), evaluate or generate
    from it like any checkpoint. Returns `out_dir`."""
    src, out = Path(hf_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; pass a directory written by launch/export_hf.py")
    model_cfg = model_config_from_hf(json.loads((src / "config.json").read_text()))
    from fusiontree.config import RunConfig, config_from_dict, config_to_dict

    run = config_from_dict(_yaml(src / "fusiontree_config.yaml")) \
        if (src / "fusiontree_config.yaml").is_file() else RunConfig()
    state = from_hf_state_dict(load_safetensors(src))
    expected = check_state_matches(state, model_cfg, f"{src} (config.json)")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, tok_meta = "", {}
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        tokenizer = str((out / "tokenizer.model").resolve())
        tok_meta = tokenizer_files(load_sentencepiece(out / "tokenizer.model"))[1]  # kept like a run's
    data = dataclasses.replace(run.data, tokenizer=tokenizer) if tokenizer else run.data
    run = dataclasses.replace(run, model=model_cfg, data=data)
    run = config_from_dict(config_to_dict(run))  # validated like any loaded config
    export_meta = json.loads((src / "fusiontree_export.json").read_text()) \
        if (src / "fusiontree_export.json").is_file() else {}
    meta = {"kind": "imported", "imported_from": str(src.resolve()), "tokenizer": tokenizer, **tok_meta,
            "preset": model_cfg.preset, "exported_from": export_meta.get("source"),
            "exported_step": export_meta.get("step"), "world_size": 1}
    return write_weights_checkpoint(out, run, {k: state[k] for k in expected}, meta)


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}
