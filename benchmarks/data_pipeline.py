"""Data pipeline on CPU: shard building (MB of text/s, tokens/s, peak memory), mixtures, the loader (tokens/s).

    python benchmarks/data_pipeline.py [--input PATHS...] [--workers N] [--scale-mb 100,1000]
                                       [--out benchmarks/results/data_pipeline.json]

Needs no network: every input is made from this machine's Python standard library.

1. Build: the default corpus (or --input) into a temporary directory, twice: training a new
   tokenizer, then reusing it (the tokenize + pack + write path alone). Throughput counts
   the UTF-8 text of the documents kept, over the wall time of the whole build.
2. Loader: the train loader of that build, one rank, for each bucket length and number of
   DataLoader workers: tokens/s delivered to a consumer that does nothing else, over
   `--epochs` whole epochs of the bucket (shard reads, epoch restarts and worker start-ups
   included), and per worker.
3. Reference: tokens/s of a training step (forward, loss, backward, AdamW) of the `tiny`
   preset on this CPU at the first bucket length, and the loader's margin over it.
4. Scale (`--scale-mb`, 0 to skip): a .jsonl.zst of standard-library documents, repeated
   (each copy tagged, so no two documents are equal) to each size. Two tokenizers trained
   on an 8 MB sample of it: SentencePiece BPE (what the builder trains) and a byte-level
   BPE tokenizer.json (the `tokenizers` library), both 8192 pieces. Each build runs in a
   child process while this one samples the memory of its process tree every 50 ms (the
   sum of PSS, which counts pages the forked workers share once; and the largest RSS of
   one process): the SentencePiece build at every size (is peak memory flat in the input
   size?), the tokenizer.json build at the first size (MB/s per core against
   SentencePiece's). Then a mixture of three sources of unequal size (weights 0.5 / 0.3 /
   0.2) at the first size: the largest gap between a source's token share and its weight.
   Also each tokenizer's batch encoder alone (MB per CPU second, one thread, 5 MB).
5. Memory (`--memory-mb`, e.g. 10,40,120): SentencePiece builds of the same kind of corpus at
   each size with packing chunks of `--chunk-tokens`, nothing else: the peak PSS of the
   build's process tree, of the builder alone and the largest RSS of one process, and the
   ratio of the largest to the smallest peak (flat in the input size: close to 1).
Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from fusiontree.config import CurriculumStage, DataConfig, LossConfig
from fusiontree.models.config import model_preset
from fusiontree.data import build_train_loader
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import default_units, read_unit
from fusiontree.host import cpu_count

ROOT = Path(__file__).resolve().parents[1]


def bench_build(inputs: list[str], out: Path, workers: int, tokenizer: str = "") -> dict:
    summary = build_shards(BuildArgs(inputs=inputs, output=str(out), workers=workers, tokenizer=tokenizer,
                                     progress=False))
    t = summary["timing"]
    mb = summary["input"]["text_bytes"] / 1e6
    tokens = sum(summary["splits"][s]["document_tokens"] for s in ("train", "val"))
    return {"tokenizer": "reused" if tokenizer else "trained", "text_mb": mb, "documents": summary["input"]["documents"],
            "tokens": tokens, "seconds": t["total_s"], "tokenizer_s": t["tokenizer_s"],
            "mb_per_s": mb / t["total_s"], "tokens_per_s": tokens / t["total_s"],
            "tokenize_pack_write_mb_per_s": mb / t["tokenize_pack_write_s"]}


def bench_loader(shards: Path, seq_len: int, micro_batch_tokens: int, num_workers: int, epochs: int) -> dict:
    cfg = DataConfig(shards_dir=str(shards), global_batch_tokens=micro_batch_tokens,
                     micro_batch_tokens=micro_batch_tokens, curriculum=[CurriculumStage(seq_len, 0)],
                     num_workers=num_workers, verify_shards="size")
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
    batches = epochs * loader.stats()["buckets"][seq_len]["batches_per_epoch"]
    t0 = time.perf_counter()
    loader.next_batch()
    loader.advance(micro_batch_tokens)
    first_s = time.perf_counter() - t0
    for _ in range(batches - 1):
        loader.next_batch()
        loader.advance(micro_batch_tokens)
    dt = time.perf_counter() - t0
    assert loader.epoch(seq_len) == epochs - 1
    loader.close()
    tps = batches * micro_batch_tokens / dt
    return {"seq_len": seq_len, "micro_batch_size": micro_batch_tokens // seq_len, "num_workers": num_workers,
            "batches": batches, "first_batch_s": first_s, "tokens_per_s": tps,
            "tokens_per_s_per_worker": tps / max(1, num_workers)}


def bench_tiny_training(shards: Path, seq_len: int, micro_batch_tokens: int, steps: int) -> dict:
    from fusiontree.models import HybridLanguageModel
    from fusiontree.train.losses import HybridModelLoss

    cfg = DataConfig(shards_dir=str(shards), global_batch_tokens=micro_batch_tokens,
                     micro_batch_tokens=micro_batch_tokens, curriculum=[CurriculumStage(seq_len, 0)], num_workers=0,
                     verify_shards="none")
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0)
    torch.manual_seed(0)
    model = HybridLanguageModel(model_preset("tiny")).train()
    loss_fn = HybridModelLoss(LossConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):  # the first step warms up
        batch = loader.next_batch()
        loader.advance(micro_batch_tokens)
        t0 = time.perf_counter()
        out = model(batch["input_ids"], position_ids=batch["position_ids"], seq_idx=batch["seq_idx"])
        loss, _ = loss_fn(out.logits, batch["input_ids"], out.gates, seq_idx_BT=batch["seq_idx"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return {"seq_len": seq_len, "micro_batch_tokens": micro_batch_tokens, "steps": steps,
            "tokens_per_s": micro_batch_tokens * steps / sum(times), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ scale

def write_scaled_corpus(path: Path, mb: float) -> dict:
    """A .jsonl.zst of the standard library's documents, repeated (each copy's documents
    tagged with the copy number) until `mb` MB of text."""
    import zstandard

    docs = [d.text for u in default_units() for d in read_unit(u).docs]
    want = int(mb * 1e6)
    size = n = copy = 0
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as z:
        while size < want:
            for text in docs:
                text = f"# copy {copy}\n{text}"
                z.write((json.dumps({"text": text}) + "\n").encode())
                size += len(text.encode("utf-8", errors="surrogatepass"))
                n += 1
                if size >= want:
                    break
            copy += 1
    return {"path": str(path), "text_mb": size / 1e6, "documents": n, "file_mb": path.stat().st_size / 1e6}


def train_tokenizers(corpus: Path, out: Path, kinds: tuple[str, ...] = ("sentencepiece", "huggingface")
                     ) -> dict[str, Path]:
    """SentencePiece .model and byte-level BPE tokenizer.json, 8192 pieces each, trained on
    the first 8 MB of the corpus."""
    import zstandard

    from fusiontree.data.tokenizer import train_bytelevel_bpe, train_tokenizer

    texts, size = [], 0
    with open(corpus, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f)
        buf = b""
        while size < 8e6:
            chunk = reader.read(1 << 20)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sentencepiece": out / "tokenizer.model", "huggingface": out / "tokenizer.json"}
    lines = [x for t in texts for x in t.split("\n") if x.strip()]
    paths["sentencepiece"].write_bytes(train_tokenizer(lines, 8192, cpu_count(), 1234))
    if "huggingface" in kinds:
        paths["huggingface"].write_bytes(train_bytelevel_bpe(texts, 8192))
    return {k: paths[k] for k in kinds}


def time_encoders(corpus: Path, tokenizers: dict[str, Path], mb: float = 5.0) -> dict:
    """MB of text per CPU-second of each tokenizer's batch encoder, one thread, on the
    corpus's first `mb` MB: the tokenizers alone, without reading, packing or writing."""
    import zstandard

    from fusiontree.data.tokenizer import load_tokenizer_file

    texts, size = [], 0
    with open(corpus, "rb") as f:
        buf = zstandard.ZstdDecompressor().stream_reader(f).read(int(mb * 6e6))
    for line in buf.split(b"\n")[:-1]:
        texts.append(json.loads(line)["text"])
        size += len(texts[-1].encode("utf-8", errors="surrogatepass"))
        if size >= mb * 1e6:
            break
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as in the builder's workers
    out = {}
    for kind, path in tokenizers.items():
        tok = load_tokenizer_file(path)
        t0 = time.process_time()
        for i in range(0, len(texts), 64):
            tok.encode_batch(texts[i:i + 64])
        out[kind] = size / 1e6 / (time.process_time() - t0)
    return out


