"""Decode on one GPU: a FusionTree preset against its same-size all-global Transformer twin, per
decode attention path, with the bytes each token must move and the share of the card's memory
bandwidth that reaches.

    python benchmarks/decode_gpu.py [--preset 1b] [--contexts 4096,32640] [--batches 1,8,32]
        [--decode-attention all_slots,filled_blocks] [--twin-flash] [--no-twin] [--modes tuned_graph,combo_graph]
        [--inductor-options JSON] [--decode-kernel-options JSON] [--max-slots-per-split N]
        [--steps 32] [--hbm-tb-per-s 4.8] [--out FILE.json] [--profile DIR]
    python benchmarks/decode_gpu.py --dry-run [--modes graph]     # CPU, debug preset: the code paths, no timing value

Per model (the preset, then `transformer-<preset>`), decode attention path and context: build
the model (bf16, random weights), prefill one random prompt of that length at batch 1 (timed),
copy its caches into every row of each batch size (rows decode as if they held different
prompts; a prefill of 32 x 32K tokens would need 66 GB for its logits alone), then time decode
steps continuing them (CUDA-event mean over --steps steps after warm-up), per mode:

  eager           the cached forward, one per token (host-bound; the attention backend reads
                  the filled cache, which the host slices)
  graph           `GraphedDecoder(pack=False)`: one CUDA graph replay per token (static shapes)
  compiled_graph  the same with the step's blocks compiled first, Inductor's default options
                  (`GraphedDecoder(compile=True, pack=False, compile_options={})`)
  packed_graph    compiled_graph with the projections that read one input packed into one
                  matmul each (packing is the default: q/k/v, gate/up)
  autotuned_graph packed_graph with the blocks compiled in torch.compile's
                  "max-autotune-no-cudagraphs" mode (Triton matmul templates timed against
                  cuBLAS per shape, neighbours fused into them; minutes of compile)
  tuned_graph     packed_graph with Inductor's coordinate-descent tuning: one-row matmuls
                  (batch 1) become reductions that Inductor tunes and fuses with their
                  neighbours, and every Triton kernel's tiles are tuned
  combo_graph     tuned_graph with Inductor's combo kernels as well (`combo_kernels`:
                  independent kernels of a graph launched as one): `GraphedDecoder(compile=True)`
                  with its default options, what `generate(cuda_graph=True)` runs

Decode attention paths (`kernels.decode_attention`; they change the graphed modes only):

  all_slots       global layers read every allocated slot (masked SDPA)
  filled_blocks   FlexAttention's decoding kernel over the filled blocks only
                  (what `auto`, the default, takes on CUDA)
  sdpa_flash      (--twin-flash; the Transformer twin only) SDPA forced to its flash kernel,
                  unmasked, over the first L slots, L = the filled count when the graph is
                  captured. A graph fixes L, so every replay attends over the same L slots: the
                  time is that of a decode step at context L, and the tokens after the first
                  replay are not the model's. At batch 1 the first replay is checked against the
                  cached forward (`first_step_max_err`). Exact only without padding, which the
                  random prompts here do not have.

Bytes per token: what a step of that path must move at least: every weight but the embedding
table, the Mamba states (read and written), and for each attention layer the key and value
slots it reads with their positions: every allocated slot (all_slots), the filled slots rounded
up to whole key blocks (filled_blocks), L (sdpa_flash), counted at the middle of the timed
steps. `floor` counts the filled slots only. HBM fraction = bytes / best graphed time / the
card's bandwidth (--hbm-tb-per-s; known cards: H200 4.8, H100 SXM 3.35 TB/s).

Each graphed mode's row also has `<mode>_build_s`: the seconds to build its decoder; on a GPU
that is the compile on first use of its options and shapes, the warm-up steps and the capture.

--profile DIR: after timing each graphed mode, torch's profiler records 8 more steps (the
kernels a graph replay runs) and DIR/<model>_<path>_<context>_b<batch>_<mode>.txt gets the top
30 kernels by device time; the row names its file (`<mode>_profile`).

Prints one table (FusionTree / Transformer speed ratios per path, and best against best beside
the ratio of the bytes the two steps move, which is the speed ratio at equal bandwidth
efficiency) and the batch-32 / batch-1 tokens/s ratios, and writes JSON. The cases run in one
process; split a sweep across calls with --contexts / --batches / --decode-attention when a call
has a time limit.
--dry-run runs every selected code path on the CPU with the debug preset (graphs become the same
static step run eagerly, timed on the host clock): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusiontree.config import KernelConfig
from fusiontree.inference.cuda_graph import GraphedDecoder
from fusiontree.models import HybridLanguageModel
from fusiontree.models.config import model_preset
from fusiontree.models.flops import count_params
from fusiontree.models.layers import cast_model
from fusiontree.ops import resolve_kernels
from fusiontree.ops.backends import decode as decode_backend
from fusiontree.ops.backends.decode import KV_BLOCK
from fusiontree.train.metrics import gpu_busy_ms, kernel_categories_table
from _results import cuda_span_ms, git_commit, hbm_tb_per_s, write_results

ROOT = Path(__file__).resolve().parents[1]
MODES = ("eager", "graph", "compiled_graph", "packed_graph", "autotuned_graph", "tuned_graph", "combo_graph")
# Each graphed mode's Inductor options (None: GraphedDecoder's default; --inductor-options sets tuned_graph's).
MODE_OPTIONS: dict = {"tuned_graph": {"coordinate_descent_tuning": True}, "autotuned_graph": None,
                      "combo_graph": None}


class Timer:
    """Mean ms per call of `fn` over `repeats` calls: CUDA events on a GPU, the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn, repeats: int) -> float:
        if self.cuda:
            return cuda_span_ms(fn, repeats)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats


