"""Chunked SSD scan and decode step against the float64 token-by-token recurrence."""

import pytest
import torch

from fusiontree.ops.ssd import seq_idx_from_cu_seqlens, ssd_chunked_ref, ssd_recurrent_ref, ssd_step_ref


def _inputs(B, T, H, P, G, N, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g)
    dt = torch.rand(B, T, H, generator=g) * 0.3 + 0.01
    A = -(torch.rand(H, generator=g) * 3 + 0.2)
    Bm = torch.randn(B, T, G, N, generator=g)
    Cm = torch.randn(B, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    h0 = torch.randn(B, H, P, N, generator=g)
    ts = [x, dt, A, Bm, Cm, D, h0]
    if requires_grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


@pytest.mark.parametrize("T,chunk", [(1, 16), (63, 16), (64, 64), (1000, 64), (37, 8)])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_matches_float64_recurrence(T, chunk, with_init):
    B, H, P, G, N = 2, 4, 5, 2, 3
    x, dt, A, Bm, Cm, D, h0 = _inputs(B, T, H, P, G, N, seed=T)
    init = h0 if with_init else None
    y, final = ssd_chunked_ref(x, dt, A, Bm, Cm, D, chunk_size=chunk, initial_state_BHPN=init)
    y64, final64 = ssd_recurrent_ref(x, dt, A, Bm, Cm, D, initial_state_BHPN=init, dtype=torch.float64)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_gradients_match_float64_recurrence(with_init):
    B, T, H, P, G, N = 2, 45, 4, 3, 1, 4
    ts = _inputs(B, T, H, P, G, N, seed=7, requires_grad=True)
    x, dt, A, Bm, Cm, D, h0 = ts
    init = h0 if with_init else None
    gy = torch.randn(B, T, H, P, dtype=torch.float64)
    gf = torch.randn(B, H, P, N, dtype=torch.float64)

    def grads(fn):
        y, f = fn()
        loss = (y.double() * gy).sum() + (f.double() * gf).sum()
        return torch.autograd.grad(loss, [x, dt, A, Bm, Cm, D] + ([h0] if with_init else []))

    g32 = grads(lambda: ssd_chunked_ref(x, dt, A, Bm, Cm, D, chunk_size=16, initial_state_BHPN=init))
    g64 = grads(lambda: ssd_recurrent_ref(x, dt, A, Bm, Cm, D, initial_state_BHPN=init, dtype=torch.float64))
    for name, a, b in zip(["x", "dt", "A", "B", "C", "D", "h0"], g32, g64):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m: f"grad {name}: {m}")


def test_packed_documents_reset_state_and_match_separate_runs():
    H, P, G, N = 2, 3, 1, 4
    lengths = [5, 17, 1, 30]
    docs = [_inputs(1, L, H, P, G, N, seed=i) for i, L in enumerate(lengths)]
    A, D = docs[0][2], docs[0][5]
    cat = [torch.cat([d[k] for d in docs], dim=1) for k in (0, 1, 3, 4)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    seq_idx = seq_idx_from_cu_seqlens(cu, sum(lengths))
    y, final = ssd_chunked_ref(cat[0], cat[1], A, cat[2], cat[3], D, chunk_size=8, seq_idx_BT=seq_idx)
    start = 0
    for L, d in zip(lengths, docs):
        y_sep, f_sep = ssd_chunked_ref(d[0], d[1], A, d[3], d[4], D, chunk_size=8)
        torch.testing.assert_close(y[:, start:start + L], y_sep, rtol=1e-5, atol=1e-5)
        start += L
    torch.testing.assert_close(final, f_sep, rtol=1e-5, atol=1e-5)  # the last document's state
    y64, _ = ssd_recurrent_ref(cat[0], cat[1], A, cat[2], cat[3], D, seq_idx_BT=seq_idx, dtype=torch.float64)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)


def test_packed_gradients_are_finite_and_match_recurrence():
    B, T, H, P, G, N = 1, 40, 2, 3, 1, 4
    x, dt, A, Bm, Cm, D, _ = _inputs(B, T, H, P, G, N, seed=3, requires_grad=True)
    seq_idx = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13])
    y, _ = ssd_chunked_ref(x, dt, A, Bm, Cm, D, chunk_size=16, seq_idx_BT=seq_idx)
    g32 = torch.autograd.grad(y.sum(), [x, dt, A, Bm, Cm])
    y64, _ = ssd_recurrent_ref(x, dt, A, Bm, Cm, D, seq_idx_BT=seq_idx, dtype=torch.float64)
    g64 = torch.autograd.grad(y64.sum(), [x, dt, A, Bm, Cm])
    for a, b in zip(g32, g64):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_step_continues_a_chunked_prefill():
    B, T, H, P, G, N = 2, 30, 4, 3, 2, 5
    x, dt, A, Bm, Cm, D, _ = _inputs(B, T, H, P, G, N, seed=11)
    y_full, final_full = ssd_chunked_ref(x, dt, A, Bm, Cm, D, chunk_size=8)
    _, state = ssd_chunked_ref(x[:, :20], dt[:, :20], A, Bm[:, :20], Cm[:, :20], D, chunk_size=8)
    state = state.clone()
    for t in range(20, T):
        y_t = ssd_step_ref(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D)
        torch.testing.assert_close(y_t, y_full[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final_full, rtol=1e-5, atol=1e-5)


def test_cu_seqlens_must_cover_the_packed_length():
    with pytest.raises(ValueError, match="cu_seqlens"):
        seq_idx_from_cu_seqlens(torch.tensor([0, 3, 5]), 6)