def _tree_memory(root_pid: int) -> tuple[int, int, int]:
    """(sum of PSS, largest RSS, PSS of the root) in bytes over a process and its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    pss = rss = root = 0
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        kib = int(line.split()[1])
                        pss += kib * 1024
                        root = kib * 1024 if pid == root_pid else root
                    elif line.startswith("Rss:"):
                        rss = max(rss, int(line.split()[1]) * 1024)
        except OSError:
            pass  # exited meanwhile
    return pss, rss, root


_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from fusiontree.data.build import BuildArgs, Source, build_shards
spec = json.loads({spec!r})
sources = [Source(**s) for s in spec.pop("sources", [])]
summary = build_shards(BuildArgs(sources=sources, progress=False, **spec))
print(json.dumps({{k: summary[k] for k in ("timing", "input", "splits", "mixture", "vocab_size") if k in summary}}))
"""


def measured_build(spec: dict) -> dict:
    """build_shards(spec) in a child process; its wall time, throughput and peak memory."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT), spec=json.dumps(spec))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"pss": 0, "rss": 0, "builder": 0}

    def sample() -> None:
        while proc.poll() is None:
            pss, rss, builder = _tree_memory(proc.pid)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            peak["builder"] = max(peak["builder"], builder)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"build failed: {err[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    t = summary["timing"]
    mb = summary["input"]["text_bytes"] / 1e6
    tokens = sum(summary["splits"][s]["document_tokens"] for s in ("train", "val"))
    workers = spec["workers"]
    return {"text_mb": mb, "tokens": tokens, "seconds": t["total_s"], "mb_per_s": mb / t["total_s"],
            "mb_per_s_per_worker": mb / t["total_s"] / workers, "tokens_per_s": tokens / t["total_s"],
            "workers": workers, "peak_pss_mb": peak["pss"] / 2**20, "peak_process_rss_mb": peak["rss"] / 2**20,
            "builder_peak_pss_mb": peak["builder"] / 2**20, "summary": summary}


def mixture_share_gap(summary: dict) -> dict:
    """Per split: each source's token share after sampling against its weight."""
    out = {}
    for split in ("train", "val"):
        srcs = summary["splits"][split]["sources"]
        total = sum(c["document_tokens"] for c in srcs.values())
        out[split] = {s["name"]: {"weight_share": s["target_share"],
                                  "share": srcs[s["name"]]["document_tokens"] / max(1, total),
                                  "max_copies": srcs[s["name"]]["max_copies"]}
                      for s in summary["mixture"]["sources"]}
    return out


