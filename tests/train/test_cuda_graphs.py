"""The parts of the per-block CUDA graphs that run without a GPU: blocks called on aliases of
their parameters, and which blocks may be graphed. The captures themselves are tested on a GPU
(tests/ops/test_gpu_backends.py, tests/train/test_train_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fusiontree.models.cache import SeqInfo
from fusiontree.models.hybrid import positions_from_seq_idx
from fusiontree.train.cuda_graphs import block_call_on_aliases, graphable_blocks, trainable
from tests.models.conftest import build


@pytest.mark.parametrize("compiled", [False, True])
def test_a_block_on_parameter_aliases_computes_the_block_and_its_parameter_gradients(compiled):
    """Outputs equal the block's own; gradients with respect to the aliases equal those of the
    parameters; the parameters' gradient hooks (DeepSpeed hangs its reductions there) do not
    fire and their .grad stays empty: the aliases' autograd graph is separate."""
    model = build("parallel-token", n_layers=2, attn_pattern="LG").train()
    if compiled:
        model.compile_blocks()
    block = model.layers[0]
    call = model._compiled_blocks[0] if compiled else block
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


def test_graphable_blocks_are_those_that_keep_their_activations():
    model = build("parallel-channel", n_layers=4, attn_pattern="LLLG")
    assert graphable_blocks(model) == (0, 4)
    model.activation_checkpointing, model.checkpoint_num_layers = True, 3
    assert graphable_blocks(model) == (3, 4)
    for every in (0, 4):
        model.checkpoint_num_layers = every
        with pytest.raises(ValueError, match="blocks that keep their activations"):
            graphable_blocks(model)
