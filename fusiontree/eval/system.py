"""System metrics of a model: peak memory, prefill and decode tokens/s, training throughput.

Legend: B batch, T tokens.

    measure_system(model, contexts=[512, 2048], batch_size=1, decode_steps=32)
    training_throughput(model_cfg, seq_len=512, micro_batch=4, steps=5)

On CUDA, times are taken after `torch.cuda.synchronize()` and peak memory is the
allocator's `max_memory_allocated` over each phase (reset before it). On CPU there is no
allocator counter: peak memory is the growth of the process's resident set over the phase,
sampled every millisecond by a background thread (short spikes between samples are missed,
and memory the allocator keeps from an earlier phase is not counted again); the exact
sizes of the weights and of the inference caches are reported beside it.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """Peak memory over a `with` block: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.delta_bytes = self.peak_bytes - base
            return
        base = _rss_bytes()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                stop.wait(0.001)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            peak[0] = max(peak[0], _rss_bytes())
            self.peak_bytes = peak[0]
            self.delta_bytes = peak[0] - base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: timings must include the queued kernels


def _mib(n: int) -> float:
    return n / 2**20


DECODE_MODES = ("eager", "static", "cuda_graph", "compiled_cuda_graph")


@dataclass
class SystemOptions:
    contexts: list[int] = field(default_factory=lambda: [512, 2048])
    batch: int = 1
    decode_steps: int = 32
    # eager | static | cuda_graph | compiled_cuda_graph: how decode steps run (`measure_system`)
    decode_mode: str = "eager"
    train: bool = True  # also measure training throughput
    train_seq_len: int = 512
    train_micro_batch: int = 4
    train_steps: int = 4

    def validate(self) -> None:
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"system.decode_mode={self.decode_mode!r}; choose one of {DECODE_MODES}")


def _decode_fn(model, kv, ms, context: int, mode: str):
    """One greedy decode step [B, 1] -> [B, 1] with the caches, by `mode` (see measure_system);
    building a graphed decoder captures it (its warm-up steps restore the caches)."""
    if mode == "eager":
        return lambda nxt_B1: model(nxt_B1, past_key_values=kv, past_mamba_states=ms).logits[:, -1:].argmax(-1)
    from fusiontree.inference.cuda_graph import GraphedDecoder

    device = next(model.parameters()).device
    dec = GraphedDecoder(model, kv, ms, torch.full((kv.batch_size,), context, device=device),
                         graph=mode != "static", compile=mode == "compiled_cuda_graph")
    return lambda nxt_B1: dec.step(nxt_B1[:, 0]).argmax(-1, keepdim=True)


@torch.no_grad()
def measure_system(model, contexts: list[int], batch_size: int = 1, decode_steps: int = 32,
                   repeats: int = 1, seed: int = 0, decode_mode: str = "eager") -> dict:
    """For each context length: prefill a random prompt of B x context tokens into fresh
    caches (tokens/s, peak memory), then decode `decode_steps` tokens greedily one at a time
    (median per-step time -> tokens/s over the batch, peak memory).

    decode_mode: `eager` (the cached forward), `static` (`HybridLanguageModel.decode_step`
    run eagerly), `cuda_graph` (that step replayed from a CUDA graph, `GraphedDecoder`; CUDA
    only) or `compiled_cuda_graph` (its blocks compiled first)."""
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode={decode_mode!r}; choose one of {DECODE_MODES}")
    device = next(model.parameters()).device
    cfg = model.cfg
    was_training = model.training
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prefill, decode = [], []
    g = torch.Generator().manual_seed(seed)
    for L in contexts:
        if L + decode_steps > cfg.max_seq_len:
            raise ValueError(f"context {L} + {decode_steps} decode steps exceeds max_seq_len={cfg.max_seq_len}")
        prompt_BT = torch.randint(0, cfg.vocab_size, (batch_size, L), generator=g).to(device)
        # warm-up at this shape (kernel selection, allocator growth), not timed
        kv, ms = model.allocate_inference_cache(batch_size, L + decode_steps + 1)
        model(prompt_BT, past_key_values=kv, past_mamba_states=ms)
        times = []
        mem = PeakMemory(device)
        for _ in range(max(1, repeats)):
            kv, ms = model.allocate_inference_cache(batch_size, L + decode_steps + 1)
            with mem.measure():
                _sync(device)
                t0 = time.perf_counter()
                out = model(prompt_BT, past_key_values=kv, past_mamba_states=ms)
                _sync(device)
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        cache_bytes = kv.nbytes() + ms.nbytes()
        prefill.append({"context": L, "batch": batch_size, "seconds": t, "tokens_per_s": batch_size * L / t,
                        "peak_mib": _mib(mem.peak_bytes), "phase_growth_mib": _mib(mem.delta_bytes),
                        "cache_mib": _mib(cache_bytes)})
        nxt_B1 = out.logits[:, -1:].argmax(-1)
        step_times = []
        mem = PeakMemory(device)
        with mem.measure():
            step = _decode_fn(model, kv, ms, L, decode_mode)
            for _ in range(decode_steps):
                _sync(device)
                t0 = time.perf_counter()
                nxt_B1 = step(nxt_B1)
                _sync(device)
                step_times.append(time.perf_counter() - t0)
        step_s = statistics.median(step_times[1:] or step_times)  # the first step may warm up
        decode.append({"context": L, "batch": batch_size, "mode": decode_mode, "ms_per_step": step_s * 1e3,
                       "tokens_per_s": batch_size / step_s, "peak_mib": _mib(mem.peak_bytes),
                       "phase_growth_mib": _mib(mem.delta_bytes), "cache_mib": _mib(cache_bytes)})
    model.train(was_training)
    return {"device": _device_name(device), "kernels": model.kernels.describe(), "params": params,
            "weights_mib": _mib(weight_bytes), "dtype": str(next(model.parameters()).dtype),
            "threads": torch.get_num_threads(), "memory_kind": _memory_kind(device),
            "prefill": prefill, "decode": decode}


