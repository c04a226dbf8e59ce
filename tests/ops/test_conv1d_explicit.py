"""The `explicit` conv1d (hand-written backward) against the reference: outputs, final states and
every gradient, on awkward shapes, packed documents, both activations, fp32 and bf16, eager and
traced by torch.compile; then a whole model with it against the reference model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fusiontree.config import KernelConfig
from fusiontree.ops import resolve_kernels
from fusiontree.ops.conv1d import causal_conv1d_explicit, causal_conv1d_ref


def _inputs(B, T, C, K, dtype, docs, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(C, K, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(C, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    seq = None
    if docs:
        # Random document starts, including one at t = 1 and runs shorter than the kernel.
        starts = (torch.rand(B, T, generator=g) < 0.2).long()
        starts[:, 0] = 0
        if T > 1:
            starts[0, 1] = 1
        seq = starts.cumsum(1)
    return x, w, b, seq


def _run(fn, x, w, b, seq, act, dy_seed=1):
    y, final = fn(x, w, b, None, seq, act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    return y, final, grads


CASES = [  # B, T, C, K
    (2, 37, 5, 4), (1, 1, 3, 4), (2, 2, 4, 4), (3, 9, 16, 2), (1, 6, 7, 1), (2, 64, 24, 4)]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("docs", [False, True], ids=["one_doc", "packed"])
@pytest.mark.parametrize("act", ["silu", None])
def test_explicit_backward_matches_the_reference_in_fp32(shape, docs, act):
    B, T, C, K = shape
    x, w, b, seq = _inputs(B, T, C, K, torch.float32, docs, bias=act is not None)
    want = _run(causal_conv1d_ref, x, w, b, seq, act)
    got = _run(causal_conv1d_explicit, x, w, b, seq, act)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for g, r in zip(got[2], want[2]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_explicit_backward_in_bf16_keeps_dtypes_and_values():
    x, w, b, seq = _inputs(2, 50, 12, 4, torch.bfloat16, docs=True, bias=True)
    want = _run(causal_conv1d_ref, x, w, b, seq, "silu")
    got = _run(causal_conv1d_explicit, x, w, b, seq, "silu")
    assert got[0].dtype == torch.bfloat16 and [g.dtype for g in got[2]] == [torch.bfloat16] * 3
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    for g, r in zip(got[2], want[2]):
        torch.testing.assert_close(g.float(), r.float(), rtol=3e-2, atol=3e-2)


def test_a_document_boundary_stops_gradients_between_documents():
    # Two documents in one row: the first document's input gradient must not see the second's
    # output gradient (and the reverse holds trivially: the conv is causal).
    x, w, b, _ = _inputs(1, 10, 3, 4, torch.float32, docs=False, bias=True)
    seq = torch.tensor([[0] * 5 + [1] * 5])
    y, _ = causal_conv1d_explicit(x, w, b, None, seq, "silu")
    dy = torch.zeros_like(y)
    dy[:, 5:] = 1.0
    (dx,) = torch.autograd.grad(y, [x], dy)
    assert dx[:, :5].abs().max() == 0 and dx[:, 5:].abs().max() > 0


def test_with_an_initial_state_it_is_the_reference():
    x, w, b, seq = _inputs(2, 7, 6, 4, torch.float32, docs=True, bias=True)
    state = torch.randn(2, 6, 3)
    got = causal_conv1d_explicit(x, w, b, state, seq, "silu")
    want = causal_conv1d_ref(x, w, b, state, seq, "silu")
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_traced_by_torch_compile_across_a_length_change():
    # aot_eager traces the custom backward into the joint graph the way Inductor receives it;
    # Inductor's GPU code for it is checked by the GPU tests.
    torch._dynamo.reset()
    fn = torch.compile(causal_conv1d_explicit, backend="aot_eager", dynamic=False)
    for T in (33, 48):
        x, w, b, seq = _inputs(2, T, 8, 4, torch.float32, docs=True, bias=True, seed=T)
        want = _run(causal_conv1d_ref, x, w, b, seq, "silu")
        got = _run(fn, x, w, b, seq, "silu")
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        for g, r in zip(got[2], want[2]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_kernels_take_it_by_name_only():
    assert resolve_kernels(KernelConfig(), "cpu").describe().endswith("conv1d=reference")
    k = resolve_kernels(KernelConfig(conv1d="explicit"), "cpu")
    assert k.conv1d is causal_conv1d_explicit and "conv1d=explicit" in k.describe()
    with pytest.raises(ValueError, match="kernels.conv1d='auto'.*explicit"):
        resolve_kernels(KernelConfig(conv1d="auto"), "cpu")


def test_a_hybrid_model_with_it_trains_like_the_reference_model():
    from fusiontree.models.config import model_preset
    from fusiontree.models.hybrid import HybridLanguageModel

    cfg = dataclasses.replace(model_preset("debug"), vocab_size=128)
    torch.manual_seed(0)
    ref = HybridLanguageModel(cfg, kernels=resolve_kernels(KernelConfig(), "cpu"))
    exp = HybridLanguageModel(cfg, kernels=resolve_kernels(KernelConfig(conv1d="explicit"), "cpu"))
    exp.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 128, (2, 40))
    seq = torch.cat([torch.zeros(2, 17, dtype=torch.long), torch.ones(2, 23, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(17), torch.arange(23)]).expand(2, -1)
    outs = []
    for m in (ref, exp):
        logits = m(ids, position_ids=pos, seq_idx=seq).logits
        logits.float().square().mean().backward()
        outs.append((logits, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    conv_grads = [n for n in outs[0][1] if "conv_weight" in n]
    assert conv_grads
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
