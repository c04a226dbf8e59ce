"""Generate text from a trained checkpoint with the KV + Mamba caches.

    python launch/generate.py --checkpoint runs/x --prompt "def fib(n):"
    python launch/generate.py --checkpoint runs/x/checkpoints/step_00000100 --prompt-file prompts.txt \\
        --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1
    python launch/generate.py --checkpoint runs/x --prompt "..." --device cuda --cuda-graph

--checkpoint: a checkpoint directory, or a run directory (its latest valid checkpoint).
One prompt (--prompt, or a file of one line) streams its continuation to stdout as it is
generated; a file of several prompts (one per line) runs as one left-padded batch and prints
each prompt with its continuation when the batch is done. Each prompt starts with BOS, as in
training; a row stops at EOS or after --max-new-tokens. Greedy by default (--temperature 0);
--top-k / --top-p shape sampling (they need --temperature > 0); --seed fixes the sample.
--cuda-graph replays each decode step from one captured CUDA graph (GPU only); the step's blocks
are compiled first unless --no-compile. The statistics time the first decode step apart: it
compiles the decoding kernels and, with --cuda-graph, the step and its graph.
Dotted overrides change the checkpoint's config (--kernels.decode_attention=all_slots).
Compiled kernels and Triton's autotuning choices go to --compile-cache-dir, or to the directory
the run trained with (train.compile_cache_dir), so that later processes find them there.
The statistics (tokens/s) go to stderr, --output FILE.json keeps tokens, texts and timings.
Bad input (a missing or damaged checkpoint, a prompt too long for the model, bad sampling
settings, a tokenizer that is not the checkpoint's) is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint
from fusiontree.inference import TextStream, check_sampling, generate, left_pad
from fusiontree.train.startup import use_compile_cache

log = logging.getLogger("fusiontree.generate")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (its continuation is streamed)")
    src.add_argument("--prompt-file", help="UTF-8 text file, one prompt per line (one batch)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cuda-graph", action="store_true", help="replay decode steps from a CUDA graph")
    ap.add_argument("--no-compile", action="store_true",
                    help="with --cuda-graph: capture the step without compiling its blocks first (a faster "
                         "first decode step, slower steps after it)")
    ap.add_argument("--compile-cache-dir", default="",
                    help="keep compiled kernels and Triton's autotuning choices here (default: the "
                         "checkpoint's train.compile_cache_dir, if its run set one)")
    ap.add_argument("--kernels", default="config", choices=["config", "reference"],
                    help="config: the checkpoint's kernels (auto per device); reference: the PyTorch reference ops")
    ap.add_argument("--tokenizer", default="", help="SentencePiece model (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--output", default="", help="also write prompts, tokens, texts and timings to this JSON file")
    return ap.parse_known_args(argv)


def check_settings(a: argparse.Namespace) -> str:
    """Everything that can be checked before the model loads; returns the device."""
    check_sampling(a.temperature, a.top_k, a.top_p)
    if a.temperature == 0 and (a.top_k or a.top_p < 1):
        raise ValueError("--top-k / --top-p shape sampling, and --temperature 0 is greedy decoding: pass "
                         "--temperature > 0 with them, or leave them out")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible; use --device cpu or auto")
    if a.no_compile and not a.cuda_graph:
        raise ValueError("--no-compile only applies to the --cuda-graph step (decoding without it is not "
                         "compiled); pass --cuda-graph too, or leave it out")
    if a.cuda_graph and device != "cuda":
        raise ValueError("--cuda-graph replays decode steps on a GPU, and the device is the CPU; leave it out "
                         "or run on a GPU")
    return device


def read_prompts(a: argparse.Namespace) -> list[str]:
    if a.prompt is not None:
        return [a.prompt]
    path = Path(a.prompt_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompt-file {path}: {e}") from e
    if not lines:
        raise ValueError(f"--prompt-file {path} is empty; write one prompt per line")
    for i, line in enumerate(lines):
        if not line.strip():
            raise ValueError(f"line {i + 1} of {path} is empty; write one prompt per line (no blank lines)")
    return lines


def encode(tok, prompts: list[str], max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """BOS + each prompt's tokens; every row must fit the model with its new tokens."""
    rows = [[tok.bos_id()] + tok.encode(p) for p in prompts]
    for i, ids in enumerate(rows):
        if len(ids) + max_new_tokens > max_seq_len:
            which = f"prompt {i + 1}" if len(rows) > 1 else "the prompt"
            fix = (f"shorten it or pass --max-new-tokens {max_seq_len - len(ids)} or less" if len(ids) < max_seq_len
                   else f"shorten it to fewer than {max_seq_len} tokens")
            raise ValueError(f"{which} has {len(ids)} tokens (BOS included); with --max-new-tokens {max_new_tokens} "
                             f"that is {len(ids) + max_new_tokens}, past the model's max_seq_len {max_seq_len}: {fix}")
    return rows


