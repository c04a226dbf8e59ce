"""Per-block CUDA graphs of the training forward and backward.

Legend: B batch, T time, D model width.

A training step launches a few hundred kernels per block, and some of them cost far more host
time than GPU time: mamba-ssm's chunked scan spends about 1 ms of Python per call in the
forward and 4 in the backward, against a fraction of that on the GPU. With a small model or a
small micro-batch the GPU then waits for the host. `BlockGraphs` captures the forward and the
backward of a run of blocks as CUDA graphs, once per input shape, and replays them: the host
then launches two graphs per block per micro-batch, whatever the blocks contain (compiled
Inductor kernels, the SSD and FlexAttention kernels, matmuls).

How it fits autograd and the optimizer: each block becomes one autograd node. Its forward
copies the input into the graph's static input (unless it is already there: block i+1 reads
block i's static output in place) and replays the forward graph; its backward copies the
incoming gradients into the static gradient buffers and replays the backward graph, which
writes the gradient of the input and of every parameter. Parameter gradients are handed to
autograd as copies, so `AccumulateGrad` (and the hooks DeepSpeed hangs on it) run as usual and
gradient accumulation over micro-batches adds, never aliases the graph's buffers.

What a graph may not do, and how the capture honours it: no host synchronisation and no
allocation outside the graph's memory pool, so everything that compiles or autotunes (Inductor,
FlexAttention, mamba-ssm's Triton autotuner) runs in warm-up iterations on a side stream
first; no Python-side decisions on data, so the per-forward attention masks are built by a
graph of their own (`masks_fn`) from the static positions and documents, replayed before the
blocks. Parameters must keep their storage after capture (build the graphs after DeepSpeed has
flattened them: the first training forward does). Inside warm-up and capture a block runs on
fresh leaf aliases of its parameters (same storage, `block_call_on_aliases`), never on the
parameters themselves: a parameter's gradient accumulator lives as long as the hooks on it
(DeepSpeed keeps one per parameter) and belongs to the stream it was made on, and a backward
that reached it from the capture stream would synchronise with that stream and invalidate
the capture.

Only cache-free training forwards with gradients use the graphs; evaluation, decoding and a
forward of another shape take the blocks' ordinary path (a new training shape, as at a
curriculum stage change, is captured anew and the old graphs are freed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fusiontree.models.cache import SeqInfo

log = logging.getLogger(__name__)


@dataclass
class _BlockGraph:
    """Static buffers and graphs of one block at one input shape."""
    params: tuple[nn.Parameter, ...]
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    static_in: Tensor  # [B, T, D], requires grad
    static_out: tuple[Tensor, ...]  # x [B, T, D], then the gate when the block has one
    static_grad_out: tuple[Tensor, ...]  # gradients of static_out, written before a backward replay
    static_grad_in: tuple[Tensor | None, ...]  # gradient of static_in, then of each parameter


class _Replay(torch.autograd.Function):
    """One block as one autograd node that replays its captured graphs."""

    @staticmethod
    def forward(ctx, entry: _BlockGraph, x_BTD: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        if x_BTD.data_ptr() != entry.static_in.data_ptr():
            entry.static_in.copy_(x_BTD)
        entry.fwd.replay()
        ctx.entry = entry
        return tuple(o.detach() for o in entry.static_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        entry: _BlockGraph = ctx.entry
        for buf, g in zip(entry.static_grad_out, grads):
            if g is None:
                buf.zero_()
            elif g.data_ptr() != buf.data_ptr():
                buf.copy_(g)
        entry.bwd.replay()
        grad_x, *grad_params = entry.static_grad_in
        # The input gradient goes straight to the previous block's node, which copies it (or
        # finds it already in place) before anything replays again. Parameter gradients are
        # copied: autograd may keep the tensor it is given as `.grad`.
        return (None, grad_x, *(None if g is None else g.clone() for g in grad_params))


def _outputs(result: tuple[Tensor, Tensor | None]) -> tuple[Tensor, ...]:
    x, g = result
    return (x,) if g is None else (x, g)


def trainable(block: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in block.named_parameters() if p.requires_grad]


def block_call_on_aliases(block: nn.Module, call: Callable, x_BTD: Tensor, info: SeqInfo,
                          ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run `call` (the block or its compiled forward) with each trainable parameter of `block`
    replaced by a new leaf that shares its storage. Returns (outputs, aliases): gradients taken
    with respect to the aliases are the parameters' gradients, and reach none of the
    parameters' own autograd nodes."""
    from torch.nn.utils.stateless import _reparametrize_module

    aliases = {n: p.detach().requires_grad_(True) for n, p in trainable(block)}
    with _reparametrize_module(block, aliases):
        outs = _outputs(call(x_BTD, info))
    return outs, tuple(aliases.values())


