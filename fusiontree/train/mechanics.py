"""Training mechanics, applied to a built model from outside like `parallelize`: compiled blocks
and activation checkpointing (the pattern of torchtitan's `apply_compile` / `apply_ac`).

    model = HybridLanguageModel(cfg.model, kernels)      # the plain single-device model
    model = parallelize(model, cfg.parallel)             # tensor / sequence parallel shares
    apply_compile(model)                                 # train.compile
    apply_activation_checkpointing(model, cfg.train.checkpoint_num_layers)

Each mechanic changes how a block runs a cache-free call (training, evaluation, a prefill
without a cache): the block's `forward` becomes an instance attribute that dispatches on the
call, so the class, the parameters and their names (state dicts, checkpoints) stay those of
the plain model. Calls that read or write caches (`SeqInfo.cached`: prefill and decode with
caches, the static decode step) always run the block's own eager forward, since they update
the caches in place.

Order: `parallelize` first (it swaps the blocks' classes, whose forward the mechanics then
wrap), `apply_compile` before `apply_activation_checkpointing` (the recomputation wraps the
compiled block, so the backward recomputes through the compiled graph rather than compiling
the recomputation). Both orders are checked.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from fusiontree.ops import compile_once


@dataclass
class BlockMechanics:
    """How one block runs its cache-free calls."""
    forward: Callable  # (block, x_BTD, info) -> (x_BTD, gate): the class forward, or it compiled
    compiled: bool = False
    recompute: bool = False  # activation checkpointing: recompute the block in the backward


def _dispatch(block: nn.Module, x_BTD: Tensor, info, attn_cache=None, mamba_state=None):
    if info.cached:
        return type(block).forward(block, x_BTD, info, attn_cache, mamba_state)
    m: BlockMechanics = block.mechanics
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
    use of each input shape, dtype and grad mode."""
    for block in model.layers:
        m = block_mechanics(block)
        if m.recompute:
            raise ValueError("apply_compile after apply_activation_checkpointing would compile the "
                             "recomputation; apply compile first")
        m.forward, m.compiled = compile_once(type(block).forward, **compile_kwargs), True
    return model


def apply_activation_checkpointing(model: nn.Module, num_layers: int = 0) -> nn.Module:
    """Recompute blocks in the backward pass instead of storing their activations: the first
    `num_layers` blocks (Megatron's "block" method: memory traded for less recomputation), or
    every block when it is 0. Only training calls with gradients recompute."""
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers} must be >= 0 (0 recomputes every block)")
    for i, block in enumerate(model.layers):
        if num_layers == 0 or i < num_layers:
            block_mechanics(block).recompute = True
    return model


def describe_mechanics(model: nn.Module) -> str:
    """One line for the log: how many blocks are compiled and recomputed."""
    ms = [vars(b).get("mechanics") for b in model.layers]
    n = len(ms)
    compiled = sum(m is not None and m.compiled for m in ms)
    recompute = sum(m is not None and m.recompute for m in ms)
    return f"compiled blocks {compiled}/{n}, activation checkpointing {recompute}/{n}"
