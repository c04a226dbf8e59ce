"""Perplexity: on the held-out (val) shards per length bucket, with the trainer's validation
loss (`fusiontree.train.validation`), and on held-out source files.

Legend: B batch, T tokens.

Held-out files: unless given, the `.py` files of the shards' build inputs that the build put
in the val split (recomputed from the manifest's inputs, seed and val fraction), so they
were never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusiontree.config import CurriculumStage, DataConfig, LossConfig
from fusiontree.train.losses import HybridModelLoss
from fusiontree.train.validation import perplexity, validation_sums


@dataclass
class PerplexityOptions:
    shards_dir: str = ""  # "": the checkpoint's data.shards_dir
    max_batches: int = 8  # per bucket, of batch_size rows
    files: list[str] = field(default_factory=list)  # []: the shards' held-out .py files
    files_seq_len: int = 0  # 0: the longest val bucket
    files_max_tokens: int = 100_000  # files are read in order until this many tokens

    def validate(self) -> None:
        if self.max_batches < 1:
            raise ValueError(f"ppl.max_batches={self.max_batches} must be >= 1")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def eval_data_config(shards_dir: str, max_seq_len: int, rows: int = 8) -> DataConfig:
    """A DataConfig whose val loaders cover every val bucket up to the model's max_seq_len,
    `rows` samples per batch of the longest bucket (more of shorter ones: the loader sizes
    batches in tokens), fewer when a bucket holds fewer samples."""
    from fusiontree.data.shards import read_manifest

    manifest = read_manifest(shards_dir)
    buckets = {int(k): b["samples"] for k, b in manifest["splits"]["val"]["buckets"].items() if b["samples"]}
    lengths = sorted(L for L in buckets if L <= max_seq_len)
    if not lengths:
        raise ValueError(f"the shards in {shards_dir} have no val samples of length <= max_seq_len={max_seq_len}; "
                         "build them with --val-fraction > 0")
    top = lengths[-1]
    # every bucket must hold one batch: a bucket of L tokens gets rows * top // L samples per batch
    rows = max(1, min([rows] + [buckets[L] * L // top for L in lengths]))
    return DataConfig(shards_dir=shards_dir, global_batch_tokens=top * rows, micro_batch_tokens=top * rows,
                      num_workers=0, verify_shards="size", curriculum=[CurriculumStage(seq_len=top, until_tokens=0)])


def perplexity_on_shards(model, shards_dir: str, max_batches: int = 8, rows: int = 8,
                         loss: LossConfig | None = None) -> dict:
    """{"buckets": {"seq512": {"loss", "ppl", "tokens"}}, "loss", "ppl", "tokens"} over the val
    split: up to `max_batches` batches of `rows` samples (of the longest bucket) per bucket.
    `loss`: the run's loss config (ignore index, cross-document targets), default LossConfig()."""
    from fusiontree.data import build_val_loaders

    cfg = eval_data_config(shards_dir, model.cfg.max_seq_len, rows)
    sums = validation_sums(model, build_val_loaders(cfg), HybridModelLoss(loss or LossConfig()), _device(model),
                           max_batches)
    buckets, tot_loss, tot_tok = {}, 0.0, 0
    for name, acc in sums.items():
        loss_sum, tokens = float(acc[0]), int(acc[1])
        if tokens:
            buckets[name] = {"loss": loss_sum / tokens, "ppl": perplexity(loss_sum / tokens), "tokens": tokens}
            tot_loss, tot_tok = tot_loss + loss_sum, tot_tok + tokens
    if not tot_tok:
        raise ValueError(f"no val tokens were evaluated in {shards_dir}")
    return {"shards_dir": str(shards_dir), "buckets": buckets, "loss": tot_loss / tot_tok,
            "ppl": perplexity(tot_loss / tot_tok), "tokens": tot_tok, "max_batches_per_bucket": max_batches}


def heldout_files(shards_dir: str, suffix: str = ".py") -> list[Path]:
    """The input files of a shard build that went to its val split (never trained on)."""
    from fusiontree.data import corpus
    from fusiontree.data.shards import read_manifest

    args = read_manifest(shards_dir)["build_args"]
    inputs = [] if args["inputs"] == ["<default corpus>"] else args["inputs"]
    try:
        units = corpus.input_units(inputs) if inputs else corpus.default_units()
    except ValueError as e:
        raise ValueError(f"cannot find the inputs the shards in {shards_dir} were built from ({e}); pass held-out "
                         "files explicitly (--ppl.files / --nextline.files)") from e
    return [Path(u.path) for u in units if u.kind == "text" and u.path.endswith(suffix)
            and corpus.split_of(u.name, args["seed"], args["val_fraction"]) == "val"]


