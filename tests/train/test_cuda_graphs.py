"""The parts of the per-block CUDA graphs that run without a GPU: blocks called on aliases of
their parameters, and which blocks may be graphed. The captures themselves are tested on a GPU
(tests/ops/test_gpu_backends.py, tests/train/test_train_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fusiontree.models.cache import SeqInfo
from fusiontree.models.hybrid import positions_from_seq_idx
import functools

from fusiontree.train.cuda_graphs import block_call_on_aliases, trainable
from fusiontree.train.mechanics import (apply_activation_checkpointing, apply_compile, apply_cuda_graphs,
                                        block_mechanics, describe_mechanics)
from tests.models.conftest import build


@pytest.mark.parametrize("compiled", [False, True])
def test_a_block_on_parameter_aliases_computes_the_block_and_its_parameter_gradients(compiled):
    """Outputs equal the block's own; gradients with respect to the aliases equal those of the
    parameters; the parameters' gradient hooks (DeepSpeed hangs its reductions there) do not
    fire and their .grad stays empty: the aliases' autograd graph is separate."""
    model = build("parallel-token", n_layers=2, attn_pattern="LG").train()
    if compiled:
        # Dynamo and AOTAutograd decide what the aliases are to the compiled graph; Inductor's
        # code generation (a minute of C++ here) is tested by tests/models/test_compile.py.
        apply_compile(model, backend="aot_eager")
    block = model.layers[0]
    call = functools.partial(block_mechanics(block).forward, block)  # what the graphs run
    seq = torch.tensor([[0] * 30 + [1] * 47, [0] * 77])
    pos = positions_from_seq_idx(seq)
    info = SeqInfo(position_ids=pos, key_pos=pos, seq_idx=seq)
    x = torch.randn(2, 77, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    fired = []
    for _, p in trainable(block):
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))

    x_a = x.clone().requires_grad_(True)
    outs, aliases = block_call_on_aliases(block, call, x_a, info)
    assert len(outs) == 2  # x and the per-token gate
    grads = torch.autograd.grad([o.float().pow(2).mean() for o in outs], (x_a,) + aliases)
    assert not fired and all(p.grad is None for _, p in trainable(block))

    x_p = x.clone().requires_grad_(True)
    ref = call(x_p, info)
    sum(o.float().pow(2).mean() for o in ref).backward()
    assert len(fired) == len(aliases)
    torch.testing.assert_close(outs[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], x_p.grad, rtol=1e-6, atol=1e-7)
    for (name, p), g in zip(trainable(block), grads[1:]):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        assert g.data_ptr() != p.data_ptr()


def test_cuda_graphs_cover_the_blocks_that_keep_their_activations():
    model = build("parallel-channel", n_layers=4, attn_pattern="LLLG")
    graphs = apply_cuda_graphs(model)
    assert len(graphs.blocks) == 4 and describe_mechanics(model).endswith("CUDA graphs 4/4")
    with pytest.raises(ValueError, match="apply the graphs last"):
        apply_compile(model)
    with pytest.raises(ValueError, match="apply the graphs last"):
        apply_activation_checkpointing(model, 3)
    model = apply_activation_checkpointing(build("parallel-channel", n_layers=4, attn_pattern="LLLG"), 3)
    graphs = apply_cuda_graphs(model)
    assert graphs.blocks == [model.layers[3]] and describe_mechanics(model).endswith("CUDA graphs 1/4")
    model = apply_activation_checkpointing(build("parallel-channel", n_layers=4, attn_pattern="LLLG"), 0)
    with pytest.raises(ValueError, match="keep their activations"):
        apply_cuda_graphs(model)
