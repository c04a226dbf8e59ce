"""Blocked sliding-window / global attention against naive masked attention."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fusiontree.ops.attention import attention_naive, attention_ref


def _qkv(B, T, S0, H, K, D, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, requires_grad=requires_grad)
    k = torch.randn(B, S0 + T, K, D, generator=g, requires_grad=requires_grad)
    v = torch.randn(B, S0 + T, K, D, generator=g, requires_grad=requires_grad)
    return q, k, v


@pytest.mark.parametrize("T", [1, 63, 100])
@pytest.mark.parametrize("window", [1, 7, 64, 1000, None])
def test_blocked_matches_naive(T, window):
    B, H, K, D = 2, 6, 2, 8
    q, k, v = _qkv(B, T, 0, H, K, D, seed=T, requires_grad=True)
    pos = torch.arange(T).expand(B, T)
    o = attention_ref(q, k, v, pos, pos, window=window, block_size=16)
    o_ref = attention_naive(q, k, v, pos, pos, window=window)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(o)
    g = torch.autograd.grad((o * go).sum(), [q, k, v])
    g_ref = torch.autograd.grad((o_ref * go).sum(), [q, k, v])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [3, 16, None])
def test_cached_prefix_in_ring_order_and_padding(window):
    """Cached keys in arbitrary slot order, empty (-1) slots and padded rows."""
    B, T, S0, H, K, D = 2, 21, 16, 4, 4, 8
    q, k, v = _qkv(B, T, S0, H, K, D, seed=1)
    qpos = torch.arange(S0, S0 + T).expand(B, T).clone()
    g = torch.Generator().manual_seed(7)  # the slot order: fixed, so that a failure repeats
    cpos = torch.stack([torch.randperm(S0, generator=g), torch.randperm(S0, generator=g)])
    cpos[1, :5] = -1  # empty slots
    kpos = torch.cat([cpos, qpos], 1)
    o = attention_ref(q, k, v, qpos, kpos, window=window, block_size=8)
    o_ref = attention_naive(q, k, v, qpos, kpos, window=window)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


def test_document_masking_matches_separate_documents():
    H, K, D = 4, 2, 8
    lengths = [10, 1, 30]
    qs, ks, vs = zip(*[_qkv(1, L, 0, H, K, D, seed=L) for L in lengths])
    seq = torch.cat([torch.full((1, L), i) for i, L in enumerate(lengths)], 1)
    pos = torch.cat([torch.arange(L) for L in lengths])[None]
    o = attention_ref(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1), pos, pos, window=8,
                      q_seq_BT=seq, k_seq_BS=seq, block_size=8)
    start = 0
    for q, k, v in zip(qs, ks, vs):
        p = torch.arange(q.shape[1])[None]
        torch.testing.assert_close(o[:, start:start + q.shape[1]], attention_naive(q, k, v, p, p, window=8),
                                   rtol=1e-5, atol=1e-5)
        start += q.shape[1]


def test_query_without_visible_keys_gives_zero_not_nan():
    q, k, v = _qkv(1, 4, 0, 2, 2, 8, seed=0)
    pos = torch.tensor([[-1, -1, 0, 1]])  # two padding slots as keys
    qpos = torch.tensor([[0, 0, 0, 1]])
    qpos_pad = torch.tensor([[-5, -5, 0, 1]])  # a padding query that sees nothing
    o = attention_ref(q, k, v, qpos_pad, pos, window=None)
    assert torch.isfinite(o).all() and o[0, :2].abs().max() == 0
    torch.testing.assert_close(o[:, 2:], attention_naive(q, k, v, qpos, pos)[:, 2:])


_MEMORY_PROBE = r"""
import json, resource, sys, torch
from fusiontree.models.config import model_preset
from fusiontree.models.attention import LocalGlobalAttention
from fusiontree.models.cache import SeqInfo
from fusiontree.ops import reference_kernels
import dataclasses
torch.set_num_threads(1)
L = int(sys.argv[1])
cfg = dataclasses.replace(model_preset("debug"), d_model=64, n_heads=4, n_kv_heads=2, window=512,
                          attn_pattern="L", max_seq_len=L)
layer = LocalGlobalAttention(cfg, 0, reference_kernels())
x = torch.randn(1, L, 64)
pos = torch.arange(L)[None]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    y = layer(x, SeqInfo(position_ids=pos, key_pos=pos))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_bytes": (after - before) * 1024, "finite": bool(torch.isfinite(y).all())}))
"""


def test_32k_window_forward_memory_is_far_below_a_full_mask():
    L = 32768
    # Large blocks go straight to mmap and back to the OS when freed, so that peak RSS
    # measures live tensors rather than what glibc's heap kept from earlier blocks.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(L)], capture_output=True, text=True,
                         check=True, timeout=300, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    full_mask_bytes = L * L * 4  # one fp32 L x L mask: 4 GiB
    print(f"32K window-attention forward: peak RSS growth {res['peak_growth_bytes'] / 2**20:.0f} MiB "
          f"vs {full_mask_bytes / 2**30:.0f} GiB for one L x L fp32 mask")
    assert res["finite"]
    assert res["peak_growth_bytes"] < full_mask_bytes / 20
