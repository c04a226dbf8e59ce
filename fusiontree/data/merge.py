"""Merge shard builds of separate input parts into one build that the loader reads.

    merge_builds(["data/parts/part-00000", "data/parts/part-00001"], "data/shards")

slurm/build_shards.sh builds each input part in its own job (one output directory per
part, all with the same tokenizer) and merges them with this. The merged build is what
`data.shards_dir` points at: one manifest, one tokenizer, and per split and bucket the
parts' samples in part order.

Samples are copied, not re-packed: a part's samples keep their tokens and document starts.
They are re-keyed and re-sharded, because a bucket's sample keys count up from 0 across its
shards (fusiontree/data/shards.py) and the loader checks them. Every source shard is
checked against its part's manifest (size, sha256) and read as the loader reads it (keys,
lengths, token ids); a damaged part stops the merge with its shard named.

The parts must agree on what the loader relies on: format, tokenizer (sha256), token dtype,
vocabulary and bucket lengths; the same split seed and val fraction keep every document in
one split. Counts (documents, tokens, packing and bad-input statistics) are the parts' sums.
Mixture parts (each built from its own part of every source, with the same source names
and weights) each follow the weights, so the merge does too; its per-source counts are the
parts' sums. The merged build replaces `output` only once complete (build.staged_output).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fusiontree.data.build import staged_output
from fusiontree.data.shards import (FORMAT, SPLITS, ShardWriter, bucket_shards, read_manifest, read_shard_range,
                                    verify_shards, write_manifest)

# Manifest fields every part must share (the loader and the split assignment depend on them).
_MUST_MATCH = {
    "tokenizer sha256": lambda m: m["tokenizer"]["sha256"],
    "token_dtype": lambda m: m["token_dtype"],
    "vocab_size": lambda m: m["vocab_size"],
    "seq_lengths": lambda m: m["seq_lengths"],
    "split seed": lambda m: m["build_args"]["seed"],
    "val_fraction": lambda m: m["build_args"]["val_fraction"],
    # a mixture's parts each follow the weights, so their sum does too
    "mixture sources and weights": lambda m: [(s["name"], s["weight"]) for s in m["mixture"]["sources"]]
    if "mixture" in m else None,
}


def _sum_dicts(dicts: list[dict]) -> dict:
    return {k: sum(d[k] for d in dicts) for k in dicts[0]}


def merge_builds(parts: list[str | Path], output: str | Path, shard_size: int | None = None) -> dict:
    """Merge the builds in `parts` (in that order) into `output`; returns the new manifest.
    `shard_size`: samples per output shard (default: the first part's)."""
    if not parts:
        raise ValueError("merge: no input builds given")
    parts = [Path(p) for p in parts]
    out = Path(output)
    if len(set(p.resolve() for p in parts)) != len(parts):
        raise ValueError(f"merge: a build is listed twice in {[str(p) for p in parts]}")
    if out.resolve() in {p.resolve() for p in parts}:
        raise ValueError(f"merge: --output {out} is one of the inputs; write the merge to a new directory")
    manifests = [read_manifest(p) for p in parts]
    first = manifests[0]
    for p, m in zip(parts[1:], manifests[1:]):
        for what, get in _MUST_MATCH.items():
            if get(m) != get(first):
                raise ValueError(f"merge: {p} has {what} {get(m)!r} but {parts[0]} has {get(first)!r}; build every "
                                 "part with the same --tokenizer, --seq-lengths, --seed, --val-fraction (and mixture)")
    shard_size = shard_size or int(first["shard_size_samples"])
    if shard_size < 1:
        raise ValueError(f"merge: shard_size={shard_size} must be >= 1")

    with staged_output(out) as stage:
        manifest = _merge_into(stage, parts, manifests, shard_size)
    return manifest


def _merge_into(out: Path, parts: list[Path], manifests: list[dict], shard_size: int) -> dict:
    first = manifests[0]
    dtype, seq_lengths = first["token_dtype"], [int(L) for L in first["seq_lengths"]]
    vocab = int(first["vocab_size"])
    tok_file = first["tokenizer"]["path"]
    shutil.copyfile(parts[0] / tok_file, out / tok_file)
    splits = {}
    for split in SPLITS:
        buckets = {}
        for L in seq_lengths:
            writer = ShardWriter(out, split, L, shard_size, dtype)
            for p, m in zip(parts, manifests):
                shards = bucket_shards(p, m, split, L)
                verify_shards(shards, "sha256")  # raises CorruptShardError (a ValueError) naming the shard
                for shard in shards:
                    samples, error = read_shard_range(shard, 0, shard.samples, L, dtype, vocab)
                    if error is not None:
                        raise ValueError(f"merge: shard {shard.path} is damaged ({error}); rebuild that part")
                    for _, tokens_T, starts_D in samples:
                        writer.write(tokens_T, starts_D)
            buckets[str(L)] = writer.close()
        per_part = [m["splits"][split] for m in manifests]
        splits[split] = {"documents": sum(s["documents"] for s in per_part),
                         "document_tokens": sum(s["document_tokens"] for s in per_part),
                         "samples": sum(b["samples"] for b in buckets.values()),
                         "tokens": sum(b["tokens"] for b in buckets.values()),
                         "packing": _sum_dicts([s["packing"] for s in per_part]),
                         "buckets": buckets}
        if "mixture" in first:
            for L in seq_lengths:
                buckets[str(L)]["source_tokens"] = _sum_dicts([s["buckets"][str(L)]["source_tokens"]
                                                               for s in per_part])
            splits[split]["sources"] = {name: {**_sum_dicts([s["sources"][name] for s in per_part]),
                                               "max_copies": max(s["sources"][name]["max_copies"] for s in per_part)}
                                        for name in per_part[0]["sources"]}
    build_args = dict(first["build_args"])
    build_args["inputs"] = [i for m in manifests for i in m["build_args"]["inputs"]]
    build_args["shard_size"] = shard_size
    manifest = {
        "format": FORMAT,
        "corpus": "; ".join(m["corpus"] for m in manifests),
        "tokenizer": first["tokenizer"],
        "vocab_size": first["vocab_size"],
        "token_dtype": dtype,
        "seq_lengths": seq_lengths,
        "shard_size_samples": shard_size,
        "build_args": build_args,
        "merged_from": [str(p) for p in parts],
        "input": _sum_dicts([m["input"] for m in manifests]),
        "splits": splits,
    }
    if "mixture" in first:
        mix = {**first["mixture"], "warnings": [w for m in manifests for w in m["mixture"]["warnings"]]}
        mix["sources"] = [{**src, "inputs": [i for m in manifests for i in m["mixture"]["sources"][k]["inputs"]],
                           "input": _sum_dicts([m["mixture"]["sources"][k]["input"] for m in manifests])}
                          for k, src in enumerate(first["mixture"]["sources"])]
        manifest["mixture"] = mix
    write_manifest(out, manifest)  # last: a directory with a manifest holds a complete build
    return manifest