def bench_scale(tmp: Path, sizes_mb: list[float], workers: int) -> dict:
    seq = [512, 1024, 2048, 4096]
    corpora = {}
    for mb in sizes_mb:
        corpora[mb] = write_scaled_corpus(tmp / f"corpus_{mb:g}mb.jsonl.zst", mb)
        print(f"scale corpus {mb:g} MB: {corpora[mb]['documents']} documents, {corpora[mb]['file_mb']:.0f} MB zstd",
              flush=True)
    toks = train_tokenizers(Path(corpora[sizes_mb[0]]["path"]), tmp / "tokenizers")
    encoders = time_encoders(Path(corpora[sizes_mb[0]]["path"]), toks)
    print("encoders alone, one thread: " + ", ".join(f"{k} {v:.2f} MB/s" for k, v in encoders.items()), flush=True)
    base = dict(seq_lengths=seq, val_fraction=0.01, workers=workers, seed=1234)
    rows = []
    for mb in sizes_mb:
        for kind in (["sentencepiece", "huggingface"] if mb == sizes_mb[0] else ["sentencepiece"]):
            r = measured_build({**base, "inputs": [corpora[mb]["path"]], "output": str(tmp / "out"),
                                "tokenizer": str(toks[kind])})
            r.update(input_mb=mb, tokenizer=kind)
            rows.append(r)
            print(f"build {mb:g} MB with {kind}: {r['mb_per_s']:.2f} MB/s ({r['mb_per_s_per_worker']:.2f} per worker), "
                  f"peak PSS {r['peak_pss_mb']:.0f} MiB", flush=True)
    # mixture: three sources of unequal size cut from the first corpus's documents
    mix_dir = tmp / "mix"
    mix_dir.mkdir()
    docs = [d.text for u in default_units() for d in read_unit(u).docs]
    import zstandard

    parts = {"a": (0.5, 1), "b": (0.3, 2), "c": (0.2, 4)}  # name: (weight, relative size): a is up-sampled
    total_parts = sum(size for _, size in parts.values())
    for k, (name, (_, size)) in enumerate(parts.items()):
        want, got, copy = sizes_mb[0] * 1e6 * size / total_parts, 0, 0
        with open(mix_dir / f"{name}.jsonl.zst", "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z:
            while got < want:
                for text in docs[k::3]:  # each source its own third of the documents
                    text = f"# {name} copy {copy}\n{text}"
                    z.write((json.dumps({"text": text}) + "\n").encode())
                    got += len(text)
                    if got >= want:
                        break
                copy += 1
    mix = measured_build({**base, "output": str(tmp / "out_mix"), "tokenizer": str(toks["sentencepiece"]),
                          "sources": [{"name": n, "inputs": [str(mix_dir / f"{n}.jsonl.zst")], "weight": w}
                                      for n, (w, _) in parts.items()]})
    mix["shares"] = mixture_share_gap(mix["summary"])
    mix["max_share_gap_points"] = max(abs(v["share"] - v["weight_share"]) * 100 for s in mix["shares"].values()
                                      for v in s.values())
    print(f"mixture {mix['text_mb']:.0f} MB: largest share gap {mix['max_share_gap_points']:.4f} percentage points",
          flush=True)
    for r in rows + [mix]:
        r.pop("summary")
    return {"corpora": list(corpora.values()), "encoders_mb_per_cpu_s": encoders, "builds": rows, "mixture": mix}


def bench_memory(tmp: Path, sizes_mb: list[float], workers: int, chunk_tokens: int) -> dict:
    """Peak memory of SentencePiece builds of each size (the scale section's corpus)."""
    corpora = {}
    for mb in sizes_mb:
        corpora[mb] = write_scaled_corpus(tmp / f"memory_{mb:g}mb.jsonl.zst", mb)
    toks = train_tokenizers(Path(corpora[sizes_mb[0]]["path"]), tmp / "memory_tokenizer", ("sentencepiece",))
    rows = []
    for mb in sizes_mb:
        r = measured_build(dict(inputs=[corpora[mb]["path"]], output=str(tmp / "memory_out"),
                                tokenizer=str(toks["sentencepiece"]), seq_lengths=[512, 1024, 2048, 4096],
                                val_fraction=0.01, workers=workers, seed=1234, chunk_tokens=chunk_tokens))
        r.pop("summary")
        r.update(input_mb=mb, chunk_tokens=chunk_tokens)
        rows.append(r)
        print(f"memory build {mb:g} MB: peak PSS {r['peak_pss_mb']:.0f} MiB (tree), {r['builder_peak_pss_mb']:.0f} MiB "
              f"(builder), largest process RSS {r['peak_process_rss_mb']:.0f} MiB, {r['seconds']:.1f} s", flush=True)
        shutil.rmtree(tmp / "memory_out")
    tree = [r["peak_pss_mb"] for r in rows]
    return {"corpora": list(corpora.values()), "builds": rows, "tree_peak_max_over_min": max(tree) / min(tree)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[], help="build input (default: the default corpus)")
    ap.add_argument("--workers", type=int, default=cpu_count(), help="build processes")
    ap.add_argument("--seq-lens", default="512,4096", help="buckets to time the loader on")
    ap.add_argument("--loader-workers", default="0,1,2", help="DataLoader worker counts to time")
    ap.add_argument("--micro-batch-tokens", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs of each bucket per loader configuration")
    ap.add_argument("--model-steps", type=int, default=3, help="timed tiny-model training steps (0: skip)")
    ap.add_argument("--scale-mb", default="100,1000",
                    help="input sizes (MB of text) for the memory / tokenizer.json / mixture builds; 0 skips them")
    ap.add_argument("--skip-default", action="store_true", help="skip sections 1-3 (default corpus, loader, tiny model)")
    ap.add_argument("--memory-mb", default="0",
                    help="input sizes (MB of text) of the memory section's builds, e.g. 10,40,120; 0 skips it")
    ap.add_argument("--chunk-tokens", type=int, default=BuildArgs.chunk_tokens,
                    help="packing chunk of the memory section's builds (tokens)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/data_pipeline.json"))
    args = ap.parse_args()
    scale_mb = [float(x) for x in args.scale_mb.split(",") if float(x) > 0]
    memory_mb = [float(x) for x in args.memory_mb.split(",") if float(x) > 0]
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    worker_counts = [int(x) for x in args.loader_workers.split(",")]

    builds, loads, model, scale, memory = [], [], None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        if not args.skip_default:
            builds.append(bench_build(args.input, shards, args.workers))
            tokenizer = Path(tmp) / "tokenizer.model"
            tokenizer.write_bytes((shards / "tokenizer.model").read_bytes())
            builds.append(bench_build(args.input, shards, args.workers, tokenizer=str(tokenizer)))
            for b in builds:
                print(f"build ({b['tokenizer']} tokenizer): {b['text_mb']:.1f} MB, {b['tokens']} tokens in "
                      f"{b['seconds']:.1f} s: {b['mb_per_s']:.2f} MB/s, {b['tokens_per_s'] / 1e6:.2f} M tokens/s",
                      flush=True)
            for L in seq_lens:
                for w in worker_counts:
                    r = bench_loader(shards, L, args.micro_batch_tokens, w, args.epochs)
                    loads.append(r)
                    print(f"loader seq {L:5d} workers {w}: {r['tokens_per_s'] / 1e6:7.2f} M tokens/s "
                          f"({r['tokens_per_s_per_worker'] / 1e6:.2f} M per worker), first batch "
                          f"{r['first_batch_s']:.2f} s", flush=True)
            model = bench_tiny_training(shards, seq_lens[0], args.micro_batch_tokens, args.model_steps) \
                if args.model_steps else None
        if scale_mb:
            scale = bench_scale(Path(tmp), scale_mb, args.workers)
        if memory_mb:
            memory = bench_memory(Path(tmp), memory_mb, args.workers, args.chunk_tokens)
    if model:
        print(f"tiny preset training on this CPU: {model['tokens_per_s']:.0f} tokens/s at seq {model['seq_len']}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": cpu_count(), "build_workers": args.workers,
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "command": " ".join(sys.argv), "load_average_at_end": os.getloadavg()}
    if builds:
        print("\n| build | text MB | tokens | seconds | MB/s | M tokens/s | tokenize+pack+write MB/s |")
        print("|---|---|---|---|---|---|---|")
        for b in builds:
            print(f"| {b['tokenizer']} tokenizer | {b['text_mb']:.1f} | {b['tokens']} | {b['seconds']:.1f} | "
                  f"{b['mb_per_s']:.2f} | {b['tokens_per_s'] / 1e6:.2f} | {b['tokenize_pack_write_mb_per_s']:.2f} |")
    if loads:
        print("\n| loader seq len | micro-batch | workers | batches | M tokens/s | M tokens/s per worker | first batch s |"
              + (" x tiny training |" if model else ""))
        print("|---|---|---|---|---|---|---|" + ("---|" if model else ""))
        for r in loads:
            print(f"| {r['seq_len']} | {r['micro_batch_size']} | {r['num_workers']} | {r['batches']} | "
                  f"{r['tokens_per_s'] / 1e6:.2f} | "
                  f"{r['tokens_per_s_per_worker'] / 1e6:.2f} | {r['first_batch_s']:.2f} |"
                  + (f" {r['tokens_per_s'] / model['tokens_per_s']:.0f}x |" if model else ""))
    if scale:
        print(f"\nscale builds: {args.workers} build processes, buckets 512-4096, inputs .jsonl.zst")
        print("| input MB | tokenizer | text MB | seconds | MB/s | MB/s per process | M tokens/s | peak PSS MiB (tree) "
              "| peak RSS MiB (one process) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in scale["builds"] + [dict(scale["mixture"], input_mb="mixture", tokenizer="sentencepiece")]:
            print(f"| {r['input_mb']} | {r['tokenizer']} | {r['text_mb']:.1f} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
                  f"{r['mb_per_s_per_worker']:.2f} | {r['tokens_per_s'] / 1e6:.2f} | {r['peak_pss_mb']:.0f} | "
                  f"{r['peak_process_rss_mb']:.0f} |")
        sp = [r for r in scale["builds"] if r["tokenizer"] == "sentencepiece"]
        hf = [r for r in scale["builds"] if r["tokenizer"] == "huggingface"]
        if hf:
            print(f"tokenizer.json / SentencePiece MB/s per process at {hf[0]['input_mb']:g} MB: "
                  f"{hf[0]['mb_per_s'] / sp[0]['mb_per_s']:.2f}x")
        if len(sp) > 1:
            print(f"peak PSS {sp[-1]['input_mb']:g} MB / {sp[0]['input_mb']:g} MB input: "
                  f"{sp[-1]['peak_pss_mb'] / sp[0]['peak_pss_mb']:.3f}x")
        print("encoders alone (MB per CPU second, one thread): "
              + ", ".join(f"{k} {v:.2f}" for k, v in scale["encoders_mb_per_cpu_s"].items()))
        print("\n| mixture split | source | weight share | token share | max copies |")
        print("|---|---|---|---|---|")
        for split, srcs in scale["mixture"]["shares"].items():
            for name, v in srcs.items():
                print(f"| {split} | {name} | {v['weight_share']:.2%} | {v['share']:.4%} | {v['max_copies']} |")
        print(f"largest gap: {scale['mixture']['max_share_gap_points']:.4f} percentage points")
    if memory:
        print(f"\nmemory builds: {args.workers} build processes, buckets 512-4096, chunks of {args.chunk_tokens} "
              "tokens, inputs .jsonl.zst, SentencePiece")
        print("| input MB | text MB | seconds | MB/s | peak PSS MiB (tree) | peak PSS MiB (builder) "
              "| peak RSS MiB (one process) |")
        print("|---|---|---|---|---|---|---|")
        for r in memory["builds"]:
            print(f"| {r['input_mb']:g} | {r['text_mb']:.1f} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
                  f"{r['peak_pss_mb']:.0f} | {r['builder_peak_pss_mb']:.0f} | {r['peak_process_rss_mb']:.0f} |")
        print(f"largest / smallest tree peak: {memory['tree_peak_max_over_min']:.3f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "build": builds, "loader": loads, "tiny_training": model,
                               "scale": scale, "memory": memory}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
