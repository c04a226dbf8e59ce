"""Blocks compiled with torch.compile (Inductor) compute what the eager model computes.

CPU Inductor generates C++; each compiled signature costs seconds here, so the checks share
one model per test and few input signatures.
"""

from __future__ import annotations

import copy

import torch

from fusiontree.train.mechanics import apply_compile, describe_mechanics
from tests.models.conftest import build


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_match_eager_forward_and_gradients_on_packed_rows_and_decode_through_the_eager_cache():
    """The compiled model against the eager one on packed rows (logits, gates, every gradient);
    then the compiled model's cached calls (prefill and decode steps, which run the blocks'
    eager forward) on one packed document alone give the compiled packed forward's logits for
    that document."""
    eager = build("parallel-token", n_layers=3, attn_pattern="LLG").train()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    assert describe_mechanics(compiled).startswith("compiled blocks 3/3")
    assert describe_mechanics(eager).startswith("compiled blocks 0/3")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, eager.cfg.vocab_size, (2, 77), generator=g)  # odd length, not a chunk multiple
    seq_idx = torch.tensor([[0] * 30 + [1] * 47, [0] * 5 + [1] * 40 + [2] * 32])
    graphs_before = _unique_graphs()  # the counter is process-wide: earlier tests' graphs are in it
    outs = []
    for model in (eager, compiled):
        out = model(ids, seq_idx=seq_idx)
        loss = out.logits.float().pow(2).mean() + sum(gt.float().mean() for gt in out.gates if gt is not None)
        loss.backward()
        outs.append((out, _grads(model)))
    (oe, ge), (oc, gc) = outs
    torch.testing.assert_close(oc.logits, oe.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(oc.gates, oe.gates):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ge.keys() == gc.keys() and len(ge) == sum(1 for _ in eager.parameters())
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Three blocks of two structures (local, global), compiled here: at least two graphs.
    assert _unique_graphs() - graphs_before >= 2

    # Row 1's last document (positions 45-76, longer than the window of 16) on its own, through
    # the caches: a prefill of 25 tokens, then one token at a time.
    doc = ids[1:2, 45:]
    graphs_before = _unique_graphs()
    with torch.no_grad():
        kv, ms = compiled.allocate_inference_cache(1, doc.shape[1])
        steps = [compiled(doc[:, :25], past_key_values=kv, past_mamba_states=ms).logits]
        for t in range(25, doc.shape[1]):
            steps.append(compiled(doc[:, t:t + 1], past_key_values=kv, past_mamba_states=ms).logits)
    torch.testing.assert_close(torch.cat(steps, 1), oc.logits[1:2, 45:].detach(), rtol=1e-4, atol=1e-5)
    assert _unique_graphs() == graphs_before  # the cached calls compiled nothing