def expand_files(specs: list[str]) -> list[Path]:
    """Files, directories (their .py files) or globs; `stdlib:REL` / `site:REL` are REL under
    this interpreter's standard library / site-packages (so configs name the same files on
    every machine)."""
    from fusiontree.data.corpus import interpreter_path

    out: list[Path] = []
    for spec in specs:
        p = interpreter_path(spec)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts))
        elif p.is_file():
            out.append(p)
        else:
            found = sorted(Path().glob(spec)) if not p.is_absolute() else []
            if not found:
                raise ValueError(f"held-out file {spec!r} does not exist (files, directories, globs, stdlib:REL or site:REL)")
            out.extend(found)
    return out


def _file_rows(sp, files: list[Path], seq_len: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """Each file tokenized (+ eos) and cut into rows of `seq_len` tokens, until `max_tokens`;
    also the number of files that contributed."""
    rows: list[list[int]] = []
    n, used = 0, 0
    for f in files:
        if n >= max_tokens:
            break
        ids = sp.encode(f.read_text(errors="replace")) + [sp.eos_id()]
        used += 1
        for i in range(0, len(ids) - 1, seq_len):
            if n >= max_tokens:
                break
            rows.append(ids[i:i + seq_len])
            n += len(rows[-1])
    return rows, used


def _padded_batches(rows: list[list[int]], batch_size: int, ignore_index: int):
    """Right-padded batches with labels: padding is never a target."""
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        T = max(len(r) for r in chunk)
        ids_BT = torch.zeros(len(chunk), T, dtype=torch.long)
        labels_BT = torch.full((len(chunk), T), ignore_index, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids_BT[b, :len(r)] = labels_BT[b, :len(r)] = torch.tensor(r)
        yield {"input_ids": ids_BT, "labels": labels_BT}


def perplexity_on_files(model, sp, files: list[Path], seq_len: int, batch_size: int = 8,
                        max_tokens: int = 100_000, loss: LossConfig | None = None) -> dict:
    """Each file is tokenized (+ eos) and cut into rows of `seq_len` tokens, positions from 0
    in each row, as the shard builder cuts long documents."""
    rows, used = _file_rows(sp, files, seq_len, max_tokens)
    if not rows:
        raise ValueError("the held-out files are empty")
    rows.sort(key=len)  # similar lengths together: little padding
    loss_fn = HybridModelLoss(loss or LossConfig())
    batches = list(_padded_batches(rows, batch_size, loss_fn.cfg.ignore_index))
    acc = validation_sums(model, {"files": batches}, loss_fn, _device(model), len(batches))["files"]
    loss_sum, tokens = float(acc[0]), int(acc[1])
    return {"files": used, "tokens": tokens, "seq_len": seq_len, "loss": loss_sum / tokens,
            "ppl": perplexity(loss_sum / tokens)}


def run_perplexity(model, sp, opts: PerplexityOptions, shards: str, batch_size: int, heldout,
                   loss: LossConfig | None = None) -> dict:
    """The `ppl` task: shard perplexity, plus held-out-file perplexity when files are given or
    can be found (`heldout()`: the shards' val .py files, or a ValueError saying why not)."""
    import logging

    if not shards:
        raise ValueError("the ppl task needs shards: --ppl.shards_dir=DIR (default: the checkpoint's "
                         "data.shards_dir)")
    res = perplexity_on_shards(model, shards, opts.max_batches, batch_size, loss)
    if opts.files:
        files = expand_files(opts.files)
    else:
        try:
            files = heldout()
        except ValueError as e:  # shards of non-Python text: the shard perplexity stands alone
            logging.getLogger("fusiontree.eval").warning("ppl: no held-out-files perplexity: %s", e)
            files = []
    if files:
        seq_len = opts.files_seq_len or max(int(b[3:]) for b in res["buckets"])
        res["files"] = perplexity_on_files(model, sp, files, min(seq_len, model.cfg.max_seq_len), batch_size,
                                           opts.files_max_tokens, loss)
    return res