def training_throughput(model_cfg, seq_len: int, micro_batch: int, steps: int = 5,
                        device: str | torch.device = "cpu", precision: str = "auto", kernels=None,
                        seed: int = 0) -> dict:
    """Tokens/s of forward + backward + AdamW steps on random tokens at `seq_len`, for a
    freshly built model of `model_cfg` (one process, no DeepSpeed: the model's own speed).
    precision: fp32, bf16 (autocast) or auto (bf16 on CUDA, fp32 on CPU)."""
    from fusiontree.config import KernelConfig, LossConfig
    from fusiontree.models import HybridLanguageModel
    from fusiontree.models.flops import flops_per_token
    from fusiontree.ops import resolve_kernels
    from fusiontree.train.losses import HybridModelLoss

    if steps < 2:
        raise ValueError(f"steps={steps}: need >= 2 (the first step warms up and is not timed)")
    device = torch.device(device)
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model max_seq_len={model_cfg.max_seq_len}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    torch.manual_seed(seed)
    kern = kernels if kernels is not None else resolve_kernels(KernelConfig(), device)
    model = HybridLanguageModel(model_cfg, kern).to(device).train()
    model.check_inputs = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = HybridModelLoss(LossConfig())
    ids_BT = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len), device=device)
    times = []
    mem = PeakMemory(device)
    with mem.measure():
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(ids_BT)
            loss, _ = loss_fn(out.logits, ids_BT, out.gates)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times[1:])
    tps = micro_batch * seq_len / t
    return {"device": _device_name(device), "kernels": kern.describe(), "precision": "bf16" if bf16 else "fp32",
            "seq_len": seq_len, "micro_batch": micro_batch, "step_s": t, "tokens_per_s": tps,
            "model_tflops": tps * flops_per_token(model_cfg, seq_len) / 1e12,
            "peak_mib": _mib(mem.peak_bytes), "phase_growth_mib": _mib(mem.delta_bytes),
            "memory_kind": _memory_kind(device), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "process RSS (sampled)"


def system_markdown(s: dict) -> str:
    lines = [f"System ({s['device']}, kernels {s['kernels']}, {s['params'] / 1e6:.2f}M parameters, "
             f"weights {s['weights_mib']:.1f} MiB, memory = {s['memory_kind']}):", "",
             "| context | batch | prefill tok/s | prefill peak MiB | decode | decode tok/s | decode ms/step "
             "| cache MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for p, d in zip(s["prefill"], s["decode"]):
        lines.append(f"| {p['context']} | {p['batch']} | {p['tokens_per_s']:.0f} | {p['peak_mib']:.0f} | "
                     f"{d.get('mode', 'eager')} | {d['tokens_per_s']:.1f} | {d['ms_per_step']:.2f} | "
                     f"{p['cache_mib']:.2f} |")
    if s.get("train"):
        t = s["train"]
        lines += ["", f"Training ({t['precision']}, seq {t['seq_len']} x micro-batch {t['micro_batch']}): "
                  f"{t['tokens_per_s']:.0f} tokens/s, {t['model_tflops']:.3f} model TFLOP/s, "
                  f"peak {t['peak_mib']:.0f} MiB"]
    return "\n".join(lines)


def run_system(model, opts: SystemOptions) -> dict:
    """The `system` task: `measure_system` at the contexts that fit the model, and the training
    throughput of a fresh model of its config unless `opts.train` is false."""
    max_len = model.cfg.max_seq_len
    ctxs = [L for L in opts.contexts if L + opts.decode_steps <= max_len]
    if not ctxs:
        raise ValueError(f"every system context {opts.contexts} (+ decode steps) exceeds max_seq_len={max_len}")
    res = measure_system(model, ctxs, opts.batch, opts.decode_steps, decode_mode=opts.decode_mode)
    if opts.train:
        res["train"] = training_throughput(model.cfg, min(opts.train_seq_len, max_len), opts.train_micro_batch,
                                           opts.train_steps, next(model.parameters()).device, kernels=model.kernels)
    return res
