"""Training mechanics, applied to a built model from outside like `parallelize`: compiled blocks,
activation checkpointing (the pattern of torchtitan's `apply_compile` / `apply_ac`) and CUDA
graphs of the blocks' training forward and backward.

    model = HybridLanguageModel(cfg.model, kernels)      # the plain single-device model
    model = parallelize(model, cfg.parallel)             # tensor / sequence parallel shares
    apply_compile(model)                                 # train.compile
    apply_activation_checkpointing(model, cfg.train.checkpoint_num_layers)
    apply_cuda_graphs(model)                             # train.cuda_graphs, once the parameters
                                                         # have their final storage (after DeepSpeed)

Each mechanic changes how a block runs a cache-free call (training, evaluation, a prefill
without a cache): the block's `forward` becomes an instance attribute that dispatches on the
call, so the class, the parameters and their names (state dicts, checkpoints) stay those of
the plain model. Calls that read or write caches (`SeqInfo.cached`: prefill and decode with
caches, the static decode step) always run the block's own eager forward, since they update
the caches in place.

Order: `parallelize` first (it swaps the blocks' classes, whose forward the mechanics then
wrap), `apply_compile` before `apply_activation_checkpointing` (the recomputation wraps the
compiled block, so the backward recomputes through the compiled graph rather than compiling
the recomputation), `apply_cuda_graphs` last (the graphs replay the compiled blocks; blocks
that are recomputed stay ungraphed). The orders are checked.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from fusiontree.ops import compile_once
from fusiontree.train.cuda_graphs import BlockGraphs


@dataclass
class BlockMechanics:
    """How one block runs its cache-free calls."""
    forward: Callable  # (block, x_BTD, info) -> (x_BTD, gate): the class forward, or it compiled
    compiled: bool = False
    recompute: bool = False  # activation checkpointing: recompute the block in the backward
    graphs: BlockGraphs | None = None  # CUDA graphs of this block's training calls
    graph_index: int = 0  # this block's place among the graphed blocks


def _dispatch(block: nn.Module, x_BTD: Tensor, info, attn_cache=None, mamba_state=None):
    if info.cached:
        return type(block).forward(block, x_BTD, info, attn_cache, mamba_state)
    m: BlockMechanics = block.mechanics
    if m.graphs is not None and block.training and m.graphs.applies(x_BTD, info):
        return m.graphs.run_block(m.graph_index, x_BTD, info)
    if m.recompute and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(m.forward, block, x_BTD, info, use_reentrant=False)
    return m.forward(block, x_BTD, info)


def block_mechanics(block: nn.Module) -> BlockMechanics:
    """The block's mechanics, installing the dispatching forward on first use."""
    if "mechanics" not in vars(block):
        block.mechanics = BlockMechanics(forward=type(block).forward)
        # A method bound to this block: `copy.deepcopy` of the model rebinds it to the copy.
        block.forward = types.MethodType(_dispatch, block)
    return block.mechanics


