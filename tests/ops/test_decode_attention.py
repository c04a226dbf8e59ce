"""Decode attention over a static-shape cache: the `filled_blocks` backend (FlexAttention over
the filled key blocks) against `decode_attention_ref`, which is itself checked against the
naive masked softmax over the filled slots alone.

Caches are laid out as the model lays them out (`fusiontree.models.cache`): a global cache holds
token n in slot n, a ring buffer in slot n % slots; left-padded rows hold position -1 in their
padding slots. Slots past the filled part hold garbage with real-looking positions: the
contract says they are never read."""

import math

import pytest
import torch

from fusiontree.ops.attention import attention_naive, decode_attention_ref
from fusiontree.ops.backends.decode import KV_BLOCK, decode_attention_filled_blocks, filled_block_mask

TOL = dict(rtol=1e-5, atol=1e-5)



def decode_case(tokens: int, slots: int, ring: bool, pads: list[int], H: int = 4, K: int = 2, D: int = 16,
                seed: int = 0):
    """One decode step after `tokens` tokens (the query's own included) were written to a cache
    of `slots` slots; row b starts with pads[b] padding tokens. Returns q, k, v, q_pos, k_pos,
    filled and the number of filled slots."""
    g = torch.Generator().manual_seed(seed)
    B = len(pads)
    q = torch.randn(B, 1, H, D, generator=g)
    k, v = (torch.randn(B, slots, K, D, generator=g) for _ in range(2))
    n = min(tokens, slots) if ring else tokens
    assert n <= slots
    k_pos = torch.full((B, slots), -1, dtype=torch.long)
    for t in range(max(0, tokens - slots) if ring else 0, tokens):  # the tokens still in the cache
        slot = t % slots if ring else t
        for b, pad in enumerate(pads):
            k_pos[b, slot] = t - pad if t >= pad else -1
    # Past the filled part: garbage that a kernel reading it would attend to.
    k_pos[:, n:] = torch.randint(0, tokens, (B, slots - n), generator=g)
    k[:, n:], v[:, n:] = 1e3, 1e3
    q_pos = torch.tensor([[tokens - 1 - pad] for pad in pads])
    return q, k, v, q_pos, k_pos, torch.tensor([n]), n


# (tokens, slots, ring, window): global caches filled to one slot, part of a block, exactly one
# block, part of the last block and in full; ring buffers before and after they wrap.
CASES = [(1, 300, False, None), (37, 300, False, None), (KV_BLOCK, 300, False, None),
         (KV_BLOCK + 1, 300, False, None), (300, 300, False, None),
         (9, 16, True, 16), (16, 16, True, 16), (45, 16, True, 16), (200, 150, True, 150)]
PADS = [0, 5, 20]  # batch of 3: one row without padding, two left-padded


def test_reference_is_the_naive_softmax_over_the_filled_slots():
    for tokens, slots, ring, window in CASES:
        q, k, v, q_pos, k_pos, filled, n = decode_case(tokens, slots, ring, PADS)
        want = attention_naive(q, k[:, :n], v[:, :n], q_pos, k_pos[:, :n], window=window)
        got = decode_attention_ref(q, k, v, q_pos, k_pos, filled, window=window)
        torch.testing.assert_close(got, want, **TOL)
        assert got.abs().max() < 100  # no garbage slot was read


@pytest.mark.parametrize("tokens,slots,ring,window", CASES)
def test_filled_blocks_matches_reference(tokens, slots, ring, window):
    q, k, v, q_pos, k_pos, filled, _ = decode_case(tokens, slots, ring, PADS, seed=tokens)
    want = decode_attention_ref(q, k, v, q_pos, k_pos, filled, window=window)
    torch.testing.assert_close(decode_attention_filled_blocks(q, k, v, q_pos, k_pos, filled, window=window),
                               want, **TOL)


def test_filled_blocks_counts_only_the_filled_blocks():
    """The BlockMask hands the kernel ceil(filled / KV_BLOCK) blocks, in slot order: what the
    GPU kernel loads per step is the filled part of the cache, not the allocation."""
    S = 5 * KV_BLOCK + 3
    k_pos = torch.zeros(2, S, dtype=torch.long)
    for n in (0, 1, KV_BLOCK - 1, KV_BLOCK, KV_BLOCK + 1, 3 * KV_BLOCK, S):
        bm = filled_block_mask(torch.zeros(2, 1, dtype=torch.long), k_pos, torch.tensor([n]), None)
        assert bm.kv_num_blocks.flatten().tolist() == [math.ceil(n / KV_BLOCK)]
        assert bm.kv_indices.flatten().tolist() == list(range(6))
        assert tuple(bm.seq_lengths) == (1, S)