def run(a: argparse.Namespace, overrides: list[str], out) -> dict:
    """Load, generate (streaming a single prompt to `out`), print; returns the run's record."""
    device = check_settings(a)
    prompts = read_prompts(a)
    ckpt = load_checkpoint(a.checkpoint, device, "reference" if a.kernels == "reference" else None, overrides)
    tok = checkpoint_tokenizer(ckpt, a.tokenizer)
    cache_dir = a.compile_cache_dir or ckpt.cfg.train.compile_cache_dir
    if cache_dir:  # before the prefill: its kernels are the first to compile and autotune
        use_compile_cache(cache_dir)
        log.info("compile cache: %s", cache_dir)
    model = ckpt.model
    rows = encode(tok, prompts, a.max_new_tokens, model.cfg.max_seq_len)
    log.info("%s (%s, %.2fM parameters) on %s, kernels %s", ckpt.path, ckpt.cfg.model.preset,
             sum(p.numel() for p in model.parameters()) / 1e6, device, model.kernels.describe())
    # The padding's id is masked out; any id in the vocabulary will do (not every tokenizer has a pad).
    ids_BT, mask_BT = left_pad(rows, pad_id=tok.eos_id())
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    eos = tok.eos_id()
    stream = TextStream(tok.decode) if len(rows) == 1 else None
    times: list[float] = []
    ended = False

    def on_token(nxt_B: torch.Tensor) -> None:
        nonlocal ended
        if stream is not None:
            token_id = int(nxt_B[0])  # host sync: the token is printed now
            ended = ended or token_id == eos
            if not ended:
                out.write(stream.push(token_id))
                out.flush()
        elif device == "cuda":
            torch.cuda.synchronize()  # deliberate: the clock below times finished steps
        times.append(time.perf_counter())

    if stream is not None:
        out.write(prompts[0])
        out.flush()
    generator = torch.Generator(device=device).manual_seed(a.seed)
    t0 = time.perf_counter()
    tokens_BN = generate(model, ids_BT, a.max_new_tokens, attention_mask=mask_BT if len(rows) > 1 else None,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_token_id=eos,
                         generator=generator, cuda_graph=a.cuda_graph, compile_decode=not a.no_compile,
                         on_token=on_token)
    new_rows = [row[:row.index(eos)] if eos in row else row for row in tokens_BN[:, ids_BT.shape[1]:].tolist()]
    texts = [tok.decode(r) for r in new_rows]
    if stream is not None:
        out.write(stream.flush() + "\n")
    else:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            out.write(f"--- {i + 1} of {len(prompts)} ---\n{p}{t}\n")
    out.flush()
    return stats(a, ckpt, prompts, rows, new_rows, texts, t0, times)


def stats(a, ckpt, prompts, rows, new_rows, texts, t0: float, times: list[float]) -> dict:
    """Tokens/s over the whole generation (prefill included), the first decode step on its own
    (it compiles the decoding kernels for this shape and, with --cuda-graph, the step's blocks
    and the graph's capture: once per process), and the decode rate after it; logged, and
    returned for --output."""
    n_new = sum(len(r) for r in new_rows)
    total_s = times[-1] - t0
    first_s = times[0] - t0
    first_step_s = times[1] - times[0] if len(times) > 1 else None
    steady = len(times) - 2
    decode_rate = steady * len(rows) / (times[-1] - times[1]) if steady > 0 else None
    build = " (compile and capture of the CUDA graph included)" if a.cuda_graph else ""
    log.info("%d new tokens from %d prompt(s) in %.2f s: %.1f tokens/s; first token after %.3f s (prefill of "
             "%d tokens)%s%s", n_new, len(rows), total_s, n_new / total_s, first_s, sum(len(r) for r in rows),
             f", first decode step {first_step_s:.3f} s{build}" if first_step_s is not None else "",
             f", then {decode_rate:.1f} tokens/s (decode steps x batch)" if decode_rate else "")
    return {"checkpoint": str(ckpt.path), "settings": {k: getattr(a, k) for k in (
                "max_new_tokens", "temperature", "top_k", "top_p", "seed", "cuda_graph", "no_compile")},
            "kernels": ckpt.model.kernels.describe(),
            "rows": [{"prompt": p, "prompt_tokens": r, "new_tokens": n, "text": t}
                     for p, r, n, t in zip(prompts, rows, new_rows, texts)],
            "new_tokens": n_new, "seconds": total_s, "tokens_per_s": n_new / total_s,
            "first_token_s": first_s, "first_decode_step_s": first_step_s, "decode_tokens_per_s": decode_rate}


def main(argv: list[str] | None = None, out=None) -> int:
    a, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        record = run(a, overrides, out or sys.stdout)
    except ValueError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    if a.output:
        Path(a.output).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
