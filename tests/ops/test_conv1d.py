"""Causal depthwise conv1d reference: against torch's conv1d, carried states, packed documents."""

import pytest
import torch
import torch.nn.functional as F

from fusiontree.ops.conv1d import causal_conv1d_ref, causal_conv1d_step_ref


def _torch_conv(x_BTC, w_CK, b_C):
    K = w_CK.shape[1]
    y = F.conv1d(x_BTC.transpose(1, 2), w_CK[:, None], b_C, padding=K - 1, groups=x_BTC.shape[-1])
    return F.silu(y[..., : x_BTC.shape[1]].transpose(1, 2))


@pytest.mark.parametrize("T,K", [(1, 4), (2, 4), (63, 4), (17, 1), (9, 3)])
def test_matches_torch_conv1d_and_carries_state(T, K):
    g = torch.Generator().manual_seed(T * 10 + K)
    B, C = 2, 7
    x = torch.randn(B, T, C, generator=g, requires_grad=True)
    w = torch.randn(C, K, generator=g, requires_grad=True)
    b = torch.randn(C, generator=g, requires_grad=True)
    y, final = causal_conv1d_ref(x, w, b)
    y_ref = _torch_conv(x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), [x, w, b])
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [x, w, b])
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # splitting the sequence anywhere and carrying the state gives the same output
    for cut in {0, T // 2, T - 1}:
        y1, s1 = causal_conv1d_ref(x[:, :cut], w, b)
        y2, s2 = causal_conv1d_ref(x[:, cut:], w, b, initial_state_BCK=s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2, final)
    # and so does the step, token by token
    state = torch.zeros(B, C, K - 1)
    for t in range(T):
        torch.testing.assert_close(causal_conv1d_step_ref(state, x[:, t].detach(), w.detach(), b.detach()),
                                   y[:, t].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final.detach())


def test_packed_documents_match_separate_runs():
    g = torch.Generator().manual_seed(0)
    C, K = 5, 4
    lengths = [2, 9, 1, 6]
    docs = [torch.randn(1, L, C, generator=g) for L in lengths]
    w, b = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    seq_idx = torch.cat([torch.full((1, L), i) for i, L in enumerate(lengths)], 1)
    y, final = causal_conv1d_ref(torch.cat(docs, 1), w, b, seq_idx_BT=seq_idx)
    start = 0
    for d in docs:
        y_sep, f_sep = causal_conv1d_ref(d, w, b)
        torch.testing.assert_close(y[:, start:start + d.shape[1]], y_sep)
        start += d.shape[1]
    torch.testing.assert_close(final, f_sep)
