"""Build length-bucketed webdataset shards from raw text (and a SentencePiece tokenizer, unless given one).

    python data_pipeline/build_shards.py                      # the default corpus -> data/shards
    python data_pipeline/build_shards.py --input corpus/ 'more/*.jsonl.gz' --output data/web \
        --vocab-size 32000 --seq-lengths 512,1024,2048,4096,8192,16384,32768 --workers 32
    python data_pipeline/build_shards.py --tokenizer llama/tokenizer.json --output data/mix \
        --source code=code/,extra.jsonl.zst:0.7 --source web=web/part-*.parquet:0.3
    python data_pipeline/build_shards.py --mixture mix.yaml --tokenizer tok.model --output data/mix

With no --input, the corpus is the running interpreter's standard library (.py files and
their module docstrings) plus pydoc's topics: it exists on every machine, without network.
Inputs: files, directories (searched recursively) or globs of .txt, .md, .py (one document
per file), .jsonl, .jsonl.gz, .jsonl.zst, .jsonl.xz (one document per line, text under
--text-field), .parquet and .arrow (one document per row, text in column --text-field), and
directories written by datasets' save_to_disk.

--tokenizer: a SentencePiece .model or a Hugging Face tokenizer.json (its special tokens
from tokenizer_config.json beside it, else from their usual names). Mixtures: each
--source NAME=PATH[,PATH...]:WEIGHT (or the sources of a --mixture YAML) gets WEIGHT /
sum of weights of the build's tokens, by repeating or leaving out whole documents.

Output (see fusiontree/data/shards.py): the tokenizer (tokenizer.model or tokenizer.json),
train/ and val/ shards per bucket, manifest.json. A previous build at --output is replaced
only when the new one is complete. Training reads it with fusiontree.data.build_train_loader.
"""

from __future__ import annotations

import argparse
import sys

from fusiontree.cli import run_main
from fusiontree.data.build import DEFAULT_SEQ_LENGTHS, BuildArgs, build_shards, format_summary, load_mixture, parse_source
from fusiontree.host import cpu_count


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 512,1024,2048")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 4,2,1,1")


def parse_args(argv: list[str] | None = None) -> BuildArgs:
    d = BuildArgs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[], help="files, directories or globs (default: the default corpus)")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=PATH[,PATH...]:WEIGHT",
                    help="a source of a weighted mixture (repeat for each source; instead of --input)")
    ap.add_argument("--mixture", default="", metavar="FILE.yaml",
                    help="the mixture's sources in a YAML file: sources: [{name, inputs, weight}, ...]")
    ap.add_argument("--output", default=d.output, help=f"output directory (default {d.output}); a previous build "
                    "there is replaced, any other content is an error")
    ap.add_argument("--tokenizer", default="", help="a SentencePiece .model or a Hugging Face tokenizer.json to use "
                    "(default: train a SentencePiece model)")
    ap.add_argument("--vocab-size", type=int, default=None, help=f"pieces of the new tokenizer (default {d.vocab_size})")
    ap.add_argument("--seq-lengths", type=_int_list, default=list(DEFAULT_SEQ_LENGTHS),
                    help=f"bucket lengths in tokens (default {','.join(map(str, DEFAULT_SEQ_LENGTHS))})")
    ap.add_argument("--bucket-shares", type=_float_list, default=[],
                    help="share of the tokens each bucket receives, one weight per --seq-lengths entry "
                    "(default equal); the longest documents go to the longest buckets")
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction,
                    help=f"share of documents (whole files) in the val split (default {d.val_fraction})")
    ap.add_argument("--workers", type=int, default=cpu_count(), help="processes and tokenizer-training threads "
                    f"(default: the CPUs here, {cpu_count()})")
    ap.add_argument("--shard-size", type=int, default=d.shard_size, help=f"samples per shard (default {d.shard_size})")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"split, sampling and packing seed (default {d.seed})")
    ap.add_argument("--text-field", default=d.text_field,
                    help=f"jsonl key / parquet or arrow column holding the text (default {d.text_field})")
    ap.add_argument("--tokenizer-sample-mb", type=float, default=d.tokenizer_sample_mb,
                    help=f"MB of train text the tokenizer is trained on (default {d.tokenizer_sample_mb:g})")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    if a.tokenizer and a.vocab_size is not None:
        ap.error("--vocab-size applies to a new tokenizer; a reused --tokenizer brings its own vocabulary")
    if a.source and a.mixture:
        ap.error("give the mixture's sources with --source or in --mixture, not both")
    try:
        sources = load_mixture(a.mixture) if a.mixture else [parse_source(s) for s in a.source]
    except ValueError as e:
        ap.error(str(e))
    return BuildArgs(inputs=a.input, sources=sources, output=a.output, tokenizer=a.tokenizer,
                     vocab_size=a.vocab_size if a.vocab_size is not None else d.vocab_size,
                     seq_lengths=a.seq_lengths, bucket_shares=a.bucket_shares, val_fraction=a.val_fraction, workers=a.workers,
                     shard_size=a.shard_size, seed=a.seed, text_field=a.text_field,
                     tokenizer_sample_mb=a.tokenizer_sample_mb, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = build_shards(args)
    print(format_summary(summary, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