PROFILE_STEPS = 8


def cache_length(context: int, modes: list[str], steps: int, profile: bool) -> int:
    """Slots a case's caches need: the prompt, warm-up and timed steps of every mode (and the
    eager one), the profiled steps, and a margin."""
    return context + (len(modes) + 1) * steps + 8 + (PROFILE_STEPS * len(modes) if profile else 0)


def profile_steps(out_dir: Path, tag: str, fn, n: int = PROFILE_STEPS) -> str:
    """`n` calls of `fn` under torch's profiler; the top rows by device time (host time on CPU)
    go to out_dir/<tag>.txt, whose name is returned."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=30, max_name_column_width=90)
    head = f"{tag}: {n} steps"
    if cuda:
        events = prof.events()
        busy, kernels = gpu_busy_ms(events)
        head += f"; per step: GPU busy {busy / n:.3f} ms, {kernels / n:.0f} kernels\n"
        head += "\n".join(kernel_categories_table(events)) + f"\n(summed over the {n} steps)"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tag}.txt"
    path.write_text(f"{head}\n{table}\n")
    return path.name


class FlashFixedLength:
    """`decode_attention` for the timing-only `sdpa_flash` path: SDPA's flash kernel, no mask,
    over the first `length` slots of a global cache (all slots of a ring, which the context has
    filled). `length` is read when the step is captured; see the module docstring."""

    def __init__(self):
        self.length = 0

    def __call__(self, q_B1HD, k_BSKD, v_BSKD, q_pos_B1, k_pos_BS, filled_1, window=None):
        K = k_BSKD.shape[2]
        if window is None:
            k_BSKD, v_BSKD = k_BSKD[:, :self.length], v_BSKD[:, :self.length]
        # The G query heads of a kv head become its G query rows: no copy of the cache per head.
        q = rearrange(q_B1HD, "b 1 (k g) d -> b k g d", k=K)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2))
        return rearrange(o, "b k g d -> b 1 (k g) d")


def build(name: str, path: str, device: torch.device, dtype: torch.dtype,
          flash: FlashFixedLength) -> HybridLanguageModel:
    if path == "sdpa_flash":
        kernels = dataclasses.replace(resolve_kernels(KernelConfig(decode_attention="all_slots"), device),
                                      decode_attention=flash, decode_attention_name="sdpa_flash")
    else:
        kernels = resolve_kernels(KernelConfig(decode_attention=path), device)
    torch.manual_seed(0)
    model = cast_model(HybridLanguageModel(model_preset(name), kernels).to(device), dtype).eval()
    model.check_inputs = False
    return model


def replicate(kv1, ms1, kv, ms) -> None:
    """Every row of the batch caches (kv, ms) := row 0 of the batch-1 caches (kv1, ms1)."""
    for big, one in zip(kv.tensors() + ms.tensors(), kv1.tensors() + ms1.tensors()):
        big.copy_(one.expand_as(big))
    kv.seen_tokens = ms.seen_tokens = kv1.seen_tokens


def bytes_per_token(model: HybridLanguageModel, kv, ms, filled: int, path: str, flash_len: int) -> tuple[int, int]:
    """(bytes the path moves per step, the floor: filled slots only); see the module docstring."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    read = floor = weights + 2 * ms.nbytes()
    for layer in kv.layers:
        if layer is None:
            continue
        per_slot = layer.nbytes() // layer.slots
        filled_here = min(filled, layer.slots)
        slots = {"all_slots": layer.slots,
                 "filled_blocks": min(layer.slots, -(-filled_here // KV_BLOCK) * KV_BLOCK),
                 "sdpa_flash": layer.slots if layer.ring else flash_len}[path]
        read += slots * per_slot
        floor += filled_here * per_slot
    return read, floor


def flash_check(model, kv, ms, nxt_B1, decoder_factory) -> float:
    """Batch 1: the first replay of the fixed-length flash step against the cached forward for
    the same token; both start from the same cache state (a snapshot, restored in between)."""
    state = kv.tensors() + ms.tensors()
    saved, seen = [t.clone() for t in state], kv.seen_tokens
    want = model(nxt_B1, past_key_values=kv, past_mamba_states=ms).logits[:, -1].float()
    for t, s in zip(state, saved):
        t.copy_(s)
    kv.seen_tokens = ms.seen_tokens = seen
    decoder = decoder_factory()
    got = decoder.step(nxt_B1[:, 0]).float()
    return float((got - want).abs().max() / want.abs().max())


@torch.no_grad()
def measure_context(model, path: str, context: int, batches: list[int], modes: list[str], steps: int,
                    timer: Timer, flash: FlashFixedLength, hbm: float | None, graph: bool,
                    profile_dir: Path | None = None, name: str = "") -> list[dict]:
    dev = model.embed.weight.device
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=g).to(dev)
    max_len = cache_length(context, modes, steps, profile_dir is not None)
    rows = []
    try:
        # Warm-up at the timed shapes (first calls compile and autotune kernels), then the prefill.
        kv1, ms1 = model.allocate_inference_cache(1, max_len)
        model(prompt, past_key_values=kv1, past_mamba_states=ms1)
        kv1, ms1 = model.allocate_inference_cache(1, max_len)
        timer.sync()
        t0 = time.perf_counter()
        out = model(prompt, past_key_values=kv1, past_mamba_states=ms1)
        timer.sync()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        first_B1 = out.logits[:, -1:].argmax(-1)
        del out
    except torch.OutOfMemoryError:
        return [{"context": context, "batch": b, "error": "out of memory (prefill)"} for b in batches]
    for batch in batches:
        row = {"context": context, "batch": batch, "prefill_ms_batch1": prefill_ms}
        try:
            tag = f"{name}_{path}_{context}_b{batch}"
            row.update(measure_batch(model, path, kv1, ms1, first_B1, batch, max_len, modes, steps, timer,
                                     flash, graph, profile_dir, tag))
            best = min(row[f"{m}_ms_per_token"] for m in modes if m != "eager" and f"{m}_ms_per_token" in row) \
                if any(m != "eager" for m in modes) else row["eager_ms_per_token"]
            row["tokens_per_s"] = batch * 1e3 / best
            row["hbm_fraction"] = row["bytes_per_token"] / (best * 1e-3) / (hbm * 1e12) if hbm else None
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def measure_batch(model, path, kv1, ms1, first_B1, batch, max_len, modes, steps, timer, flash, graph,
                  profile_dir: Path | None = None, tag: str = "") -> dict:
    dev = model.embed.weight.device
    kv, ms = model.allocate_inference_cache(batch, max_len)
    replicate(kv1, ms1, kv, ms)
    nxt = first_B1.expand(batch, 1).contiguous()
    row = {"cache_bytes": kv.nbytes() + ms.nbytes(), "kv_cache_bytes": kv.nbytes(), "mamba_state_bytes": ms.nbytes()}
    start = kv.seen_tokens
    if "eager" in modes:
        def eager_step():
            nonlocal nxt
            nxt = model(nxt, past_key_values=kv, past_mamba_states=ms).logits[:, -1:].argmax(-1)

        eager_step()
        row["eager_ms_per_token"] = timer.ms(eager_step, steps - 1)

    def decoder(mode: str) -> GraphedDecoder:
        flash.length = kv.seen_tokens + 1  # the filled count of the first replay
        return GraphedDecoder(model, kv, ms, torch.full((batch,), kv.seen_tokens, device=dev), graph=graph,
                              compile=mode != "graph", pack=mode not in ("graph", "compiled_graph"),
                              compile_mode="max-autotune-no-cudagraphs" if mode == "autotuned_graph" else None,
                              compile_options=MODE_OPTIONS.get(mode, {}))

    if path == "sdpa_flash" and batch == 1:
        row["first_step_max_err"] = flash_check(model, kv, ms, nxt, lambda: decoder("graph"))
    flash_len = 0
    for mode in (m for m in modes if m != "eager"):
        t0 = time.perf_counter()
        dec = decoder(mode)  # compiles (first use of these options and shapes) and captures
        row[f"{mode}_build_s"] = time.perf_counter() - t0
        flash_len = flash.length

        def graphed_step():
            nonlocal nxt
            nxt = dec.step(nxt[:, 0]).argmax(-1, keepdim=True)

        graphed_step()
        row[f"{mode}_ms_per_token"] = timer.ms(graphed_step, steps - 1)
        if profile_dir is not None:
            row[f"{mode}_profile"] = profile_steps(profile_dir, f"{tag}_{mode}", graphed_step)
        del dec
    profiled = sum(f"{m}_profile" in row for m in modes) * PROFILE_STEPS  # steps that were not timed
    mid = (start + kv.seen_tokens - profiled) // 2 + 1  # filled slots of a global layer halfway through
    row["bytes_per_token"], row["floor_bytes_per_token"] = bytes_per_token(model, kv, ms, mid, path,
                                                                           flash_len if path == "sdpa_flash" else 0)
    return row


def card_bandwidth(arg: float, device: torch.device) -> float | None:
    if arg:
        return arg
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    tb = hbm_tb_per_s(name)
    if tb is None:
        raise SystemExit(f"unknown HBM bandwidth for {name!r}; pass --hbm-tb-per-s (the card's TB/s)")
    return tb


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="")
    ap.add_argument("--contexts", default="")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--decode-attention", default="all_slots,filled_blocks",
                    help="comma-separated decode attention paths, each measured in turn")
    ap.add_argument("--twin-flash", action="store_true",
                    help="also time the Transformer twin with SDPA's flash kernel over a fixed length (sdpa_flash)")
    ap.add_argument("--no-twin", action="store_true", help="the preset alone (a profile, say): no twin, no ratios")
    ap.add_argument("--modes", default="tuned_graph,combo_graph", help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--inductor-options", default="",
                    help='JSON Inductor options for tuned_graph instead of coordinate-descent tuning alone, e.g. '
                         '\'{"coordinate_descent_tuning": true, "combo_kernels": true}\'')
    ap.add_argument("--decode-kernel-options", default="",
                    help="JSON FlexAttention kernel options for the filled_blocks decoding kernel, every mode of the "
                         'run, e.g. \'{"SPLIT_KV": 8}\' (default: FlexAttention\'s own choice)')
    ap.add_argument("--max-slots-per-split", type=int, default=0,
                    help="cache slots one program of the filled_blocks decoding kernel streams at most, per row and "
                         "kv head (default: the backend's MAX_SLOTS_PER_SPLIT)")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--hbm-tb-per-s", type=float, default=0.0, help="the card's HBM bandwidth (default: by name)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, debug preset, tiny shapes: check the script")
    ap.add_argument("--commit", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", default="", help="directory for a kernel profile of each graphed case")
    a = ap.parse_args()
    dry = a.dry_run
    a.preset = a.preset or ("debug" if dry else "1b")
    a.contexts = [int(c) for c in (a.contexts or ("200" if dry else "4096,32640")).split(",")]
    a.batches = [int(b) for b in (a.batches or ("1,2" if dry else "1,8,32")).split(",")]
    a.steps = a.steps or (4 if dry else 32)
    a.modes = a.modes.split(",")
    a.paths = a.decode_attention.split(",")
    bad = [m for m in a.modes if m not in MODES] + [p for p in a.paths if p not in ("all_slots", "filled_blocks")]
    if bad:
        raise SystemExit(f"unknown mode or decode attention path {bad}: modes {MODES}, paths all_slots, filled_blocks")
    a.inductor_options = json_object("--inductor-options", a.inductor_options, '{"coordinate_descent_tuning": true}')
    a.decode_kernel_options = json_object("--decode-kernel-options", a.decode_kernel_options, '{"SPLIT_KV": 4}')
    if a.max_slots_per_split < 0:
        raise SystemExit(f"--max-slots-per-split {a.max_slots_per_split}: give a positive slot count, such as 1024")
    a.out = a.out or str(ROOT / f"benchmarks/results/decode_gpu{'_dry_run' if dry else ''}.json")
    return a


def json_object(flag: str, text: str, example: str) -> dict | None:
    """The JSON object a flag was given (None for an empty flag), or a one-line exit."""
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag} is not valid JSON ({e}); pass an object such as '{example}'") from None
    if value is not None and not isinstance(value, dict):
        raise SystemExit(f"{flag} must be a JSON object such as '{example}', got {text!r}")
    return value


