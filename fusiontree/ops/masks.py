"""The rules every op and backend reads: which keys a query sees, where documents start, and
what "global" means.

Legend: B batch, T time.

- A window is the number of keys a local layer's query sees, itself included. A global layer
  has no window: `window=None`, the only spelling of "global" below the config (where the
  attention pattern's letter `G` becomes it, `ModelConfig.layer_window`). A window at least
  as long as the sequence sees everything a global layer sees (`effective_window`).
- Visibility is defined on explicit positions, never on tensor lengths, so that a full
  forward, chunked prefill and ring-buffer decoding all apply the same rule (`visible`).
- A packed row holds several documents, told apart by `seq_idx`; a document is a contiguous
  run of one id, and a new one starts wherever the id changes between neighbours
  (`document_starts`). Every op that restarts at a document (positions, the SSM state, the
  attention mask of FlexAttention, the loss's targets) reads that helper.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def visible(q_pos: Tensor, k_pos: Tensor, window, q_seq: Tensor | None = None,
            k_seq: Tensor | None = None) -> Tensor:
    """Whether the query at `q_pos` may see the key at `k_pos` (broadcast elementwise):

        k_pos >= 0                    (a slot that holds a real token; -1: empty or padding)
        k_pos <= q_pos                (causal)
        q_pos - k_pos < window        (local layers; window counts the query itself)
        q_seq == k_seq                (packed documents, when given)

    `window`: an int, a tensor (kernels that share one compiled mask across windows), or None
    for a global layer."""
    keep = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        keep = keep & (q_pos - k_pos < window)
    if q_seq is not None:
        keep = keep & (q_seq == k_seq)
    return keep


def effective_window(window: int | None, seq_len: int) -> int | None:
    """`window` as it acts on `seq_len` keys: None (global) when it covers them all."""
    return None if window is None or window >= seq_len else window


def document_starts(seq_idx_BT: Tensor, first: bool) -> Tensor:
    """[B, T] bool: True where a token starts a new document of its packed row (its id differs
    from the token before). `first`: the value at t = 0, which starts the row's first document
    (True) or continues whatever came before it, an initial state or cache (False)."""
    change_BT = seq_idx_BT[:, 1:] != seq_idx_BT[:, :-1]
    return F.pad(change_BT, (1, 0), value=first)