def test_compiled_filled_blocks_skips_blocks_and_matches_reference():
    """Inductor's CPU FlexAttention kernel, like the GPU one, loads only the counted blocks:
    the count and the mask inside the last block are exercised for real here. One compile per
    mask shape (global, windowed), every fill level through the same compiled kernel."""
    for tokens, slots, ring, window in [c for c in CASES if c[1] == 300] + [(9, 300, True, 300), (400, 300, True, 300)]:
        q, k, v, q_pos, k_pos, filled, _ = decode_case(tokens, slots, ring, PADS, seed=tokens)
        want = decode_attention_ref(q, k, v, q_pos, k_pos, filled, window=window)
        got = decode_attention_filled_blocks(q, k, v, q_pos, k_pos, filled, window=window, compiled=True)
        torch.testing.assert_close(got, want, **TOL)


def test_filled_blocks_bf16_and_a_row_with_no_visible_key():
    q, k, v, q_pos, k_pos, filled, _ = decode_case(37, 300, False, [0, 3], seed=3)
    k_pos[1, :37] = -1  # row 1: nothing to see (the reference gives zeros)
    args = (q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, filled)
    got = decode_attention_filled_blocks(*args)
    want = decode_attention_ref(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert got[1].abs().max() == 0


def test_filled_blocks_rejects_bad_shapes():
    q, k, v, q_pos, k_pos, filled, _ = decode_case(5, 16, False, [0])
    with pytest.raises(ValueError, match=r"q \[B, 1, H, D\]"):
        decode_attention_filled_blocks(q.expand(1, 2, -1, -1), k, v, q_pos, k_pos, filled)
    with pytest.raises(ValueError, match="filled \\[1\\]"):
        decode_attention_filled_blocks(q, k, v, q_pos, k_pos, 5)
    with pytest.raises(ValueError, match="H % K == 0"):
        decode_attention_filled_blocks(q[:, :, :3], k, v, q_pos, k_pos, filled)
    with pytest.raises(ValueError, match="window=0"):
        decode_attention_filled_blocks(q, k, v, q_pos, k_pos, filled, window=0)


def test_filled_blocks_hands_flex_attention_the_decode_kernel_options(monkeypatch):
    """DECODE_KERNEL_OPTIONS (what `decode_gpu.py --decode-kernel-options` sets) reach
    FlexAttention's call; empty, FlexAttention chooses."""
    from fusiontree.ops.backends import decode as decode_backend

    seen = []
    real = decode_backend.flex_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_backend, "flex_attention", spy)
    q, k, v, q_pos, k_pos, filled, _ = decode_case(37, 300, False, PADS, seed=5)
    want = decode_attention_ref(q, k, v, q_pos, k_pos, filled)
    for options in ({}, {"SPLIT_KV": 2}):
        monkeypatch.setattr(decode_backend, "DECODE_KERNEL_OPTIONS", dict(options))
        got = decode_attention_filled_blocks(q, k, v, q_pos, k_pos, filled, compiled=False)
        torch.testing.assert_close(got, want, **TOL)
    assert seen == [None, {"SPLIT_KV": 2}]


def test_the_decoding_kernels_split_of_the_keys_is_refined_only_where_flex_attentions_is_coarse(monkeypatch):
    """132 SMs (H200), 4 kv heads, 32K slots: FlexAttention's own split stands at batch 1 (66
    parts); at batch 8 its 8 parts of 4K slots and at batch 32 its 2 parts of 16K become 32 of
    1K. Options set by hand win; off CUDA (no SM count) nothing is added."""
    from fusiontree.ops.backends import decode as decode_backend
    from fusiontree.ops.backends.decode import decode_kernel_options

    monkeypatch.setattr(decode_backend, "DECODE_KERNEL_OPTIONS", {})
    assert decode_kernel_options(1, 4, 32768, 132) is None
    assert decode_kernel_options(8, 4, 32768, 132) == {"SPLIT_KV": 32}
    assert decode_kernel_options(8, 4, 8192, 132) is None  # FlexAttention's 8 parts of 1K: fine enough
    assert decode_kernel_options(32, 4, 32768, 132) == {"SPLIT_KV": 32}
    assert decode_kernel_options(32, 4, 32640, 132) == {"SPLIT_KV": 32}
    assert decode_kernel_options(32, 4, 4096, 132) == {"SPLIT_KV": 4}
    assert decode_kernel_options(32, 4, 2048, 132) is None  # 2 parts of 1K
    assert decode_kernel_options(40, 2, 9000, 132) == {"SPLIT_KV": 16}  # 9 parts, rounded up
    assert decode_kernel_options(32, 4, 32768, None) is None
    monkeypatch.setattr(decode_backend, "DECODE_KERNEL_OPTIONS", {"SPLIT_KV": 4, "BLOCK_N": 64})
    assert decode_kernel_options(32, 4, 32768, 132) == {"SPLIT_KV": 4, "BLOCK_N": 64}
    monkeypatch.setattr(decode_backend, "DECODE_KERNEL_OPTIONS", {"BLOCK_N": 64})
    assert decode_kernel_options(32, 4, 32768, 132) == {"BLOCK_N": 64, "SPLIT_KV": 32}
