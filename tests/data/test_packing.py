"""Packing: every token lands once, documents stay whole where they fit, boundaries -> positions."""

import numpy as np
import pytest

from fusiontree.data.packing import assign_buckets, pack_documents, positions_from_doc_starts


def test_positions_from_doc_starts_by_hand():
    pos_BT, seq_BT = positions_from_doc_starts([np.array([0, 3, 5]), np.array([0])], 8)
    assert pos_BT.dtype == np.int64 and seq_BT.dtype == np.int32 and pos_BT.shape == (2, 8)
    assert pos_BT.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert seq_BT.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8]
    pos_BT, seq_BT = positions_from_doc_starts([np.array([0, 1, 2, 3])], 4)  # one-token documents
    assert pos_BT.tolist() == [[0, 0, 0, 0]] and seq_BT.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("starts", [[], [1, 3], [0, 3, 3], [0, 5, 2], [0, 8]])
def test_positions_from_doc_starts_rejects_bad_starts(starts):
    with pytest.raises(ValueError, match="must begin with 0 and increase strictly"):
        positions_from_doc_starts([np.array(starts, dtype=np.int32)], 8)


def _docs(rng, n, max_len):
    """Documents whose tokens say where they came from: value = doc * 10000 + position."""
    lengths = rng.integers(1, max_len, size=n)
    return [np.arange(len_) + d * 10000 for d, len_ in enumerate(lengths)], lengths


def _pieces(packed):
    """(doc, first position, length) of every document piece of every sample."""
    out = []
    for L, bucket in packed.items():
        for tokens_T, starts_D in zip(bucket.tokens, bucket.doc_starts):
            assert len(tokens_T) == L
            ends = list(starts_D[1:]) + [L]
            for s, e in zip(starts_D, ends):
                piece = tokens_T[s:e]
                # a piece is one contiguous run of one document
                assert np.all(np.diff(piece) == 1) and piece[0] // 10000 == piece[-1] // 10000
                out.append((int(piece[0] // 10000), int(piece[0] % 10000), e - s))
    return out


def test_every_token_lands_once_and_boundaries_are_exact():
    rng = np.random.default_rng(0)
    docs, lengths = _docs(rng, 300, 700)
    packed, stats = pack_documents(docs, [64, 128, 256], np.random.default_rng(1))
    pieces = _pieces(packed)
    covered = {}
    for d, start, n in pieces:
        covered.setdefault(d, []).append((start, n))
    placed = sum(n for _, _, n in pieces)
    assert placed + stats.dropped_tail_tokens == lengths.sum()
    assert stats.dropped_tail_tokens < 64
    for d, spans in covered.items():
        spans.sort()
        # the pieces of a document tile it without overlap (a dropped tail may end it early)
        assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
    long_docs = int((lengths > 256).sum())
    assert stats.long_documents_split == long_docs > 0
    cut = sum(len(s) > 1 for s in covered.values())
    assert cut <= stats.long_documents_split + stats.bucket_cut_documents + stats.packing_splits
    n_samples = sum(len(b.tokens) for b in packed.values())
    assert stats.packing_splits <= n_samples  # at most one cut to fill each sample
    # equal shares: each bucket within a couple of documents of a third of the tokens
    for L, bucket in packed.items():
        assert abs(len(bucket.tokens) * L - lengths.sum() / 3) < 2 * 700


def test_long_documents_go_whole_into_the_long_bucket():
    docs = [np.full(250, 5)] * 10 + [np.full(30, 6)] * 100
    packed, stats = pack_documents(docs, [64, 256], np.random.default_rng(0), shares=[1, 1])
    long_rows = packed[256].tokens
    # every 250-token document sits whole in a 256 sample; short documents fill the gaps
    assert sum(int((row == 5).sum()) == 250 for row in long_rows) == 10
    assert stats.long_documents_split == 0 and stats.bucket_cut_documents == 0


def test_shares_steer_tokens_and_a_zero_share_gets_none():
    docs = [np.ones(n) for n in np.random.default_rng(3).integers(1, 200, size=400)]
    packed, _ = pack_documents(docs, [64, 128, 256], np.random.default_rng(0), shares=[3, 0, 1])
    tokens = {L: len(b.tokens) * L for L, b in packed.items()}
    assert tokens[128] == 0
    assert 2.5 < tokens[64] / tokens[256] < 3.5


def test_assign_buckets_is_longest_first():
    where = assign_buckets([10, 500, 40, 300, 5], [64, 512], [1, 1])
    assert where == [0, 1, 0, 0, 0]  # the 500-token document alone fills half the tokens


def test_packing_is_deterministic_per_seed():
    docs, _ = _docs(np.random.default_rng(0), 100, 300)
    a, _ = pack_documents(docs, [64, 128], np.random.default_rng(5))
    b, _ = pack_documents(docs, [64, 128], np.random.default_rng(5))
    c, _ = pack_documents(docs, [64, 128], np.random.default_rng(6))
    flat = lambda p: np.concatenate([np.concatenate(p[L].tokens) for L in (64, 128)])  # noqa: E731
    assert np.array_equal(flat(a), flat(b))
    assert not np.array_equal(flat(a), flat(c))