def apply_compile(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: each block's forward goes through `torch.compile` (Inductor), which
    fuses its elementwise chains (norms and their fp32 casts, the conv1d, RoPE, the gate mix,
    SwiGLU) into a few kernels, and their backward likewise.

    The SSD and attention backends are opaque to the compiler (each is a kernel of its own,
    see `fusiontree.ops`): a block compiles into the graphs around them. Blocks of one
    structure (local, global, pruned) share one compiled graph; compilation happens on first
    use of each input shape, dtype and grad mode. Shapes are static (`dynamic=False`): with
    torch's default, the first change of length recompiled the block with symbolic shapes,
    three times the cost of a static graph on the CPU, and kernels not specialised to any one
    length."""
    for block in model.layers:
        m = block_mechanics(block)
        if m.recompute:
            raise ValueError("apply_compile after apply_activation_checkpointing would compile the "
                             "recomputation; apply compile first")
        if m.graphs is not None:
            raise ValueError("apply_compile after apply_cuda_graphs: the graphs capture the blocks as they "
                             "were; apply the graphs last")
        m.forward, m.compiled = compile_once(type(block).forward, **{"dynamic": False, **compile_kwargs}), True
    return model


# Set to 1 to run compiled blocks under tensor parallelism on CUDA anyway (for debugging it).
EXPERIMENTAL_COMPILED_TP_ENV = "FUSIONTREE_EXPERIMENTAL_COMPILED_TP"


def compiled_tensor_parallel_error(tensor_parallel: int, device_type: str, environ: Mapping[str, str]) -> str | None:
    """Why a run with compiled blocks must not start under this tensor parallelism, or None.

    On CPU (gloo) compiled TP + SP trains like one process (tests/train/test_train_e2e.py). On
    2 x H200 over NCCL it did not finish its first step in 7 minutes (BENCHMARKS.md): the
    compiled forward ran, then one rank sat in Inductor's compile of the backward graphs while
    both GPUs showed full utilisation. Until that is fixed a CUDA run stops at start-up with
    this message instead of hanging."""
    if tensor_parallel <= 1 or device_type != "cuda" or environ.get(EXPERIMENTAL_COMPILED_TP_ENV) == "1":
        return None
    return (f"train.compile=true with parallel.tensor_parallel={tensor_parallel} does not reach its first step "
            "on GPUs over NCCL yet (the compiled backward stalls); set train.compile=false for tensor "
            f"parallelism (or {EXPERIMENTAL_COMPILED_TP_ENV}=1 to run it anyway)")


def apply_activation_checkpointing(model: nn.Module, num_layers: int = 0) -> nn.Module:
    """Recompute blocks in the backward pass instead of storing their activations: the first
    `num_layers` blocks (Megatron's "block" method: memory traded for less recomputation), or
    every block when it is 0. Only training calls with gradients recompute."""
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers} must be >= 0 (0 recomputes every block)")
    if any(vars(b).get("mechanics") is not None and b.mechanics.graphs is not None for b in model.layers):
        raise ValueError("apply_activation_checkpointing after apply_cuda_graphs; apply the graphs last")
    for i, block in enumerate(model.layers):
        if num_layers == 0 or i < num_layers:
            block_mechanics(block).recompute = True
    return model


def apply_cuda_graphs(model: nn.Module) -> BlockGraphs:
    """CUDA graphs of the training forward and backward of every block that keeps its
    activations (`fusiontree.train.cuda_graphs`): the blocks from the first one that is not
    recomputed to the last, which must be contiguous. Call it after the parameters have their
    final storage (after `deepspeed.initialize`); each shape is captured at its first training
    forward."""
    blocks = list(model.layers)
    recomputed = [vars(b).get("mechanics") is not None and b.mechanics.recompute for b in blocks]
    start = next((i for i, r in enumerate(recomputed) if not r), len(blocks))
    if start == len(blocks) or any(recomputed[start:]):
        raise ValueError("CUDA graphs need a run of final blocks that keep their activations; activation "
                         f"checkpointing recomputes blocks {[i for i, r in enumerate(recomputed) if r]} of "
                         f"{len(blocks)}: checkpoint fewer (the first N) blocks")
    graphed = blocks[start:]
    mechanics = [block_mechanics(b) for b in graphed]
    calls = [functools.partial(m.forward, b) for m, b in zip(mechanics, graphed)]
    windows = {b.attn.window for b in graphed if b.attn is not None}
    graphs = BlockGraphs(graphed, calls, model.kernels.attention_masks, windows)
    for i, m in enumerate(mechanics):
        m.graphs, m.graph_index = graphs, i
    return graphs


def describe_mechanics(model: nn.Module) -> str:
    """One line for the log: how many blocks are compiled, recomputed and graphed."""
    ms = [vars(b).get("mechanics") for b in model.layers]
    n = len(ms)
    compiled = sum(m is not None and m.compiled for m in ms)
    recompute = sum(m is not None and m.recompute for m in ms)
    graphed = sum(m is not None and m.graphs is not None for m in ms)
    return f"compiled blocks {compiled}/{n}, activation checkpointing {recompute}/{n}, CUDA graphs {graphed}/{n}"
