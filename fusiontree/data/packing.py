"""Packing tokenized documents into fixed-length samples, one length bucket per sample.

Shapes: B = samples in a batch, T = tokens per sample (the bucket's sequence length), D =
document pieces in one sample.

Routing and packing (done per split, per chunk of documents):

1. Bucket shares: each bucket should receive `share_L` of the chunk's tokens (default equal
   shares, so every curriculum stage has data). Documents are assigned longest first to the
   longest bucket that still wants tokens, so long-context buckets hold the longest
   documents, whole where they fit.
2. A document longer than its bucket is cut into pieces of the bucket's length (each a
   sample of its own) plus a remainder. Cuts of documents longer than the largest bucket
   are counted as `long_documents_split`; cuts of documents that did fit a larger, but
   already full, bucket as `bucket_cut_documents`.
3. Within a bucket, best-fit decreasing: the longest unplaced document starts a sample
   and the gap behind it is filled with the longest unplaced document that fits whole,
   again and again. Only when none fits is one cut: the shortest document longer than the
   gap gives its head and its tail stays in the pool (`packing_splits`). The bucket's
   samples are then put in a seeded random order.
4. Samples hold exactly T tokens, no padding. When a bucket runs out of documents in the
   middle of a sample, that sample's pieces move to the next smaller bucket with a share;
   only the last such bucket's partial sample is dropped (`dropped_tail_tokens`).

A sample stores its tokens and `doc_starts_D`: the offset of every document piece in it
(the first is 0). `positions_from_doc_starts` turns those into the model's position ids
(restarting at 0 at each piece) and `seq_idx` (piece index within the row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackStats:
    documents: int = 0  # documents given to the packer
    long_documents_split: int = 0  # documents longer than the largest bucket, cut into pieces
    long_document_pieces: int = 0  # pieces those were cut into (remainders included)
    bucket_cut_documents: int = 0  # documents cut to the length of a smaller bucket (larger ones were full)
    packing_splits: int = 0  # documents cut to fill the end of a sample
    dropped_tail_tokens: int = 0  # tokens of the final, partial sample of the smallest bucket
    dropped_tail_documents: int = 0  # document pieces in that sample

    def add(self, other: "PackStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class PackedBucket:
    tokens: list[np.ndarray] = field(default_factory=list)  # each [T]
    doc_starts: list[np.ndarray] = field(default_factory=list)  # each [D] int32, starts with 0
    source_tokens: dict[int, int] = field(default_factory=dict)  # tokens of each source (mixtures)


class _LengthPool:
    """Unplaced documents indexed by length: best-fit queries in O(log Lmax).

    A Fenwick tree counts live documents per length; a stack per length holds their ids,
    last in first out, so choices are a deterministic function of the insertion order.
    Taking a document deletes it lazily: a stack entry counts only while the document is
    alive and still has that length (lengths only shrink, so an id is never pushed twice
    onto one stack).
    """

    def __init__(self, lengths: list[int], max_len: int):
        self.n = max_len
        self.tree = [0] * (max_len + 1)
        self.total = 0
        self.length = list(lengths)
        self.alive = [True] * len(lengths)
        self.by_len: dict[int, list[int]] = {}
        self.top_bit = 1 << (max_len.bit_length() - 1)
        for doc, n in enumerate(lengths):
            self.by_len.setdefault(n, []).append(doc)
            self._update(n, 1)

    def _update(self, length: int, delta: int) -> None:
        i = length
        while i <= self.n:
            self.tree[i] += delta
            i += i & -i
        self.total += delta

    def _prefix(self, length: int) -> int:
        s, i = 0, length
        while i > 0:
            s += self.tree[i]
            i -= i & -i
        return s

    def _kth(self, k: int) -> int:
        """Smallest length whose prefix count reaches k (1 <= k <= total)."""
        pos, step = 0, self.top_bit
        while step:
            nxt = pos + step
            if nxt <= self.n and self.tree[nxt] < k:
                pos = nxt
                k -= self.tree[nxt]
            step >>= 1
        return pos + 1

    def _top(self, length: int) -> int:
        stack = self.by_len[length]
        while not (self.alive[stack[-1]] and self.length[stack[-1]] == length):
            stack.pop()
        return stack[-1]

    def take(self, doc: int) -> None:
        assert self.alive[doc]
        self.alive[doc] = False
        self._update(self.length[doc], -1)

    def shrink(self, doc: int, new_length: int) -> None:
        self._update(self.length[doc], -1)
        self.length[doc] = new_length
        self.by_len.setdefault(new_length, []).append(doc)
        self._update(new_length, 1)

    def longest_at_most(self, limit: int) -> int | None:
        below = self._prefix(min(limit, self.n))
        return None if below == 0 else self._top(self._kth(below))

    def shortest_longer_than(self, limit: int) -> int | None:
        below = self._prefix(min(limit, self.n))
        return None if below == self.total else self._top(self._kth(below + 1))


def assign_buckets(lengths: list[int], seq_lengths: list[int], shares: list[float]) -> list[int]:
    """Index into `seq_lengths` (ascending) of each document's bucket: longest documents first
    into the longest bucket that has not yet received its share of the tokens."""
    total = sum(lengths)
    want = [s / sum(shares) * total for s in shares]
    open_k = [k for k in range(len(seq_lengths)) if shares[k] > 0][::-1]  # longest first
    out = [0] * len(lengths)
    j = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep the seeded order
        k = open_k[j]
        out[i] = k
        want[k] -= lengths[i]
        if want[k] <= 0 and j + 1 < len(open_k):
            j += 1
    return out


def _pack_bucket(L: int, docs: list[tuple[np.ndarray, int]], out: PackedBucket, stats: PackStats
                 ) -> list[tuple[np.ndarray, int]]:
    """Pack `docs` ((tokens, source), each at most L tokens) into samples of L, best-fit
    decreasing; returns the pieces of a final sample that could not be filled (the caller
    moves them to a smaller bucket or drops them). Ties between equal lengths go to the
    later document."""
    pool = _LengthPool([len(t) for t, _ in docs], L)
    tokens = [t for t, _ in docs]
    srcs = [s for _, s in docs]
    while pool.total:
        a = pool.longest_at_most(L)
        pool.take(a)
        parts = [(tokens[a], srcs[a])]
        gap = L - len(tokens[a])
        while gap > 0:
            d = pool.longest_at_most(gap)
            if d is not None:
                pool.take(d)
                parts.append((tokens[d], srcs[d]))
                gap -= len(tokens[d])
                continue
            d = pool.shortest_longer_than(gap)
            if d is None:
                assert pool.total == 0
                return parts  # the pool is empty: this is the bucket's last sample
            parts.append((tokens[d][:gap], srcs[d]))
            tokens[d] = tokens[d][gap:]
            pool.shrink(d, len(tokens[d]))
            stats.packing_splits += 1
            gap = 0
        out.tokens.append(np.concatenate([p for p, _ in parts]))
        out.doc_starts.append(np.cumsum([0] + [len(p) for p, _ in parts[:-1]], dtype=np.int64).astype(np.int32))
        for p, src in parts:
            out.source_tokens[src] = out.source_tokens.get(src, 0) + len(p)
    return []


def pack_documents(docs: list[np.ndarray], seq_lengths: list[int], rng: np.random.Generator,
                   shares: list[float] | None = None, sources: list[int] | None = None
                   ) -> tuple[dict[int, PackedBucket], PackStats]:
    """Pack `docs` (token arrays, each ending with eos) into samples of the bucket lengths.

    `shares`: wanted share of tokens per bucket, in the order of `seq_lengths` (default
    equal). `sources`: a source number per document (default all 0); each bucket counts
    its tokens per source. Every token of every document lands in exactly one sample,
    except those of the smallest bucket's last partial sample (counted in
    `dropped_tail_tokens`).
    """
    order = np.argsort(seq_lengths, kind="stable")
    seq_lengths = [int(seq_lengths[k]) for k in order]
    shares = [1.0] * len(seq_lengths) if shares is None else [float(shares[k]) for k in order]
    assert len(shares) == len(seq_lengths) and min(shares) >= 0 and sum(shares) > 0
    lmax = seq_lengths[-1]
    stats = PackStats(documents=len(docs))
    out = {L: PackedBucket() for L in seq_lengths}
    zero = np.zeros(1, dtype=np.int32)

    perm = rng.permutation(len(docs))
    shuffled = [(docs[i], 0 if sources is None else sources[i]) for i in perm]
    where = assign_buckets([len(t) for t, _ in shuffled], seq_lengths, shares)
    per_bucket: list[list[tuple[np.ndarray, int]]] = [[] for _ in seq_lengths]
    for doc, k in zip(shuffled, where):
        assert len(doc[0]) > 0
        per_bucket[k].append(doc)
    carry: list[tuple[np.ndarray, int]] = []
    for k in reversed(range(len(seq_lengths))):
        if shares[k] == 0:
            continue  # assign_buckets gave it nothing; leftovers skip it too
        L = seq_lengths[k]
        fitting: list[tuple[np.ndarray, int]] = []
        for t, src in per_bucket[k] + carry:
            n = len(t)
            if n <= L:
                fitting.append((t, src))
                continue
            n_full = n // L
            if n > lmax:
                stats.long_documents_split += 1
                stats.long_document_pieces += n_full + (n % L > 0)
            else:
                stats.bucket_cut_documents += 1
            for j in range(n_full):  # full pieces are samples of their own
                out[L].tokens.append(t[j * L:(j + 1) * L])
                out[L].doc_starts.append(zero)
            out[L].source_tokens[src] = out[L].source_tokens.get(src, 0) + n_full * L
            if n % L:
                fitting.append((t[n_full * L:], src))
        carry = _pack_bucket(L, fitting, out[L], stats)
        # Cut pieces come in document order and best-fit decreasing sorts samples by their
        # longest piece; a shard should hold neither run.
        order = rng.permutation(len(out[L].tokens))
        out[L].tokens = [out[L].tokens[j] for j in order]
        out[L].doc_starts = [out[L].doc_starts[j] for j in order]
    stats.dropped_tail_tokens = sum(len(p) for p, _ in carry)
    stats.dropped_tail_documents = len(carry)
    return out, stats


def positions_from_doc_starts(doc_starts: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row document start offsets -> (position_ids_BT int64, seq_idx_BT int32).

    position_ids restart at 0 at every document start; seq_idx numbers the documents of a
    row 0, 1, 2, ... Each row's starts must begin with 0 and increase strictly below seq_len.
    """
    B, T = len(doc_starts), seq_len
    seq_idx_BT = np.zeros((B, T), dtype=np.int32)
    position_ids_BT = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    for b, starts_D in enumerate(doc_starts):
        if len(starts_D) == 0 or starts_D[0] != 0 or np.any(np.diff(starts_D) <= 0) or starts_D[-1] >= T:
            raise ValueError(f"row {b}: document starts {starts_D.tolist()} must begin with 0 and increase "
                             f"strictly below the sequence length {T}")
        if len(starts_D) == 1:
            continue
        seq_idx_BT[b, starts_D[1:]] = 1
        np.cumsum(seq_idx_BT[b], out=seq_idx_BT[b])
        position_ids_BT[b] -= np.asarray(starts_D, dtype=np.int64)[seq_idx_BT[b]]
    return position_ids_BT, seq_idx_BT