class BlockGraphs:
    """CUDA graphs for a run of consecutive blocks of a model's training forward.

    blocks:   the block modules (their parameters are the graphs' parameter inputs)
    calls:    what runs each block, `call(x_BTD, info) -> (x_BTD, gate or None)`: the block
              itself or its compiled forward
    masks_fn: `Kernels.attention_masks` (or None): rebuilt inside a graph every forward
    windows:  the attention windows of the blocks (what `masks_fn` builds masks for)
    """

    def __init__(self, blocks: Sequence[nn.Module], calls: Sequence[Callable], masks_fn: Callable | None,
                 windows: set, warmup_iters: int = 2):
        assert len(blocks) == len(calls) and blocks
        self.blocks, self.calls = list(blocks), list(calls)
        self.masks_fn, self.windows = masks_fn, windows
        self.warmup_iters = warmup_iters
        self.key: tuple | None = None
        self.entries: list[_BlockGraph] = []
        self.captures = 0  # how many shapes were captured (for logs and tests)

    @staticmethod
    def applies(x_BTD: Tensor, info: SeqInfo) -> bool:
        """A cache-free training forward with gradients, on CUDA, without padding."""
        return (x_BTD.is_cuda and torch.is_grad_enabled() and not info.cached and info.token_mask is None
                and info.cache_step is None and info.cache_offset == 0 and info.key_pos is info.position_ids)

    def _shape_key(self, x_BTD: Tensor, info: SeqInfo) -> tuple:
        seq = info.seq_idx
        return (tuple(x_BTD.shape), x_BTD.dtype, info.position_ids.dtype,
                None if seq is None else seq.dtype)

    def run_block(self, i: int, x_BTD: Tensor, info: SeqInfo) -> tuple[Tensor, Tensor | None]:
        """Block i's output and gate, by graph replay. The first graphed block of a forward
        captures a new shape first, copies the positions and documents into the graphs' static
        inputs and replays the masks' graph; the blocks after it read the same static inputs
        (a forward runs its blocks in order, all with one `info`)."""
        if i == 0:
            key = self._shape_key(x_BTD, info)
            if key != self.key:
                self._capture(x_BTD, info, key)
            self.static_pos.copy_(info.position_ids)
            if self.static_seq is not None:
                self.static_seq.copy_(info.seq_idx)
            if self.masks_graph is not None:
                self.masks_graph.replay()
        entry = self.entries[i]
        outs = _Replay.apply(entry, x_BTD, *entry.params)
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def _static_info(self) -> SeqInfo:
        return SeqInfo(position_ids=self.static_pos, key_pos=self.static_pos, seq_idx=self.static_seq,
                       attn_masks=self.static_masks)

    def _build_masks(self):
        if self.masks_fn is None or not self.windows:
            return None
        return self.masks_fn(self.static_pos, self.static_pos, self.static_seq, self.static_seq, self.windows)

    def _capture(self, x_BTD: Tensor, info: SeqInfo, key: tuple) -> None:
        t0 = time.perf_counter()
        self.entries, self.masks_graph, self.static_masks = [], None, None
        self.key = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the previous shape's graphs and pool are gone
        self.static_pos = info.position_ids.detach().clone()
        self.static_seq = None if info.seq_idx is None else info.seq_idx.detach().clone()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())

        # Masks: built once eagerly (compiles the mask builder), then captured.
        with torch.cuda.stream(side):
            self.static_masks = self._build_masks()
        torch.cuda.current_stream().wait_stream(side)
        if self.static_masks is not None:
            self.masks_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.masks_graph, pool=pool, capture_error_mode="thread_local"):
                self.static_masks = self._build_masks()
        sinfo = self._static_info()

        # Warm-up: every block forward and backward on the side stream, so that compilation,
        # autotuning and lazy initialisation happen outside the captures.
        x_in = x_BTD.detach().clone().requires_grad_(True)
        with torch.cuda.stream(side):
            for block, call in zip(self.blocks, self.calls):
                for _ in range(self.warmup_iters):
                    outs, aliases = block_call_on_aliases(block, call, x_in, sinfo)
                    torch.autograd.grad(outs, (x_in,) + aliases, [torch.ones_like(o) for o in outs],
                                        allow_unused=True)
                x_in = outs[0].detach().requires_grad_(True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        # Forward graphs in run order; block i + 1 reads block i's static output in place.
        fwd = []
        x_in = x_BTD.detach().clone().requires_grad_(True)
        for block, call in zip(self.blocks, self.calls):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                outs, aliases = block_call_on_aliases(block, call, x_in, sinfo)
            params = tuple(p for _, p in trainable(block))
            fwd.append((graph, x_in, outs, params, aliases))
            x_in = outs[0].detach().requires_grad_(True)

        # Backward graphs in reverse order; block i's output gradient buffer is block i + 1's
        # input gradient, so the chain needs no copies either.
        entries: list[_BlockGraph] = []
        next_grad_in: Tensor | None = None
        for graph, x_in, outs, params, aliases in reversed(fwd):
            grad_out = tuple(torch.zeros_like(o) for o in outs)
            if next_grad_in is not None:
                grad_out = (next_grad_in,) + grad_out[1:]
            bwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bwd, pool=pool, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(outs, (x_in,) + aliases, grad_out, allow_unused=True)
            entries.append(_BlockGraph(params=params, fwd=graph, bwd=bwd, static_in=x_in,
                                       static_out=tuple(outs), static_grad_out=grad_out,
                                       static_grad_in=tuple(grads)))
            next_grad_in = grads[0]
        self.entries = entries[::-1]
        torch.cuda.synchronize()
        self.key = key
        self.captures += 1
        log.info("cuda graphs: captured %d blocks for input %s in %.1f s", len(self.entries),
                 tuple(x_BTD.shape), time.perf_counter() - t0)
