"""Decode steps replayed from one captured CUDA graph.

Legend: B batch, V vocabulary.

At batch 1 an eager decode step is bound by the host: every layer launches tens of small
kernels from Python. `GraphedDecoder` captures `HybridLanguageModel.decode_step` once (its
shapes are static and it never syncs with the host), then each token costs one graph replay.
The token counter and the positions live on the device and advance inside the graph; the
host keeps `seen_tokens` of both caches in step without reading the device.

`graph=False` runs the same static step eagerly (the CPU path, and the reference that the
GPU test compares the replay against). `compile=True` compiles each block of the step first
(`HybridLanguageModel.compile_decode`), so that the graph replays fewer, fused kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusiontree.models.cache import KVCache, MambaStates


# Inductor options of the compiled decode step unless a mode or other options are given.
TUNED = {"coordinate_descent_tuning": True, "combo_kernels": True}


class GraphedDecoder:
    """Decode with `model.decode_step` into caches that already hold a prefix.

    next_positions_B: the position of each row's next token (for left-padded prompts, the
    number of real tokens in the row). Capturing runs the step a few times to warm up
    kernels (autotuning, workspaces) and then restores the caches, so the prefix is intact.
    pack: pack the projections that read one input into one matmul each
    (`HybridLanguageModel.pack_projections`; False unpacks them). On by default: on an H200 it
    took a token of `1b` at 32K from 2.68 to 2.40 ms and of `small` at 4K from 1.38 to 1.21 ms.
    The first packing moves the weights into one buffer per module, so a graph captured before
    it with pack=False reads their old storage: capture unpacked graphs after packed ones.
    compile_mode: torch.compile's mode for the compiled blocks (None: none, see compile_options;
    "max-autotune-no-cudagraphs": Inductor times Triton matmul templates against cuBLAS for
    each of the step's shapes and can fuse their neighbours into them, at minutes of compile).
    compile_options: Inductor options for the compiled blocks instead of a mode. None (with no
    mode) takes `TUNED`: coordinate-descent tuning, under which Inductor turns one-row matmuls
    (batch 1) into reductions it tunes and fuses with their neighbours, and tunes every kernel's
    tiles (on an H200 it took a token of `1b` at 32K from 2.39 to 2.09 ms and of `small` at 4K
    from 1.22 to 1.06 ms), plus combo kernels, which launch a graph's independent kernels as
    one (then 2.42 to 2.04 ms and 1.03 to 0.90 ms). {} compiles with Inductor's defaults."""

    def __init__(self, model, kv: KVCache, ms: MambaStates, next_positions_B: Tensor, graph: bool = True,
                 warmup: int = 3, compile: bool = False, pack: bool = True, compile_mode: str | None = None,
                 compile_options: dict | None = None):
        if kv.seen_tokens != ms.seen_tokens:
            raise ValueError(f"the caches disagree: KV cache {kv.seen_tokens} tokens, Mamba states "
                             f"{ms.seen_tokens}; pass the pair returned by the same prefill")
        dev = model.embed.weight.device
        if graph and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {dev}; "
                             "pass graph=False to run the static decode step eagerly")
        B = kv.batch_size
        if tuple(next_positions_B.shape) != (B,):
            raise ValueError(f"next_positions_B must have shape ({B},), got {tuple(next_positions_B.shape)}")
        self.model, self.kv, self.ms, self.graph = model, kv, ms, None
        self.tokens_B1 = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos_B1 = next_positions_B.to(device=dev, dtype=torch.long).reshape(B, 1).clone()
        self.step_1 = torch.full((1,), kv.seen_tokens, dtype=torch.long, device=dev)
        self.compiled = compile
        self.packed_modules = model.pack_projections(pack)  # how many modules project packed
        if compile_mode and compile_options:
            raise ValueError("torch.compile takes a mode or Inductor options, not both; pass compile_mode "
                             "or compile_options")
        if compile_options is None and not compile_mode:
            compile_options = TUNED
        options = {"mode": compile_mode} if compile_mode else {}
        if compile_options:
            options["options"] = dict(compile_options)
        if compile and (model._compiled_decode is None or model.decode_options != options):
            model.compile_decode(**options)
        if graph:
            self.graph, self.logits_BV = self._capture(warmup)

    def _run(self) -> Tensor:
        logits = self.model.decode_step(self.tokens_B1, self.pos_B1, self.step_1, self.kv, self.ms,
                                        compiled=self.compiled)
        self.step_1.add_(1)
        self.pos_B1.add_(1)
        return logits

    def _capture(self, warmup: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Everything the warm-up steps advance: restored before the first real step.
        state = self.kv.tensors() + self.ms.tensors() + [self.step_1, self.pos_B1]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._run()  # recorded, not run
        for t, s in zip(state, saved):
            t.copy_(s)
        return graph, logits

    @torch.no_grad()
    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed one token per row; returns the logits [B, V] of the next one (a buffer that the
        next call overwrites when graphed: copy it to keep it)."""
        if self.kv.seen_tokens + 1 > self.kv.max_length:
            raise ValueError(f"the caches were allocated for {self.kv.max_length} tokens and hold "
                             f"{self.kv.seen_tokens}; allocate them with a larger max_length")
        self.tokens_B1.copy_(tokens_B.reshape(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits_BV
        else:
            logits = self._run()
        self.kv.seen_tokens += 1
        self.ms.seen_tokens += 1
        return logits