def print_table(rows: list[dict], preset: str, batches: list[int]) -> None:
    twin_name = f"transformer-{preset}"
    ok = [r for r in rows if "error" not in r]

    def best_ms(r):
        return r["batch"] * 1e3 / r["tokens_per_s"]

    def find(model, path, c, b):
        return next((r for r in ok if (r["model"], r["decode_attention"], r["context"], r["batch"]) ==
                     (model, path, c, b)), None)

    print("| model | decode attention | context | batch | prefill ms (batch 1) | eager ms | graph ms | "
          "compiled + graph ms | packed ms | packed + max-autotune ms | packed + tuned ms | tuned + combo ms | tokens/s | MB read/token (floor) | HBM | cache MiB | speed vs twin, same path "
          "| cache vs twin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['model']} | {r['decode_attention']} | {r['context']} | {r['batch']} |"
        if "error" in r:
            print(f"{head} {r['error']} |" + " |" * 13)
            continue
        twin = find(twin_name, r["decode_attention"], r["context"], r["batch"]) if r["model"] == preset else None
        cells = [f"{r['prefill_ms_batch1']:.0f}"] + [
            f"{r[f'{m}_ms_per_token']:.2f}" if f"{m}_ms_per_token" in r else "-" for m in MODES]
        cells += [f"{r['tokens_per_s']:.0f}",
                  f"{r['bytes_per_token'] / 1e6:.0f} ({r['floor_bytes_per_token'] / 1e6:.0f})",
                  "-" if r["hbm_fraction"] is None else f"{100 * r['hbm_fraction']:.0f}%",
                  f"{r['cache_bytes'] / 2**20:.1f}",
                  f"{best_ms(twin) / best_ms(r):.2f}x" if twin else "",
                  f"{twin['cache_bytes'] / r['cache_bytes']:.1f}x smaller" if twin else ""]
        print(f"{head} {' | '.join(cells)} |")
    print("\nBest path against best path (each model's fastest decode attention):")
    for c in sorted({r["context"] for r in ok}):
        for b in batches:
            mine = [r for r in ok if r["model"] == preset and (r["context"], r["batch"]) == (c, b)]
            theirs = [r for r in ok if r["model"] == twin_name and (r["context"], r["batch"]) == (c, b)]
            if mine and theirs:
                m, t = min(mine, key=best_ms), min(theirs, key=best_ms)
                print(f"  context {c}, batch {b}: {preset} {best_ms(m):.2f} ms ({m['decode_attention']}), "
                      f"{twin_name} {best_ms(t):.2f} ms ({t['decode_attention']}): {best_ms(t) / best_ms(m):.2f}x; "
                      f"bytes per step {t['bytes_per_token'] / m['bytes_per_token']:.2f}x (the ratio at equal "
                      "bandwidth efficiency)")
    hi, lo = max(batches), min(batches)
    print(f"\nTokens/s at batch {hi} over batch {lo}:")
    for r in ok:
        if r["batch"] == hi and (one := find(r["model"], r["decode_attention"], r["context"], lo)):
            print(f"  {r['model']} {r['decode_attention']} context {r['context']}: "
                  f"{r['tokens_per_s'] / one['tokens_per_s']:.1f}x")


def main() -> None:
    a = parse_args()
    if a.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        raise SystemExit("decode_gpu.py measures GPU decoding; no CUDA device is visible (--dry-run checks it on CPU)")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    hbm = card_bandwidth(a.hbm_tb_per_s, device)
    if a.inductor_options is not None:
        MODE_OPTIONS["tuned_graph"] = a.inductor_options
    if a.decode_kernel_options is not None:
        decode_backend.DECODE_KERNEL_OPTIONS.update(a.decode_kernel_options)
    if a.max_slots_per_split:
        decode_backend.MAX_SLOTS_PER_SPLIT = a.max_slots_per_split
    timer, flash = Timer(device), FlashFixedLength()
    cases = [(a.preset, p) for p in a.paths]
    if not a.no_twin:
        cases += [(f"transformer-{a.preset}", p) for p in a.paths]
    if a.twin_flash:
        cases.append((f"transformer-{a.preset}", "sdpa_flash"))
    rows = []
    for name, path in cases:
        model = build(name, path, device, dtype, flash)
        need = cache_length(max(a.contexts), a.modes, a.steps, bool(a.profile))
        if need > model.cfg.max_seq_len:
            raise SystemExit(f"context {max(a.contexts)} and its decode steps need {need} positions, over {name}'s "
                             f"max_seq_len {model.cfg.max_seq_len}; lower --contexts or --steps")
        for c in a.contexts:
            for r in measure_context(model, path, c, a.batches, a.modes, a.steps, timer, flash, hbm,
                                     graph=not a.dry_run, profile_dir=Path(a.profile) if a.profile else None,
                                     name=name):
                r = {"model": name, "params": count_params(model.cfg), "decode_attention": path,
                     "kernels": model.kernels.describe(), **r}
                rows.append(r)
                print(json.dumps(r), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: not a measurement)"
    print(f"\ncard: {card}  torch {torch.__version__}  HBM {hbm or '-'} TB/s  steps {a.steps}  modes {a.modes}")
    print_table(rows, a.preset, a.batches)
    meta = {"card": card, "torch": torch.__version__, "commit": git_commit(a.commit), "command": " ".join(sys.argv),
            "hbm_tb_per_s": hbm, "dry_run": a.dry_run}
    print(f"wrote {write_results(a.out, meta, rows=rows)}")


if __name__ == "__main__":
    main()
